"""Token classification (NER, POS): one label per token, grouped back into words and entities.

Named-entity recognition labels each word with a tag in the BIO scheme (Ramshaw & Marcus 1995; CoNLL-2003):

    words   Angela  Merkel  visited  New    York   .
    tags    B-PER   I-PER   O        B-LOC  I-LOC  O        B- begins an entity, I- continues it, O is outside

The model sees word *pieces*, not words ("Merkel" -> "mer", "##kel"), so two alignment problems appear:

Training (words -> pieces): `align_labels` gives each word's tag to its first piece and -100 (ignored by the
loss) to the other pieces and to [CLS]/[SEP], as transformers' token-classification examples do; with
`label_all_tokens` the later pieces get the tag too (a B- becomes I- there, so an entity still begins once).

Inference (pieces -> entities): `token_classification` predicts a label per piece and groups them the way
transformers' token-classification pipeline does under each `aggregation_strategy` (tests/test_ner.py checks
every one against it on the same weights):

    none     one entry per piece: {"entity", "score", "index", "word", "start", "end"}
    simple   adjacent pieces with the same tag type merge into one entity (B- starts a new one); the entity's
             score is the mean of its pieces' scores: {"entity_group", "score", "word", "start", "end"}
    first    first fuse pieces into words: a word takes the label of its *first* piece, then group as simple
    average  a word takes the label with the highest *mean* probability over its pieces
    max      a word takes the label of its most confident piece

"first", "average" and "max" never split a word between two entities ("Mer|kel" as PER + ORG), which "simple"
can. A piece continues a word when its text in the input is shorter than the piece (the "##" is not in the
text), so "New York" stays two words and "Merkel" one. Labels in `ignore_labels` ("O") are dropped.

Long texts and `stride`. The encoder reads at most max_seq_length pieces ([CLS] and [SEP] included). Without
`stride` a longer text is cut there (as transformers does), and the cut is reported: a `TruncationWarning` naming
how many texts lost pieces (`on_truncation="error"` makes it a DataError). With `stride=k` the whole text is read,
in overlapping windows, the way transformers' pipeline does it with a fast tokenizer
(`return_overflowing_tokens=True, stride=k`):

    pieces          0 .................................................. 300        (max_seq_length 64: 62 a window)
    window 1        [CLS] 0 ........ 62 [SEP]
    window 2        [CLS]       46 ........ 108 [SEP]            next start = previous + (62 - k), k = 16
    ...

Each window is classified and grouped on its own (offsets stay those of the whole text), the windows' entities
are pooled, and where two overlap (an entity in the shared k pieces is found twice) the longer one wins, the
higher score on equal lengths. "none" has nothing to merge, so `stride` needs one of the grouping strategies.

`entities_from_tags` / `ner_metrics` score predictions at the entity level as conlleval (and seqeval's default
mode) do: an entity counts only when its type and both boundaries are right.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.encoder_lm import TruncationWarning
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tasks.common import check_texts, forward_batches, labels_of, task_model
from lmforge.tokenizers.bpe import unicode_to_bytes
from lmforge.tokenizers.roberta import RobertaTokenizer
from lmforge.tokenizers.wordpiece import Encoding
from lmforge.training.batch import token_mean

AGGREGATIONS = ("none", "simple", "first", "average", "max")
Joiner = str | Callable[[Sequence[str]], str]  # see `word_joiner`


# ---- pieces -> text ----------------------------------------------------------------------------------------------
def convert_tokens_to_string(tokens: Sequence[str], prefix: Joiner = "##") -> str:
    """The `tokenizers` WordPiece decoder: "##" pieces glue to the previous one, others get a space, and each
    piece is cleaned up (" ." -> ".", " n't" -> "n't" ...): ["new", "york", "##er", ","] -> "new yorker,".
    `prefix` may instead be a function from pieces to text (`word_joiner` gives one for byte-level BPE)."""
    if callable(prefix):
        return prefix(tokens)
    out = []
    for i, t in enumerate(tokens):
        if i:
            t = t[len(prefix):] if t.startswith(prefix) else " " + t
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            t = t.replace(a, b)
        out.append(t)
    return "".join(out)


def word_joiner(tokenizer) -> Joiner:
    """How a tokenizer's pieces become words again: WordPiece's continuation prefix ("##"), whose pieces say which
    ones continue a word; or, for byte-level BPE (RoBERTa), a function that joins the pieces' bytes, as the
    ByteLevel decoder does. Such pieces do not say whether they continue a word, so, as transformers does for
    tokenizers without a continuation prefix, a piece counts as a continuation when no space precedes it."""
    if isinstance(tokenizer, RobertaTokenizer):
        return _byte_level_join
    return getattr(tokenizer, "prefix", "##")


_CHAR_BYTES = unicode_to_bytes()


def _byte_level_join(tokens: Sequence[str]) -> str:
    """The ByteLevel decoder of `tokenizers`: each character of a piece stands for one byte ("Ġ" for a space);
    a piece with any character outside that alphabet (a word already joined, as grouping passes them) stands for
    its own UTF-8 bytes; the bytes are read as UTF-8 with U+FFFD for what does not decode."""
    out = bytearray()
    for t in tokens:
        mapped = [_CHAR_BYTES.get(ch) for ch in t]
        out += bytes(mapped) if None not in mapped else t.encode("utf-8")
    return out.decode("utf-8", errors="replace")


# ---- grouping (transformers' TokenClassificationPipeline.postprocess, as plain functions) ----------------------
def pre_entities(text: str, encoding, scores: np.ndarray, tokenizer) -> list[dict]:
    """One dict per non-special piece: word (piece string), scores (L,), start, end, index, is_subword."""
    out = []
    prefix = word_joiner(tokenizer)
    for idx, (tok_id, token, (s, e), seq) in enumerate(zip(encoding.ids, encoding.tokens, encoding.offsets,
                                                            encoding.sequence_ids)):
        if seq is None:  # [CLS], [SEP]
            continue
        word_ref = text[s:e]
        is_subword = len(token) != len(word_ref) if isinstance(prefix, str) and prefix \
            else (s > 0 and " " not in text[s - 1:s + 1])
        if tok_id == tokenizer.unk_token_id:
            token, is_subword = word_ref, False
        out.append({"word": token, "scores": scores[idx], "start": s, "end": e, "index": idx,
                    "is_subword": is_subword})
    return out


def _aggregate_word(pieces: list[dict], strategy: str, labels: Sequence[str], prefix: Joiner) -> dict:
    word = convert_tokens_to_string([p["word"] for p in pieces], prefix)
    if strategy == "first":
        scores = pieces[0]["scores"]
    elif strategy == "max":
        scores = max(pieces, key=lambda p: p["scores"].max())["scores"]
    else:  # average
        scores = np.nanmean(np.stack([p["scores"] for p in pieces]), axis=0)
    idx = int(scores.argmax())
    return {"entity": labels[idx], "score": scores[idx], "word": word, "start": pieces[0]["start"],
            "end": pieces[-1]["end"]}


def aggregate_words(pieces: list[dict], strategy: str, labels: Sequence[str], prefix: Joiner = "##") -> list[dict]:
    """Fuse pieces into words (a piece with is_subword joins the word before it) and label each word."""
    words, group = [], None
    for p in pieces:
        if group is None:
            group = [p]
        elif p["is_subword"]:
            group.append(p)
        else:
            words.append(_aggregate_word(group, strategy, labels, prefix))
            group = [p]
    if group is not None:
        words.append(_aggregate_word(group, strategy, labels, prefix))
    return words


def get_tag(label: str) -> tuple[str, str]:
    """("B"|"I", type): "B-PER" -> ("B", "PER"); a label without a BIO prefix counts as a continuation."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def group_entities(entities: list[dict], prefix: Joiner = "##") -> list[dict]:
    """Merge adjacent entries of one type into entities; a B- tag always starts a new one."""
    groups, current = [], []

    def close(ents: list[dict]) -> dict:
        return {"entity_group": ents[0]["entity"].split("-", 1)[-1],
                "score": np.mean(np.nanmean([e["score"] for e in ents])),
                "word": convert_tokens_to_string([e["word"] for e in ents], prefix),
                "start": ents[0]["start"], "end": ents[-1]["end"]}

    for e in entities:
        if current:
            bi, tag = get_tag(e["entity"])
            _, last_tag = get_tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(e)
                continue
            groups.append(close(current))
        current = [e]
    if current:
        groups.append(close(current))
    return groups


