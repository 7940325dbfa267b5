"""OpenAI's `.tiktoken` rank files (cl100k_base, o200k_base, ...) as lmforge byte-level BPE tokenizers.

The file format
---------------
A `.tiktoken` file is the whole vocabulary of a byte-level BPE, one token per line: the token's bytes in base64,
a space, and its *rank*, which is also its id:

    IQ== 0          b"!"        rank 0
    Ig== 1          b'"'        rank 1
    ...
    IHRoZQ== 279    b" the"     (cl100k_base)

There are no merges in it. tiktoken encodes a pre-token by repeatedly joining the adjacent pair whose
*concatenation* has the lowest rank, so the ranks alone define the tokenizer. What the file does not hold is the
pre-tokenization regex (the "split pattern") and the special tokens: tiktoken keeps those in code
(`tiktoken_ext/openai_public.py`), per encoding name. `ENCODINGS` below copies them for the known names (the tests
check the copy against tiktoken's own table); any other file needs `pattern=`.

From ranks to merges
--------------------
lmforge's `Tokenizer` applies ordered *merges* (pair -> new token), the form `tokenizer.json` and GGUF store. The
merges are recovered from the ranks as minbpe and Hugging Face's converter do: for each multi-byte token, in rank
order, run tiktoken's rule on its bytes using only the tokens ranked below it; that stops at exactly two pieces,
and those two pieces are the merge that made it (b" the" -> b" t" + b"he"). The `Tokenizer` then checks that
merge-order BPE reproduces every token (`Tokenizer._ranks_consistent`); when it does, its ids equal tiktoken's for
every text, and its fast path *is* a `tiktoken.Encoding` over the same ranks. A file where some token is not
reachable that way is refused rather than encoded differently.

    tok = load_tiktoken("cl100k_base.tiktoken")                 # the name gives pattern and special tokens
    tok = load_tiktoken("mine.tiktoken", pattern="gpt4", special_tokens={"<|endoftext|>": 1000})
    lmforge.tokenizers.load_tokenizer("dir/")                   # a directory holding one .tiktoken file
    tok = load_tiktoken("cl100k_base")                          # by name: downloaded once, checked, cached

Downloads: a known name that is not a local file is fetched from OpenAI's public storage (the URLs tiktoken uses),
checked against the SHA-256 tiktoken pins, and kept in a cache directory ($LMFORGE_TIKTOKEN_CACHE, default
~/.cache/lmforge/tiktoken); later loads read the cache and need no network.

Reference: tiktoken (`tiktoken/load.py` reads the format; `tiktoken/_educational.py` shows the rank rule).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from lmforge.errors import NetworkError, TokenizerError
from lmforge.tokenizers.bpe import (ENDOFTEXT, FILE_READERS, GPT2_PATTERN, GPT4_PATTERN, Tokenizer,
                                    resolve_pattern)

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

#: o200k_base (GPT-4o): words split on case changes (a capitalized word is one piece, "CamelCase" two), contractions
#: kept on the word, numbers in groups of at most 3 digits, punctuation runs that may swallow a trailing "/".
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

_O200K_SPECIALS = {ENDOFTEXT: 199999, ENDOFPROMPT: 200018}
_HARMONY_SPECIALS = {
    **_O200K_SPECIALS, "<|startoftext|>": 199998, "<|return|>": 200002, "<|constrain|>": 200003,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
    **{f"<|reserved_{i}|>": i for i in (200000, 200001, 200004, 200009, 200010, 200011, *range(200013, 201088))},
}

#: The split pattern and special tokens of each encoding OpenAI publishes (tiktoken_ext/openai_public.py). GPT-2's
#: pattern is lmforge's spelling of r50k's regex (the same splits; tiktoken writes it with possessive quantifiers).
ENCODINGS: dict[str, dict] = {
    "gpt2": {"pattern": GPT2_PATTERN, "special_tokens": {ENDOFTEXT: 50256}},
    "r50k_base": {"pattern": GPT2_PATTERN, "special_tokens": {ENDOFTEXT: 50256}},
    "p50k_base": {"pattern": GPT2_PATTERN, "special_tokens": {ENDOFTEXT: 50256}},
    "p50k_edit": {"pattern": GPT2_PATTERN,
                  "special_tokens": {ENDOFTEXT: 50256, FIM_PREFIX: 50281, FIM_MIDDLE: 50282, FIM_SUFFIX: 50283}},
    "cl100k_base": {"pattern": GPT4_PATTERN,
                    "special_tokens": {ENDOFTEXT: 100257, FIM_PREFIX: 100258, FIM_MIDDLE: 100259,
                                       FIM_SUFFIX: 100260, ENDOFPROMPT: 100276}},
    "o200k_base": {"pattern": O200K_PATTERN, "special_tokens": _O200K_SPECIALS},
    "o200k_harmony": {"pattern": O200K_PATTERN, "special_tokens": _HARMONY_SPECIALS},
}


# ----------------------------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------------------------
def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `.tiktoken` file: {token bytes: rank}. A malformed line is an error naming its line number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            token = base64.b64decode(b64, validate=True)
            ranks[token] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{n}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    if not ranks:
        raise TokenizerError(f"{path}: no tokens in this .tiktoken file")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path}: two tokens share a rank")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> Path:
    """Write {token bytes: rank} as a `.tiktoken` file (rank order), atomically."""
    from lmforge.utils import atomic_write  # (lmforge.utils imports torch: only when saving)

    with atomic_write(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Ranks -> merges
# ----------------------------------------------------------------------------------------------------------------
def rank_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's rule on `token`'s bytes with only tokens ranked below `max_rank`: repeatedly join the adjacent pair
    whose concatenation has the lowest rank. Ranks {a:0, b:1, c:2, ab:3, abc:4}: split of b"abc" below rank 4 ->
    [b"ab", b"c"] (the pair that made "abc")."""
    parts = [bytes([x]) for x in token]
    while True:
        best_i, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_i, best_rank = i, r
        if best_i is None:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The ordered merges that build each multi-byte token (in rank order) from two lower-ranked tokens."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = rank_split(ranks, token, rank)
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) is not the join of two lower-ranked tokens; this "
                                 "is not a byte-level BPE rank file")
        merges.append((parts[0], parts[1]))
    return merges


