"""The `lmforge` command line.

Each module in this package adds one group of subcommands through a `register(subparsers)` function and sets
`func` on its parsers; the function receives the parsed `argparse.Namespace`. Modules are discovered here, so a
new stage adds a file and nothing else. The CLI only parses arguments into a recipe's config and calls library
code; it is the one place that turns `LmforgeError` into `error: <one line>` and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from lmforge.errors import LmforgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: tokenizer, pretraining, fine-tuning, generation, serving and compression of LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge ... | head`
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