def aggregate(pieces: list[dict], strategy: str, labels: Sequence[str], prefix: Joiner = "##") -> list[dict]:
    if strategy in ("none", "simple"):
        entities = []
        for p in pieces:
            idx = int(p["scores"].argmax())
            entities.append({"entity": labels[idx], "score": p["scores"][idx], "index": p["index"], "word": p["word"],
                             "start": p["start"], "end": p["end"]})
    else:
        entities = aggregate_words(pieces, strategy, labels, prefix)
    return entities if strategy == "none" else group_entities(entities, prefix)


def _plain(entity: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else int(v) if isinstance(v, np.integer) else v)
            for k, v in entity.items()}


def aggregate_overlapping_entities(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows -> one list: sorted by start; of two that overlap, the longer one stays
    (the higher score on equal lengths). transformers' TokenClassificationPipeline.aggregate_overlapping_entities."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda x: x["start"])
    out, prev = [], entities[0]
    for e in entities:
        if prev["start"] <= e["start"] < prev["end"]:
            length, prev_length = e["end"] - e["start"], prev["end"] - prev["start"]
            if length > prev_length or (length == prev_length and e["score"] > prev["score"]):
                prev = e
        else:
            out.append(prev)
            prev = e
    out.append(prev)
    return out


def stride_windows(tokenizer, pieces: Encoding, max_length: int, stride: int) -> list[Encoding]:
    """[CLS] window [SEP] encodings over a text's pieces (encoded without special tokens): windows of
    max_length - 2 pieces, each starting (max_length - 2 - stride) after the previous one, the last ending at the
    text's end; equal to a fast tokenizer's `return_overflowing_tokens=True, stride=stride` encodings."""
    budget = max_length - tokenizer.num_special_tokens()
    if not 0 <= stride < budget:
        raise ConfigError(f"stride={stride} must be at least 0 and smaller than the {budget} pieces a window holds "
                          f"(max_seq_length {max_length} minus [CLS] and [SEP])")
    n, spans = len(pieces), []
    for a in range(0, max(n, 1), budget - stride):
        spans.append((a, min(a + budget, n)))
        if a + budget >= n:
            break
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    cls_t, sep_t = tokenizer.id_to_token(cls), tokenizer.id_to_token(sep)
    return [Encoding(ids=[cls] + pieces.ids[a:b] + [sep], tokens=[cls_t] + pieces.tokens[a:b] + [sep_t],
                     offsets=[(0, 0)] + list(pieces.offsets[a:b]) + [(0, 0)],
                     word_ids=[None] + list(pieces.word_ids[a:b]) + [None],
                     sequence_ids=[None] + [0] * (b - a) + [None], type_ids=[0] * (b - a + 2))
            for a, b in spans]


def token_classification(lm: Any, texts: str | Sequence[str], aggregation_strategy: str = "none",
                         ignore_labels: Sequence[str] = ("O",), batch_size: int = 16, stride: int | None = None,
                         on_truncation: str = "warn") -> list:
    """Entities of each text, as transformers' token-classification pipeline returns them (see module docstring).

    One text -> a list of entity dicts; a list of texts -> one such list per text.
    stride: None cuts a text at the model's max_seq_length pieces (reported as `on_truncation` says: "warn", a
        TruncationWarning; "error", a DataError; "ignore"); an int reads the whole text in windows that share
        `stride` pieces (needs aggregation_strategy simple, first, average or max, as in transformers).
    """
    strategy = str(aggregation_strategy).lower()
    if strategy not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation_strategy {aggregation_strategy!r}; "
                          f"use one of {', '.join(AGGREGATIONS)}")
    if on_truncation not in ("warn", "error", "ignore"):
        raise ConfigError(f"on_truncation={on_truncation!r}; use 'warn', 'error' or 'ignore'")
    if stride is not None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ConfigError(f"stride={stride!r} must be a non-negative integer (pieces shared by two windows)")
        if strategy == "none":
            raise ConfigError("stride reads a long text in overlapping windows whose entities must be merged; "
                              "aggregation_strategy='none' cannot merge them: use simple, first, average or max")
    items, single = check_texts(texts)
    model = task_model(lm, "token_classification")
    labels = labels_of(lm) or [f"LABEL_{i}" for i in range(model.head.classifier.out_features)]
    tok = lm.tokenizer
    max_length = min(lm.max_seq_length, tok.model_max_length)
    if stride is None:
        windows = [[e] for e in tok.encode_batch(items, truncation=True, max_length=max_length)]
        cut = [i for i, w in enumerate(windows) if w[0].num_truncated]
        if cut and on_truncation != "ignore":
            msg = (f"{len(cut)} of {len(items)} texts are longer than max_seq_length={max_length} word pieces; "
                   f"only their first {max_length - 2} were tagged (first: text {cut[0]}, "
                   f"{windows[cut[0]][0].num_truncated} pieces cut); pass stride (lmforge ner --stride) to tag "
                   "whole texts")
            if on_truncation == "error":
                raise DataError(msg)
            warnings.warn(msg, TruncationWarning, stacklevel=2)
    else:
        pieces = tok.encode_batch(items, add_special_tokens=False)
        windows = [stride_windows(tok, e, max_length, stride) for e in pieces]
    flat = [e for w in windows for e in w]
    logits = iter(row for out in forward_batches(model, tok, flat, batch_size) for row in out)  # each (T, L)
    prefix = word_joiner(tok)
    results = []
    for text, encs in zip(items, windows):
        found = []
        for enc in encs:
            lg = next(logits)[:len(enc)].numpy()  # (n, L) float32
            exp = np.exp(lg - lg.max(axis=-1, keepdims=True))
            scores = exp / exp.sum(axis=-1, keepdims=True)
            ents = aggregate(pre_entities(text, enc, scores, tok), strategy, labels, prefix)
            found += [e for e in ents
                      if e.get("entity") not in ignore_labels and e.get("entity_group") not in ignore_labels]
        if len(encs) > 1:
            found = aggregate_overlapping_entities(found)
        results.append([_plain(e) for e in found])
    return results[0] if single else results


