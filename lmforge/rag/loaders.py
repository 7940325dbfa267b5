"""Loaders: files on disk -> `Document`s (an id, plain text, where it came from, and page starts).

RAG starts by turning whatever the user has (notes, web pages, PDFs, exported records) into plain text while
remembering where each character came from, so that an answer can later cite "report.pdf, page 3". One loader per
format, chosen by file extension:

| extension        | what becomes a document                                                                |
| ---------------- | -------------------------------------------------------------------------------------- |
| .txt .md .rst    | the whole file (UTF-8; a file that is not UTF-8 is skipped and listed, never guessed)  |
| .html .htm       | the visible text: <script>/<style> dropped, block elements (p, li, h1...) end a line    |
| .pdf             | the text of every page (pypdf); `pages` records where each page starts                 |
| .jsonl           | one document per line: {"text": ..., "id"?: ..., "source"?: ..., any other metadata}   |
| .json (SQuAD)    | one document per paragraph `context` of a SQuAD v1/v2 file, its article title as meta  |

A document id is stable across runs (the file's absolute path, plus `#line` or `#title/paragraph` for records), so
re-indexing the same folder updates documents instead of duplicating them.

Bad input never stops the run: an unreadable PDF, a non-UTF-8 file or a malformed JSONL line is skipped with a
one-line reason, the other files load, and `LoadResult.skipped` lists what was left out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.errors import DataError

TEXT_EXTS = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_EXTS = {".html", ".htm", ".xhtml"}
LOADABLE = TEXT_EXTS | HTML_EXTS | {".pdf", ".jsonl", ".json"}


@dataclass
class Document:
    """One unit of ingest. `pages` holds (char offset, page number) pairs, page numbers from 1, sorted."""

    id: str
    text: str
    source: str
    pages: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def page_at(self, offset: int) -> int | None:
        """Page holding character `offset` (None for documents without pages)."""
        page = None
        for start, number in self.pages:
            if start > offset:
                break
            page = number
        return page


@dataclass
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)


# ---------------------------------------------------------------------------------------------------------------

def read_utf8(path: Path) -> str:
    """The file's text; DataError when it is not UTF-8 (a BOM is dropped)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); convert it with "
                        f"iconv -t UTF-8") from None


def load_text(path: Path) -> list[Document]:
    return [Document(id=str(path), text=read_utf8(path), source=str(path))]


