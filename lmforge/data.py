"""Data: the embedded default corpus (and, as pretraining lands, token shards and datasets).

The embedded corpus needs no download: it is text every Python install carries — the reference manual topics
shipped in ``pydoc_data.topics`` (the pages `help("if")` shows) and the docstrings of a fixed list of standard
library modules. It is English technical prose with code samples, about 0.5-1 MB: enough to train a small
tokenizer and a small language model on 2 CPU cores and watch it learn.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

# A fixed, ordered list so the corpus is the same text on every machine with the same Python version.
_STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics", "string", "stringprep", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib", "uuid", "warnings", "wave", "weakref", "xml",
    "zipfile", "zipimport", "zlib",
)


def _module_docs(name: str) -> list[str]:
    """Docstrings of a module and its public classes and functions (in source order), de-indented."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # a module missing from a stripped-down Python build is simply skipped
        return []
    docs = []
    if mod.__doc__:
        docs.append(inspect.cleandoc(mod.__doc__))
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return docs


def builtin_documents() -> list[str]:
    """The embedded corpus as a list of documents (pydoc topics first, then stdlib docstrings)."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    with warnings.catch_warnings():  # touching deprecated aliases (typing.re, typing.io) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _STDLIB_MODULES:
            docs.extend(_module_docs(name))
    seen, unique = set(), []
    for d in docs:  # several names alias one object: keep the first copy
        if d and d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def builtin_corpus(separator: str = "\n\n") -> str:
    """The embedded default corpus as one string (documents joined by a blank line).

    >>> text = builtin_corpus()
    >>> len(text) > 400_000
    True
    """
    return separator.join(builtin_documents())