# ---- training: words with tags -> pieces with label ids -----------------------------------------------------------
def encode_words(tokenizer, words: Sequence[str], max_length: int):
    """Encode pre-split words (joined by spaces) and map each piece to the index of the word it came from.

    Returns (Encoding, piece_word) where piece_word[i] is the input word of piece i, None for [CLS]/[SEP].
    A word the tokenizer splits further ("U.S." -> "u", ".", "s", ".") maps all its pieces to that one word.
    """
    if not words:
        raise DataError("an example has no words")
    text, spans, pos = "", [], 0
    for w in words:
        if not isinstance(w, str) or not w.strip() or any(c.isspace() for c in w):
            raise DataError(f"word {w!r} is empty or contains whitespace; give one word per list item")
        spans.append((pos, pos + len(w)))
        text += w + " "
        pos += len(w) + 1
    enc = tokenizer.encode_plus(text[:-1], truncation=True, max_length=max_length)
    starts = [s for s, _ in spans]
    piece_word = []
    for (s, e), seq in zip(enc.offsets, enc.sequence_ids):
        piece_word.append(None if seq is None else int(np.searchsorted(starts, s, side="right") - 1))
    return enc, piece_word


def align_labels(piece_word: Sequence[int | None], word_labels: Sequence[int], labels: Sequence[str] | None = None,
                 label_all_tokens: bool = False) -> list[int]:
    """Word label ids -> piece label ids: the first piece of each word carries its word's label, the rest -100
    (or, with label_all_tokens, the word's label with B-X turned into I-X when `labels` names them).

        piece_word [None, 0, 1, 1, 2, None], word_labels [1, 3, 0] -> [-100, 1, 3, -100, 0, -100]
    """
    out, prev = [], None
    for w in piece_word:
        if w is None:
            out.append(-100)
        elif w != prev:
            out.append(int(word_labels[w]))
        elif label_all_tokens:
            lab = int(word_labels[w])
            if labels is not None and labels[lab].startswith("B-") and ("I-" + labels[lab][2:]) in labels:
                lab = list(labels).index("I-" + labels[lab][2:])
            out.append(lab)
        else:
            out.append(-100)
        prev = w
    return out


