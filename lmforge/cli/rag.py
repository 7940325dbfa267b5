"""`lmforge rag`: index a folder of documents, query it, and answer questions grounded in it.

    lmforge rag index notes/ papers/ --index idx                # MiniLM embeddings, embedded store in ./idx
    lmforge rag index notes/ --index idx --embedder hashing      # no model: feature-hashing embedder
    lmforge rag index notes/ --index idx --store postgresql://me@localhost/rag   # PostgreSQL + pgvector
    lmforge rag query "who founded it?" --index idx -k 5 --json  # one JSON object per hit
    lmforge rag ask "who founded it?" --index idx --model runs/chat            # any lmforge model ...
    lmforge rag ask "who founded it?" --index idx --model http://127.0.0.1:8000/v1#demo   # ... or endpoint
    lmforge rag ask "who founded it?" --index idx --reader runs/minilm-qa    # extractive: quote a span
    lmforge rag delete --index idx /abs/path/old.md              # by document id
    lmforge rag summarize report.pdf --model runs/chat           # map-reduce over chunks

Ingest is incremental: run `index` again and unchanged documents are skipped by content hash; `--prune` also removes
documents that are no longer there. Files that cannot be read are listed and skipped; the rest are indexed.
Two `index` (or `delete`) runs on one embedded index take turns: the second waits for the first's writer lock up to
--lock-timeout seconds, then stops with a one-line error naming the writer. Queries never wait.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lmforge.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rag", help="retrieval-augmented generation: index documents, query, grounded answers",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="rag_command", metavar="STEP")

    def common(q, need_index=True):
        q.add_argument("--index", required=need_index, help="index directory (or a postgres:// URL)")
        q.add_argument("--embedder", default=None, help="minilm (default), hashing[:DIM], an encoder directory, or "
                                                        "http(s)://host/v1#MODEL (an OpenAI-compatible endpoint)")
        q.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                       help="key for http(s) embedders/models (default: $OPENAI_API_KEY)")

    def lock_timeout(q):
        q.add_argument("--lock-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="when another process is writing the index, wait this long for it (default 60; 0: fail "
                            "at once)")

    q = sub.add_parser("index", help="load, chunk, embed and store documents (incremental)")
    q.add_argument("docs", nargs="+", help="files and folders (txt, md, html, pdf, jsonl, SQuAD json)")
    common(q)
    q.add_argument("--store", default="sqlite", help="sqlite (embedded, default) or a postgres:// URL")
    q.add_argument("--chunk-tokens", type=int, default=None, help="chunk size in the embedder's tokens "
                                                                  "(default: the embedder's limit)")
    q.add_argument("--overlap", type=int, default=None, help="overlap between chunks, in tokens (default 32)")
    q.add_argument("--batch-size", type=int, default=64, help="chunks embedded per batch")
    q.add_argument("--prune", action="store_true", help="delete indexed documents not seen in this run")
    lock_timeout(q)
    q.set_defaults(func=cmd_index)

    q = sub.add_parser("query", help="retrieve the chunks nearest to a question")
    q.add_argument("question")
    common(q)
    q.add_argument("-k", type=int, default=5, help="hits to return")
    q.add_argument("--retriever", default="hybrid", choices=["hybrid", "dense", "bm25"])
    q.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep chunks whose source, doc_id, page or metadata KEY equals VALUE (repeatable)")
    q.add_argument("--json", action="store_true", help="one JSON object per hit (source, start, end, score, text)")
    q.set_defaults(func=cmd_query)

    q = sub.add_parser("ask", help="answer a question from the index, citing sources as [n]")
    q.add_argument("question")
    common(q)
    q.add_argument("--model", default=None, help="lmforge model directory, or http(s)://host/v1#MODEL")
    q.add_argument("--reader", default=None, metavar="DIR",
                   help="instead of --model: an encoder with a question-answering head (lmforge finetune qa); the "
                        "answer is a span quoted from the best source, or a refusal when no source holds one")
    q.add_argument("-k", type=int, default=4, help="sources given to the model")
    q.add_argument("--retriever", default="hybrid", choices=["hybrid", "dense", "bm25"])
    q.add_argument("--min-score", type=float, default=None,
                   help="refuse when the best hit scores below this (the retriever's scale)")
    q.add_argument("--max-new-tokens", type=int, default=200)
    q.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--json", action="store_true", help="the answer, citations, dropped citations and sources as JSON")
    q.set_defaults(func=cmd_ask)

    q = sub.add_parser("delete", help="delete documents from an index by id")
    q.add_argument("ids", nargs="+")
    q.add_argument("--index", required=True)
    lock_timeout(q)
    q.set_defaults(func=cmd_delete)

    q = sub.add_parser("summarize", help="summarize a long document by map-reduce over its chunks")
    q.add_argument("file")
    q.add_argument("--model", required=True, help="lmforge model directory, or http(s)://host/v1#MODEL")
    q.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in the model's tokens")
    q.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    q.set_defaults(func=cmd_summarize)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _filters(items: list[str]) -> dict | None:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--filter {item!r}: expected KEY=VALUE")
        out.setdefault(key, []).append(value)
    return out or None


def _lock_timeout(args: argparse.Namespace) -> float:
    if not args.lock_timeout >= 0:  # also refuses nan
        raise ConfigError(f"--lock-timeout must be >= 0 seconds, got {args.lock_timeout}")
    return args.lock_timeout


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_index(args: argparse.Namespace) -> int:
    from lmforge.rag import Chunker, IndexManifest, Indexer, Loader, make_embedder
    from lmforge.rag.index import open_store
    from lmforge.rag.store import is_index_dir

    lock_timeout = _lock_timeout(args)
    loaded = Loader().load(args.docs)
    for path, why in loaded.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    spec, size, overlap = args.embedder, args.chunk_tokens, args.overlap
    if is_index_dir(args.index):  # an existing index: its own embedder and chunking unless told otherwise
        with open(os.path.join(args.index, "index.json"), encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("store") != "postgres":
            spec = spec or raw.get("embedder_source")
            size = size or raw["chunker"]["max_tokens"]
            overlap = raw["chunker"]["overlap_tokens"] if overlap is None else overlap
    embedder = make_embedder(spec, api_key=args.api_key)
    chunker = Chunker.for_embedder(embedder, max_tokens=size, overlap_tokens=32 if overlap is None else overlap)
    store = open_store(args.index, manifest=IndexManifest.new(embedder, chunker), store_url=args.store,
                       lock_timeout=lock_timeout, on_wait=_progress)
    report = Indexer(store, embedder, chunker, batch_size=args.batch_size, progress=_progress).index(
        loaded.documents, prune=args.prune)
    report.skipped = loaded.skipped
    print(f"{args.index}: {report.summary()}; {store.count()} chunks in the index")
    store.close()
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from lmforge.rag import open_index

    ix = open_index(args.index, embedder=args.embedder, api_key=args.api_key)
    hits = ix.retriever(args.retriever).retrieve(args.question, k=args.k, filter=_filters(args.filter))
    for n, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps(h.to_dict(), ensure_ascii=False))
        else:
            c = h.chunk
            where = f"{c.source}" + (f" p.{c.page}" if c.page is not None else "") + f" [{c.start}:{c.end}]"
            print(f"{n}. {h.score:.4f}  {where}\n   {' '.join(c.text.split())[:300]}")
    if not hits and not args.json:
        print("no hits")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from lmforge.rag import Answerer, open_index
    from lmforge.rag.answer import make_generator

    if (args.model is None) == (args.reader is None):
        raise ConfigError("rag ask needs exactly one of --model (a generator) or --reader (an extractive QA model)")
    ix = open_index(args.index, embedder=args.embedder, api_key=args.api_key)
    if args.reader:
        from lmforge.rag.answer import QAReader

        answerer = Answerer(ix.retriever(args.retriever), reader=QAReader(args.reader), k=args.k,
                            min_score=args.min_score)
    else:
        generator = make_generator(args.model, api_key=args.api_key, max_new_tokens=args.max_new_tokens)
        answerer = Answerer(ix.retriever(args.retriever), generator, k=args.k, min_score=args.min_score)
    ans = answerer.ask(args.question, filter=_filters(args.filter))
    if args.json:
        print(json.dumps(ans.to_dict(), ensure_ascii=False))
        return 0
    print(ans.text)
    if ans.dropped:
        print(f"(dropped citations that match no source: {', '.join(f'[{n}]' for n in ans.dropped)})")
    for n, h in ans.citations.items():
        c = h.chunk
        print(f"[{n}] {c.source}" + (f" p.{c.page}" if c.page is not None else "") + f" [{c.start}:{c.end}]")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from lmforge.rag.index import open_store

    store = open_store(args.index, writer=True, lock_timeout=_lock_timeout(args), on_wait=_progress)
    have = store.doc_hashes()
    gone = [d for d in args.ids if d in have]
    store.delete(gone)
    store.commit()
    missing = [d for d in args.ids if d not in have]
    print(f"{args.index}: deleted {len(gone)} document(s)" + (f"; not in the index: {', '.join(missing)}"
                                                                if missing else ""))
    store.close()
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    from lmforge.rag import Chunker, HashingEmbedder, Loader
    from lmforge.rag.answer import make_generator, summarize

    docs = Loader().load([args.file])
    if not docs.documents:
        raise ConfigError(f"{args.file}: nothing to summarize ({'; '.join(w for _, w in docs.skipped)})")
    gen = make_generator(args.model, api_key=args.api_key)
    tok = getattr(getattr(gen, "lm", None), "tokenizer", None)
    count = (lambda t: len(tok.encode(t))) if tok is not None else HashingEmbedder().count_tokens
    chunker = Chunker(count, args.chunk_tokens, 0)
    chunks = [c.text for d in docs.documents for c in chunker.chunk(d)]
    print(summarize(chunks, gen, count, max_input_tokens=args.chunk_tokens * 2, progress=_progress))
    return 0