# ----------------------------------------------------------------------------------------------------------------
# Downloading by name
# ----------------------------------------------------------------------------------------------------------------
#: Where OpenAI publishes the rank files (tiktoken_ext/openai_public.py), and their SHA-256 as tiktoken pins them.
#: (gpt2 is published as encoder.json + vocab.bpe, the files `Tokenizer.from_gpt2_files` reads, and r50k_base
#: holds the same ranks; p50k_edit and o200k_harmony reuse p50k_base's and o200k_base's files.)
BASE_URL = "https://openaipublic.blob.core.windows.net/encodings"
FILES = {
    "r50k_base": ("r50k_base", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "p50k_base": ("p50k_base", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "p50k_edit": ("p50k_base", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
    "cl100k_base": ("cl100k_base", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
    "o200k_base": ("o200k_base", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "o200k_harmony": ("o200k_base", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_TIKTOKEN_CACHE") or Path.home() / ".cache" / "lmforge" / "tiktoken")


def download_tiktoken(name: str, *, base_url: str = BASE_URL, sha256: str | None = None,
                      cache: str | os.PathLike | None = None, timeout: float = 60.0) -> Path:
    """The local path of encoding `name`'s rank file, downloading it into the cache the first time.

    The download must have the SHA-256 tiktoken pins (or `sha256`, for a `base_url` that serves other files);
    anything else is refused and nothing is cached. `base_url` may be any http(s):// or file:// URL holding
    `<file>.tiktoken` (a mirror, or a local copy).
    """
    import urllib.error
    import urllib.request

    if name not in FILES:
        raise TokenizerError(f"no published .tiktoken file for {name!r}; known: {', '.join(FILES)}")
    file, pinned = FILES[name]
    want = sha256 or pinned
    path = Path(cache or cache_dir()) / f"{file}.tiktoken"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
        return path
    url = f"{base_url.rstrip('/')}/{file}.tiktoken"
    print(f"downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise NetworkError(f"cannot download {url}: {reason}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise NetworkError(f"{url}: SHA-256 {got[:16]}... is not the expected {want[:16]}... (a corrupt or "
                           "different file); nothing was cached")
    from lmforge.utils import atomic_write_bytes  # (lmforge.utils imports torch: only when writing)

    atomic_write_bytes(path, data)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def encoding_name(path: str | os.PathLike) -> str:
    """"cl100k_base" for ".../cl100k_base.tiktoken"."""
    name = Path(path).name
    return name[: -len(".tiktoken")] if name.endswith(".tiktoken") else Path(name).stem


def load_tiktoken(path: str | os.PathLike, *, name: str | None = None, pattern: str | None = None,
                  special_tokens: dict[str, int] | None = None) -> Tokenizer:
    """A `Tokenizer` from a `.tiktoken` rank file, with the same ids as `tiktoken` on the same ranks.

    name: the encoding whose split pattern and special tokens to use (default: the file name, e.g.
    cl100k_base.tiktoken -> "cl100k_base"; see `ENCODINGS`). pattern: a regex, or a name lmforge knows ("gpt2",
    "gpt4"/"cl100k", "llama3", "o200k"), overriding the encoding's. special_tokens: {text: id}, overriding the
    encoding's. <|endoftext|> (when present) becomes BOS and EOS, as GPT-2 and tiktoken use it.
    A known encoding name that is not a local file ("cl100k_base") is downloaded once (`download_tiktoken`).
    """
    if not Path(path).exists() and str(path) in FILES:
        name = name or str(path)
        path = download_tiktoken(str(path))
    path = Path(path)
    name = name or encoding_name(path)
    known = ENCODINGS.get(name)
    if known is None and pattern is None:
        raise TokenizerError(f"{path}: unknown encoding {name!r}, so its split pattern is unknown; pass pattern= "
                             f"(a regex, or gpt2 / gpt4 / llama3 / o200k), or name= one of {', '.join(ENCODINGS)}")
    ranks = read_tiktoken_ranks(path)
    missing = [x for x in range(256) if bytes([x]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: byte-level BPE needs all 256 single bytes; byte 0x{missing[0]:02x} has no rank")
    if pattern is not None:
        pat = O200K_PATTERN if pattern == "o200k" else resolve_pattern(pattern)
    else:
        pat = known["pattern"]
    specials = dict(special_tokens if special_tokens is not None else (known or {}).get("special_tokens", {}))
    clash = {s: i for s, i in specials.items() if i in set(ranks.values())}
    if clash:
        s, i = next(iter(clash.items()))
        raise TokenizerError(f"special token {s!r} has id {i}, which is already the rank of an ordinary token")
    eot = ENDOFTEXT if ENDOFTEXT in specials else None
    tok = Tokenizer({i: b for b, i in ranks.items()}, recover_merges(ranks), pat, specials,
                    bos_token=eot, eos_token=eot)
    if not tok._ranks_consistent():
        raise TokenizerError(f"{path}: these ranks cannot be replayed as ordered merges, so lmforge could not give "
                             "tiktoken's ids for every text")
    return tok


def find_tiktoken_file(directory: str | os.PathLike) -> Path | None:
    """The one `.tiktoken` file in `directory` (None if there is none; an error if there are several)."""
    files = sorted(Path(directory).glob("*.tiktoken"))
    if len(files) > 1:
        raise TokenizerError(f"{directory}: several .tiktoken files ({', '.join(f.name for f in files)}); name one")
    return files[0] if files else None


def _read_for_loader(path: Path) -> Tokenizer | None:
    """`load_tokenizer`'s hook: a .tiktoken file, or a directory with one and no tokenizer.json; else None."""
    if path.suffix == ".tiktoken":
        return load_tiktoken(path)
    if path.is_dir() and not (path / "tokenizer.json").exists():
        found = find_tiktoken_file(path)
        return load_tiktoken(found) if found is not None else None
    return None


FILE_READERS.append(_read_for_loader)