@token_mean
def token_classification_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the labelled pieces (labels != -100), as BertForTokenClassification computes it."""
    logits = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))  # (B, T, L)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def check_label_names(model_labels: Sequence[str] | None, data_labels: Sequence[str], source: str) -> None:
    """A label file (or data) that uses labels the model does not have is a one-line error."""
    if model_labels is None:
        return
    unknown = sorted(set(data_labels) - set(model_labels))
    if unknown:
        raise CheckpointError(f"{source} uses label {unknown[0]!r}, which the model does not have "
                              f"(its labels: {', '.join(model_labels)})")


# ---- metrics -------------------------------------------------------------------------------------------------------
def entities_from_tags(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """BIO(ES) tags -> {(type, first, last)} the way conlleval reads them: an I- after O or after another type
    starts an entity too.  ["B-PER", "I-PER", "O", "I-LOC"] -> {("PER", 0, 1), ("LOC", 3, 3)}"""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        bi, t = (tag[0], tag[2:]) if len(tag) > 1 and tag[1] == "-" else ("O" if tag == "O" else "I", tag)
        ends = kind is not None and (bi in ("B", "S", "O") or t != kind)
        if ends:
            out.add((kind, start, i - 1))
            kind = None
        if bi in ("B", "S") or (bi in ("I", "E") and kind is None):
            start, kind = i, t
        if bi in ("E", "S") and kind is not None:
            out.add((kind, start, i))
            kind = None
    return out


def ner_metrics(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall, F1 (micro over all sentences) and token accuracy."""
    if len(true_tags) != len(pred_tags):
        raise DataError(f"{len(true_tags)} gold sentences but {len(pred_tags)} predicted")
    tp = n_pred = n_true = correct = total = 0
    for t, p in zip(true_tags, pred_tags):
        if len(t) != len(p):
            raise DataError(f"a sentence has {len(t)} gold tags but {len(p)} predicted")
        et, ep = entities_from_tags(t), entities_from_tags(p)
        tp += len(et & ep)
        n_pred += len(ep)
        n_true += len(et)
        correct += sum(a == b for a, b in zip(t, p))
        total += len(t)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": correct / max(1, total),
            "entities": n_true}
