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


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)command parser `argv` selects: `finetune sft ...` -> the `sft` parser."""
    for token in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if token in subs[0].choices:
            parser = subs[0].choices[token]
    return parser


def _reject_unknown(parser: argparse.ArgumentParser, argv: list[str], extras: list[str]) -> None:
    """Unknown arguments: the subcommand's own usage, and the closest real flag for a misspelled one."""
    import difflib

    sub = _subparser(parser, argv)
    flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    unknown = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(u, flags, n=1)) else u
             for u in unknown]
    if hints:
        sub.error(f"unrecognized argument{'s' if len(hints) > 1 else ''}: {', '.join(hints)}")
    sub.error(f"unrecognized arguments: {' '.join(extras)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _reject_unknown(parser, argv, extras)
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
