"""`lmforge embed MODEL --input FILE`: sentence embeddings as JSON lines.

    lmforge embed all-MiniLM-L6-v2/ --input texts.txt > vectors.jsonl      # one text per non-blank line
    lmforge embed MODEL --input docs.jsonl --output vectors.jsonl         # {"text": ...} per line
    echo "A man is eating food." | lmforge embed MODEL --input -

Each output line: {"index": i, "embedding": [...], "tokens": n, "truncated": k}; `truncated` counts the word
pieces cut from a text longer than the model's max_seq_length (also summed on stderr), so no cut goes unnoticed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="sentence embeddings of texts with an encoder (JSON lines out)")
    p.add_argument("model", help="encoder directory (e.g. sentence-transformers all-MiniLM-L6-v2) or Hub id")
    p.add_argument("--input", required=True, help="text file (one text per non-blank line), .jsonl with "
                   "{\"text\": ...} per line, or - for stdin")
    p.add_argument("--output", default=None, help="write JSON lines here (atomically) instead of stdout")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--no-normalize", action="store_true", help="keep raw pooled vectors (default: unit length)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps, auto")
    p.set_defaults(func=cmd_embed)


def read_texts(source: str) -> list[str]:
    """Texts from a .jsonl file ({"text": ...} or a JSON string per line) or a plain file (non-blank lines)."""
    if source == "-":
        raw, name = sys.stdin.read(), "stdin"
    else:
        try:
            raw, name = Path(source).read_text(encoding="utf-8"), source
        except FileNotFoundError:
            raise DataError(f"{source}: file not found") from None
        except UnicodeDecodeError:
            raise DataError(f"{source}: not a UTF-8 text file") from None
    if not name.endswith(".jsonl"):
        return [line for line in raw.splitlines() if line.strip()]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{n}: not valid JSON ({e.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise DataError(f"{name}:{n}: expected {{\"text\": \"...\"}} or a JSON string")
        texts.append(text)
    return texts


def load_encoder(model: str, dtype="auto", device=None):
    """An encoder directory through its own reader; anything else through `lmforge.load`."""
    from lmforge.encoder_lm import load_encoder_dir
    from lmforge.formats.bert import is_encoder_dir

    if Path(model).is_dir() and is_encoder_dir(model):
        return load_encoder_dir(model, dtype, device)
    import lmforge

    return lmforge.load(model, dtype=dtype, device=device)


def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.encoder_lm import embed
    from lmforge.utils import atomic_write

    texts = read_texts(args.input)
    if not texts:
        raise DataError(f"{args.input}: no texts to embed")
    lm = load_encoder(args.model, args.dtype, args.device)
    if not getattr(lm, "is_encoder", False):
        embed(lm, texts)  # raises the one-line "is a decoder" error
    res = lm.embed_with_info(texts, normalize=not args.no_normalize, batch_size=args.batch_size)
    lines = (json.dumps({"index": i, "embedding": v, "tokens": n, "truncated": k}) + "\n"
             for i, (v, n, k) in enumerate(zip(res.embeddings.tolist(), res.num_tokens, res.num_truncated)))
    if args.output:
        with atomic_write(args.output) as f:
            f.writelines(lines)
    else:
        sys.stdout.writelines(lines)
    cut = sum(1 for k in res.num_truncated if k)
    if cut:
        print(f"warning: {cut} of {len(texts)} texts were longer than max_seq_length={lm.max_seq_length} word "
              "pieces and were truncated (see \"truncated\" per line)", file=sys.stderr)
    print(f"embedded {len(texts)} texts with {lm.config.name or args.model} ({lm.dim} dims, pooling={lm.pooling})",
          file=sys.stderr)
    return 0