class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "h1", "h2",
             "h3", "h4", "h5", "h6", "pre", "blockquote", "title", "dd", "dt", "hr", "main", "nav", "aside"}
    SKIP = {"script", "style", "noscript", "template", "svg", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in self.SKIP:
            self.skip += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article")
                              else "\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(visible text, title). '<p>Hi <b>there</b></p><script>x()</script>' -> ('Hi there', '')."""
    p = _HTMLText()
    p.feed(html)
    p.close()
    lines = [" ".join(line.split()) for line in "".join(p.parts).split("\n")]
    text, blank = [], False
    for line in lines:  # collapse runs of blank lines into one paragraph break
        if line:
            text.append(line)
            blank = False
        elif not blank and text:
            text.append("")
            blank = True
    return "\n".join(text).strip(), " ".join(p.title.split())


def load_html(path: Path) -> list[Document]:
    text, title = html_to_text(read_utf8(path))
    return [Document(id=str(path), text=text, source=str(path), meta={"title": title} if title else {})]


def load_pdf(path: Path) -> list[Document]:
    try:
        import pypdf
    except ImportError:
        raise DataError(f"{path}: reading PDF needs pypdf (pip install 'lmforge[rag]')") from None
    try:
        reader = pypdf.PdfReader(str(path))
        if reader.is_encrypted:
            raise DataError(f"{path}: PDF is encrypted")
        texts = [page.extract_text() or "" for page in reader.pages]
    except DataError:
        raise
    except Exception as e:  # pypdf raises many types (PdfReadError, ValueError, KeyError...) on broken files
        raise DataError(f"{path}: unreadable PDF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    parts, pages, offset = [], [], 0
    for number, t in enumerate(texts, 1):
        t = t.strip()
        if not t:
            continue
        if parts:
            parts.append("\n\n")
            offset += 2
        pages.append((offset, number))
        parts.append(t)
        offset += len(t)
    return [Document(id=str(path), text="".join(parts), source=str(path), pages=pages)]


def load_jsonl(path: Path) -> tuple[list[Document], list[tuple[str, str]]]:
    docs, skipped = [], []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append((f"{path}:{n}", f"not JSON ({e.msg})"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            skipped.append((f"{path}:{n}", "no string field 'text'"))
            continue
        rid = str(rec.get("id", n))
        meta = {k: v for k, v in rec.items() if k not in ("text", "id", "source") and _scalar(v)}
        docs.append(Document(id=f"{path}#{rid}", text=rec["text"], source=str(rec.get("source") or f"{path}#{rid}"),
                             meta=meta))
    return docs, skipped


def _scalar(v) -> bool:
    return isinstance(v, (str, int, float, bool)) or v is None


def load_squad(path: Path, data: dict | None = None) -> list[Document]:
    """Every paragraph context of a SQuAD file is one document, id `path#title/i` with meta {'title': title}."""
    data = data if data is not None else json.loads(read_utf8(path))
    docs = []
    for article in data["data"]:
        title = article.get("title", "")
        for i, para in enumerate(article["paragraphs"]):
            docs.append(Document(id=f"{path}#{title}/{i}", text=para["context"], source=f"{path}#{title}/{i}",
                                 meta={"title": title}))
    return docs


def is_squad(data) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("data"), list) and bool(data["data"])
            and isinstance(data["data"][0], dict) and "paragraphs" in data["data"][0])


def load_json(path: Path) -> list[Document]:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not is_squad(data):
        raise DataError(f"{path}: JSON that is not SQuAD-shaped ({{'data': [{{'paragraphs': ...}}]}}); use JSONL "
                        f"with a 'text' field per line")
    return load_squad(path, data)


# ---------------------------------------------------------------------------------------------------------------

def iter_files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files named, and loadable files under folders named (recursively, sorted, hidden entries skipped)."""
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    f = Path(root) / name
                    if not name.startswith(".") and f.suffix.lower() in LOADABLE:
                        yield f
        elif p.exists():
            yield p
        else:
            raise DataError(f"{p}: no such file or folder")


def load_file(path: Path) -> tuple[list[Document], list[tuple[str, str]]]:
    """(documents, skipped records) of one file; DataError when the whole file cannot be read."""
    path = Path(os.path.abspath(path))
    ext = path.suffix.lower()
    if ext in TEXT_EXTS:
        return load_text(path), []
    if ext in HTML_EXTS:
        return load_html(path), []
    if ext == ".pdf":
        return load_pdf(path), []
    if ext == ".jsonl":
        return load_jsonl(path)
    if ext == ".json":
        return load_json(path), []
    raise DataError(f"{path}: unsupported file type {ext or '(none)'!r}; loadable: {', '.join(sorted(LOADABLE))}")


class Loader:
    """Load files and folders into documents. `load(paths)` -> LoadResult; bad files are skipped and listed."""

    def load(self, paths: Iterable[str | os.PathLike]) -> LoadResult:
        result = LoadResult()
        named = [Path(p) for p in paths]
        for f in iter_files(named):
            try:
                docs, skipped = load_file(f)
            except DataError as e:
                result.skipped.append((str(f), str(e).removeprefix(f"{os.path.abspath(f)}: ").removeprefix(f"{f}: ")))
                continue
            result.documents += [d for d in docs if d.text.strip()]
            result.skipped += skipped
            result.skipped += [(d.source, "no text") for d in docs if not d.text.strip()]
        if not result.documents and not result.skipped:
            raise DataError(f"no loadable documents in {', '.join(map(str, named))} (looked for "
                            f"{', '.join(sorted(LOADABLE))})")
        return result
