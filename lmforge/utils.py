"""Small shared helpers: atomic writes, JSON I/O, seeding, device/dtype parsing.

Atomic writes: a crash (or SIGKILL, or a full disk) in the middle of a save must never leave a half-written file
where a good one used to be. We write to a temporary file in the same directory, flush and fsync it, then
`os.replace` it over the target: on POSIX the rename is atomic, so readers see either the old file or the new one.
The result gets the permissions a plain `open()` or `mkdir` would have given (the user's umask), not the
0600/0700 of the temporary file.

Outputs: `check_output` is what every command that writes a model directory (or file) asks first. A path that
already holds something is refused with one line naming `--resume` (where a run can continue) and `--overwrite`,
and a file is never replaced by a directory (or the reverse).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from lmforge.errors import ConfigError, DataError


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _modes_as_mkdir(tmp: Path, kept: dict[str, int]) -> None:
    """Give what was written in `tmp` the modes plain mkdir/open would have under the umask (mkdtemp makes 0700,
    safetensors and mkstemp 0600), except entries that existed before, which keep their own."""
    mask = _umask()
    for p in [tmp, *tmp.rglob("*")]:
        if p.is_symlink():
            continue
        rel = "." if p == tmp else str(p.relative_to(tmp))
        os.chmod(p, kept[rel] if rel in kept else (0o777 if p.is_dir() else 0o666) & ~mask)


def _make_parent(path: Path) -> None:
    """mkdir -p of `path`'s parent, with a one-line error when part of it is a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), path.parent)
        raise ConfigError(f"cannot write {path}: {blocker} is a file, not a directory") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temp file next to `path` for writing; on success rename it over `path`.

    >>> with atomic_write("out.json") as f:   # doctest: +SKIP
    ...     f.write("{}")
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write the file {path}: it is a directory")
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:  # mkstemp makes the file 0600: give it what open() would have (an existing file keeps its own mode)
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):  # recipe configs built in Python may hold Path fields
        return os.fspath(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON at `path`, atomically; paths are written as strings."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole directory in a temp sibling, then swap it into place.

    Files already in `path` that the caller does not rewrite are kept (copied into the new directory first), so
    saving weights into an existing run directory does not lose its `train_state/` or metrics. If the block
    raises, `path` is left exactly as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():  # never swap a user's file for a directory
        raise ConfigError(f"cannot write the directory {path}: a file of that name exists")
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        kept: dict[str, int] = {}  # what was in `path` before: each entry keeps its mode when rewritten
        if path.is_dir():
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            kept = {str(p.relative_to(path)): stat.S_IMODE(p.stat().st_mode) for p in path.rglob("*")}
            kept["."] = stat.S_IMODE(path.stat().st_mode)
        yield tmp
        _modes_as_mkdir(tmp, kept)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(path: str | os.PathLike, *, overwrite: bool = False, resume: bool | None = None,
                 kind: str = "dir") -> Path:
    """Refuse to write over anything at `path` that the user did not ask to replace; returns `path` as a Path.

    kind "dir": `path` will be a directory (a model directory). A missing or empty directory is fine; one with
    anything in it needs `overwrite` (or `resume`, for a command that continues its run there: pass resume=False
    for such a command so the message offers it). kind "file": `path` will be one file (a .gguf); an existing file
    needs `overwrite`, and a directory there is refused. A file where a directory goes (or the reverse) is refused
    even with `overwrite`: that would delete something of another kind than the command makes.
    """
    path = Path(path)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the output directory and --overwrite starts it afresh; "
                          "pass one of them")
    flag = "--overwrite" if resume is None else "--resume to continue its run, or --overwrite"
    if kind == "file":
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; --out must name the file to write (e.g. {path / 'model.gguf'})")
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists; pass --overwrite to replace it (or choose another --out)")
    else:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, not a directory; choose another --out (lmforge will not replace a "
                              f"file with a model directory)")
        if path.is_dir() and not (overwrite or resume) and any(path.iterdir()):
            what = "a model" if any((path / n).exists() for n in ("config.json", "model.safetensors",
                                                                  "adapter_config.json")) else "files"
            raise ConfigError(f"{path} already holds {what}; pass {flag} to replace it (or choose another --out)")
    check_parents(path)
    return path


def check_parents(path: str | os.PathLike) -> None:
    """A one-line error when a directory `path` would need is an existing file (`--out notes.txt/x`)."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {path}: {parent} is a file, not a directory")
            return


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed: Any, name: str = "seed", error: type[Exception] = ConfigError) -> None:
    """A one-line `error` unless `seed` is None or an integer torch can seed a generator with."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise error(f"{name} must be an integer, got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise error(f"{name} {seed} is out of range: a seed is an integer from -2**63 to 2**64 - 1")


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None and 'auto' -> None (caller decides)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_device(device: str | torch.device | None) -> torch.device:
    """None/'auto' -> cuda if available, else mps, else cpu. Explicit devices are checked."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


