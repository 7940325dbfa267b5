"""`lmforge tokenizer train|encode|decode|info|compare`: train a byte-level BPE, look inside it, compare tokenizers.

    lmforge tokenizer train --vocab-size 2048 --out runs/tok            # the embedded corpus, no download
    lmforge tokenizer encode -t runs/tok --show "The def statement"     # ids and the pieces they stand for
    lmforge tokenizer decode -t runs/tok 464 825 2643
    lmforge tokenizer info -t runs/tok
    lmforge tokenizer compare "Tokenization isn't free: 12345" --tokenizers char,word,../shared/data/gpt2,runs/tok
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lmforge.errors import TokenizerError

# alternating background colours make token boundaries visible (as in the tiktokenizer web app)
_COLOURS = ["\x1b[48;5;153m\x1b[30m", "\x1b[48;5;223m\x1b[30m", "\x1b[48;5;157m\x1b[30m", "\x1b[48;5;217m\x1b[30m"]
_RESET = "\x1b[0m"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train, inspect and run tokenizers",
                              description="Train a byte-level BPE tokenizer and use it.")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="learn a BPE vocabulary from text files (default: the embedded corpus)")
    t.add_argument("files", nargs="*", type=Path, help="UTF-8 text files (none: the embedded stdlib corpus)")
    t.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. 256 bytes and specials")
    t.add_argument("--out", required=True, type=Path, help="a directory (gets tokenizer.json) or a .json path")
    t.add_argument("--special", action="append", default=None, metavar="TOKEN",
                   help="a special token (repeatable; default: <|endoftext|>)")
    t.add_argument("--pattern", default="gpt2", help="pre-tokenization: gpt2, gpt4, llama3 or a regex")
    t.add_argument("--kind", choices=["bpe", "word", "char"], default="bpe",
                   help="bpe (default), or the teaching baselines word / char")
    t.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: CPU count)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("encode", help="text -> token ids")
    _tok_arg(e)
    e.add_argument("text", nargs="?", help="text to encode (default: --file or stdin)")
    e.add_argument("--file", type=Path, help="encode this file instead")
    e.add_argument("--show", action="store_true", help="print each token's piece, coloured")
    e.add_argument("--allow-special", action="store_true",
                   help="encode special-token text such as <|endoftext|> as its id (default: an error)")
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="token ids -> text")
    _tok_arg(d)
    d.add_argument("ids", nargs="*", help="ids (space or comma separated; default: stdin)")
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("info", help="vocabulary size, special tokens, first merges, compression ratio")
    _tok_arg(i)
    i.add_argument("--sample", type=Path, help="text file to measure bytes/token on (default: embedded corpus)")
    i.add_argument("--merges", type=int, default=10, help="how many first merges to print")
    i.set_defaults(func=cmd_info)


    c = sub.add_parser("compare", help="how several tokenizers split the same text (pieces, counts, chars/token)",
                       description="Show the pieces each tokenizer cuts the text into, with token counts and "
                                   "characters per token.")
    c.add_argument("text", nargs="?", help="text to split (default: --file or stdin)")
    c.add_argument("--file", type=Path, help="split this file's text instead")
    c.add_argument("--tokenizers", required=True, action="append", metavar="A,B,...",
                   help="comma-separated (repeatable): char or word (teaching tokenizers trained on the embedded "
                        "corpus: unseen words/characters become <|unk|>), a tokenizer.json, a model directory, a "
                        ".tiktoken file, a llama2.c tokenizer .bin, a folder with GPT-2's encoder.json + vocab.bpe, "
                        "an OpenAI encoding name (cl100k_base, o200k_base, ...; downloaded once) or a Hub id "
                        "(owner/name; downloads its tokenizer files)")
    c.set_defaults(func=cmd_compare)


def _tok_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--tokenizer", required=True, type=Path,
                   help="tokenizer.json, or a directory holding one (e.g. a model directory)")


def _load(path: Path):
    from lmforge.tokenizers import load_tokenizer

    return load_tokenizer(path)


def _use_colour() -> bool:
    return sys.stdout.isatty() and os.environ.get("NO_COLOR") is None


def _visible(piece: bytes) -> str:
    text = piece.decode("utf-8", errors="replace")
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.training.data import builtin_corpus
    from lmforge.tokenizers.bpe import ENDOFTEXT, Tokenizer
    from lmforge.tokenizers.basic import CharTokenizer, WordTokenizer

    from lmforge.utils import check_parents

    check_parents(args.out if args.out.suffix == ".json" else args.out / "tokenizer.json")  # before training
    sources = list(args.files) if args.files else [builtin_corpus()]
    label = ", ".join(str(f) for f in args.files) if args.files else "the embedded corpus"
    specials = args.special if args.special is not None else [ENDOFTEXT]
    t0 = time.perf_counter()
    if args.kind == "bpe":
        tok = Tokenizer.train(sources, args.vocab_size, special_tokens=specials, pattern=args.pattern,
                              num_workers=args.workers)
    else:
        cls = WordTokenizer if args.kind == "word" else CharTokenizer
        tok = cls.train(sources, None if args.kind == "char" else args.vocab_size)
    dt = time.perf_counter() - t0
    out = tok.save(args.out)
    print(f"trained a {args.kind} tokenizer on {label}: vocab {tok.vocab_size}, {len(tok.merges)} merges, "
          f"{len(tok.special_tokens)} special token(s) in {dt:.1f}s")
    if args.kind == "bpe" and tok.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs to merge: vocab {tok.vocab_size} < --vocab-size {args.vocab_size}")
    print(f"saved {out}")
    if tok.merges:
        shown = ", ".join(f"{_visible(a)!r}+{_visible(b)!r}" for a, b in tok.merges[:8])
        print(f"first merges: {shown}")
    example = "def tokenize(text): return text.split()  # 42 tokens?"
    ids = tok.encode(example)
    print(f"example: {example!r} -> {len(ids)} tokens: " + "".join(f"[{_visible(tok.vocab[i])}]" for i in ids))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from lmforge.tokenizers.bpe import read_text_file

    tok = _load(args.tokenizer)
    if args.file is not None:
        text = read_text_file(args.file)
    elif args.text is not None:
        text = args.text
    else:
        text = sys.stdin.read()
    ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    if not args.show:
        print(" ".join(map(str, ids)))
        return 0
    colour = _use_colour()
    parts = []
    for k, i in enumerate(ids):
        piece = _visible(tok.vocab[i])
        parts.append(f"{_COLOURS[k % len(_COLOURS)]}{piece}{_RESET}" if colour else f"[{piece}]")
    print("".join(parts))
    print(" ".join(map(str, ids)))
    n_bytes = len(text.encode("utf-8"))
    print(f"{len(ids)} tokens, {n_bytes} bytes, {n_bytes / max(1, len(ids)):.2f} bytes/token")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer)
    raw = " ".join(args.ids) if args.ids else sys.stdin.read()
    try:
        ids = [int(x) for x in raw.replace(",", " ").split()]
    except ValueError:
        bad = next(x for x in raw.replace(",", " ").split() if not x.lstrip("-").isdigit())
        raise TokenizerError(f"token id {bad!r} is not an integer") from None
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from lmforge.training.data import builtin_corpus
    from lmforge.tokenizers.bpe import Tokenizer, pattern_name, read_text_file

    tok = _load(args.tokenizer)
    print(f"kind:            {type(tok).__name__} ({getattr(tok, 'kind', '?')})")
    print(f"vocab size:      {tok.vocab_size}")
    print(f"merges:          {len(tok.merges)}")
    pattern = getattr(tok, "pattern", None)
    if pattern:
        print(f"pre-tokenizer:   {pattern_name(pattern)}")
    specials = ", ".join(f"{s}={i}" for s, i in tok.special_tokens.items()) or "(none)"
    print(f"special tokens:  {specials}")
    print(f"bos / eos / pad: {tok.bos_token_id} / {tok.eos_token_id} / {tok.pad_token_id}"
          f"   add_bos_token: {tok.add_bos_token}")
    print(f"chat template:   {'yes' if tok.chat_template else 'no'}")
    for k, (a, b) in enumerate(tok.merges[:args.merges]):
        print(f"  merge {k:>4}: {_visible(a)!r} + {_visible(b)!r} -> {_visible(a + b)!r}")
    # byte-level BPE pre-tokenizes, so any length is fast; other kinds (llama2.c's BPE merges over the whole
    # string) can be quadratic in the length of one encode call: give them a smaller sample, paragraph by paragraph
    limit = 200_000 if isinstance(tok, Tokenizer) else 20_000
    sample = (read_text_file(args.sample) if args.sample else builtin_corpus())[:limit]
    getattr(tok, "has_fast_path", None)  # build the tiktoken fast path before timing
    t0 = time.perf_counter()
    ids = [i for para in sample.split("\n\n") if para for i in tok.encode(para, disallowed_special=())]
    dt = time.perf_counter() - t0
    n_bytes = len(sample.replace("\n\n", "").encode("utf-8"))
    where = f"{limit // 1000} KB of {args.sample or 'the embedded corpus'}"
    print(f"compression:     {n_bytes / max(1, len(ids)):.2f} bytes/token on {where} "
          f"({len(ids)} tokens, {n_bytes / max(dt, 1e-9) / 1e6:.1f} MB/s)")
    return 0


def resolve_tokenizer(spec: str):
    """A tokenizer from one `compare` spec (see its --tokenizers help)."""
    from lmforge.tokenizers import CharTokenizer, Tokenizer, WordTokenizer

    if spec in ("char", "word"):
        from lmforge.training.data import builtin_corpus

        return (CharTokenizer if spec == "char" else WordTokenizer).train([builtin_corpus()])
    path = Path(spec)
    if path.is_dir() and (path / "encoder.json").exists() and (path / "vocab.bpe").exists() and not (
            path / "tokenizer.json").exists():  # OpenAI's GPT-2 release files
        return Tokenizer.from_gpt2_files(path / "encoder.json", path / "vocab.bpe")
    if path.exists():
        return _load(path)
    from lmforge.tokenizers.tiktoken_file import FILES, load_tiktoken

    if spec in FILES:  # an OpenAI encoding by name: downloaded once, then cached
        return load_tiktoken(spec)
    from lmforge.loader import HUB_ID, download

    if "/" in spec and HUB_ID.match(spec):
        return _load(download(spec, config_only=True))
    raise TokenizerError(f"tokenizer {spec!r}: not char, word, an existing file or directory, an OpenAI encoding "
                         "name, nor a Hub id (owner/name)")


def cmd_compare(args: argparse.Namespace) -> int:
    from lmforge.tokenizers.bpe import read_text_file
    from lmforge.tokenizers.compare import compare_tokenizers, format_comparison

    specs = [s.strip() for group in args.tokenizers for s in group.split(",") if s.strip()]
    if not specs:
        raise TokenizerError("--tokenizers names no tokenizer")
    if args.file is not None:
        text = read_text_file(args.file)
    else:
        text = args.text if args.text is not None else sys.stdin.read()
    names = [s if s in ("char", "word") or not Path(s).exists() else Path(s).resolve().name for s in specs]
    if len(set(names)) < len(names):  # two paths with the same last part: show them in full
        names = specs
    tokenizers = {name: resolve_tokenizer(spec) for name, spec in zip(names, specs)}
    splits = compare_tokenizers(text, tokenizers)
    colour = _use_colour()
    print(format_comparison(text, splits, colours=_COLOURS if colour else None, reset=_RESET if colour else ""))
    return 0
