"""lmforge.rag: retrieval-augmented generation as a few plain, composable steps.

A language model answers from what it memorized in training: nothing about your documents, nothing newer than its
data, and, when it does not know, a fluent guess (a *hallucination*). RAG fixes the first two and limits the third:
find the passages of your documents that bear on the question, put them in the prompt as numbered sources, and ask
the model to answer only from them, citing [n].

    load -> chunk -> embed -> store -> retrieve -> answer

    from lmforge.rag import Loader, Chunker, HashingEmbedder, EmbeddedStore, Indexer, IndexManifest, DenseRetriever
    docs = Loader().load(["notes/"]).documents                 # loaders.py: txt, md, html, pdf, jsonl, SQuAD json
    emb = HashingEmbedder()                                     # embedders.py: or LmforgeEmbedder() (MiniLM)
    chunker = Chunker.for_embedder(emb, max_tokens=128)         # chunker.py: counts the embedder's own tokens
    store = EmbeddedStore.create("idx", IndexManifest.new(emb, chunker))   # store.py (or PgVectorStore)
    Indexer(store, emb, chunker).index(docs)                    # ingest.py: incremental, by content hash
    hits = DenseRetriever(store, emb).retrieve("who founded it?", k=5)    # retrievers.py: BM25, hybrid, rerank
    answer = Answerer(retriever, generator).ask("who founded it?")        # answer.py: grounded, cited [n]

Each module's docstring teaches its step; docs/rag.md walks through them with commands that run offline.
"""

from lmforge.rag.answer import Answer, Answerer, LmforgeGenerator, OpenAIGenerator, summarize
from lmforge.rag.bm25 import BM25, bm25_tokenize
from lmforge.rag.chunker import Chunk, Chunker, ChunkerSettings
from lmforge.rag.embedders import (Embedder, EmbedderInfo, HashingEmbedder, LmforgeEmbedder, OpenAIEmbedder, info_of,
                        make_embedder)
from lmforge.rag.index import open_index, open_store
from lmforge.rag.ingest import Indexer, IngestReport, content_hash
from lmforge.rag.loaders import Document, Loader, LoadResult
from lmforge.rag.retrievers import (BM25Retriever, CrossEncoderReranker, DenseRetriever, HybridRetriever, RerankingRetriever,
                         rrf)
from lmforge.rag.store import EmbeddedStore, Hit, IndexManifest, Store

__all__ = [
    "Answer", "Answerer", "LmforgeGenerator", "OpenAIGenerator", "summarize", "BM25", "bm25_tokenize", "Chunk",
    "Chunker", "ChunkerSettings", "Embedder", "EmbedderInfo", "HashingEmbedder", "LmforgeEmbedder", "OpenAIEmbedder",
    "info_of", "make_embedder", "open_index", "open_store", "Indexer", "IngestReport", "content_hash", "Document",
    "Loader", "LoadResult", "BM25Retriever", "CrossEncoderReranker", "DenseRetriever", "HybridRetriever",
    "RerankingRetriever", "rrf", "EmbeddedStore", "Hit", "IndexManifest", "Store",
]
