"""Extractive question answering (SQuAD): find the answer as a span of the passage.

The model reads "[CLS] question [SEP] passage [SEP]" and gives every token two scores: how likely the answer
*starts* there and how likely it *ends* there (lmforge.models.heads.QuestionAnsweringHead). The answer is the span
(s, e) with s <= e that maximises p_start(s) * p_end(e), mapped back to characters of the passage through the
tokenizer's offsets (Devlin et al. 2018, section 4.2; Rajpurkar et al. 2016, SQuAD).

Long passages and `doc_stride`. An encoder reads at most max_seq_len tokens (384 here, as in transformers). A
passage longer than what is left after the question is cut into overlapping *windows*:

    passage pieces    0 ........................................................ 900
    window 1          [CLS] q [SEP] 0 .......... 370 [SEP]
    window 2          [CLS] q [SEP]        242 .......... 612 [SEP]        next start = previous + (370 - 128)
    window 3          [CLS] q [SEP]                   484 ........ 854 [SEP]

Consecutive windows share `doc_stride` (128) pieces, so an answer that straddles one cut lies whole inside the
next window; without the overlap it could be cut in two and never found. Every window is scored and the best span
of all windows wins (spans with the same text found in two windows add their scores, as transformers does).

"No answer" (SQuAD 2.0). Models trained on SQuAD 2.0 point at [CLS] (start = end = 0) when the passage does not
answer the question. With `handle_impossible_answer=True` the null score p_start(0) * p_end(0) (its smallest
value over the windows) competes with the spans; if it wins the answer is "" at (0, 0).

`question_answering` reproduces transformers' question-answering pipeline step by step (windows equal to a fast
tokenizer's `return_overflowing_tokens=True, stride=doc_stride`; span decoding as its `select_starts_ends` /
`decode_spans`; `align_to_words` widening a span to whole words) and returns its dicts
{"score", "start", "end", "answer"}. tests/test_qa.py checks windows and spans against transformers.

`squad_v2_metrics` is the official SQuAD 2.0 evaluation script's scoring (normalize_answer: lower-case, drop
punctuation and the articles a/an/the, squeeze spaces; exact match and token F1 as the maximum over the gold
answers; a question without gold answers counts as answered correctly only by "").
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError
from lmforge.tasks.common import check_encoder, forward_batches, task_model
from lmforge.tokenizers.encoding import Encoding
from lmforge.training.batch import row_mean


# ---- windows -------------------------------------------------------------------------------------------------------
@dataclass
class Window:
    """One model input: the model's pair template around the question and passage[a:b] (BERT:
    [CLS] question [SEP] passage [SEP]; RoBERTa: <s> question </s></s> passage </s>), with what postprocessing
    needs."""

    ids: list[int]
    type_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]  # question tokens: in the question; passage tokens: in the passage
    sequence_ids: list[int | None]  # 0 question, 1 passage, None special
    word_ids: list[int | None]  # passage word index of passage tokens, question word index of question tokens
    p_mask: list[int]  # 1 = cannot be part of an answer (question, separators); [CLS] is 0 (the no-answer position)

    def __len__(self) -> int:
        return len(self.ids)


def qa_windows(tokenizer, question: str, context: str, max_seq_len: int = 384, doc_stride: int = 128) -> list[Window]:
    """Windows over `context` (see the module docstring), equal to a fast tokenizer's overflowing encodings."""
    if not question.strip():
        raise DataError("the question is empty")
    if not context.strip():
        raise DataError("the question has no context: give the passage to find the answer in")
    q = tokenizer.encode_plus(question, add_special_tokens=False)
    c = tokenizer.encode_plus(context, add_special_tokens=False)
    n_special = tokenizer.num_special_tokens(pair=True)  # [CLS] q [SEP] c [SEP]: 3; <s> q </s></s> c </s>: 4
    budget = max_seq_len - len(q) - n_special  # passage pieces per window
    if budget <= 0:
        raise DataError(f"the question is {len(q)} tokens; with max_seq_len={max_seq_len} no room is left for "
                        "the passage")
    spans = [(0, len(c))]
    if len(c) > budget:
        if doc_stride >= budget:
            raise ConfigError(f"doc_stride={doc_stride} must be smaller than the {budget} passage tokens a window "
                              f"holds (max_seq_len={max_seq_len} minus the question and {n_special} special tokens)")
        spans, step = [], budget - doc_stride
        for a in range(0, len(c), step):
            b = min(a + budget, len(c))
            spans.append((a, b))
            if b == len(c):
                break
    out = []
    for a, b in spans:
        part = Encoding(c.ids[a:b], c.tokens[a:b], list(c.offsets[a:b]), list(c.word_ids[a:b]))
        e = tokenizer._post_process(q, part, True)  # the model's own pair template around question and passage
        # only passage tokens can be an answer; the [CLS] (<s>) position stands for "no answer", as in transformers
        p_mask = [0 if sid == 1 or i == tokenizer.cls_token_id else 1 for sid, i in zip(e.sequence_ids, e.ids)]
        out.append(Window(ids=e.ids, type_ids=e.type_ids, tokens=e.tokens, offsets=list(e.offsets),
                          sequence_ids=e.sequence_ids, word_ids=e.word_ids, p_mask=p_mask))
    return out


# ---- span decoding (transformers' decode_spans / select_starts_ends) -----------------------------------------------
def decode_spans(start: np.ndarray, end: np.ndarray, top_k: int, max_answer_len: int, desired: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top_k spans by p_start[s] * p_end[e] with s <= e < s + max_answer_len, both ends `desired` tokens.

    start, end: (1, T) probabilities; desired: (1, T) 1 where a token may be part of an answer.
    """
    outer = start[0][:, None] * end[0][None, :]  # (T, T): score of every (s, e)
    candidates = np.tril(np.triu(outer), max_answer_len - 1)  # keep e >= s and e - s < max_answer_len
    flat = candidates.flatten()
    if top_k == 1:
        order = [np.argmax(flat)]
    elif len(flat) <= top_k:
        order = np.argsort(-flat)
    else:
        idx = np.argpartition(-flat, top_k)[0:top_k]
        order = idx[np.argsort(-flat[idx])]
    starts, ends = np.unravel_index(order, candidates.shape)
    ok = np.isin(starts, desired.nonzero()) & np.isin(ends, desired.nonzero())
    starts, ends = starts[ok], ends[ok]
    return starts, ends, candidates[starts, ends]


def select_starts_ends(start: np.ndarray, end: np.ndarray, p_mask: np.ndarray, min_null_score: float,
                       top_k: int, handle_impossible_answer: bool, max_answer_len: int):
    """Softmax over the allowed tokens, the null score at [CLS], then the best spans (starts, ends, scores, null)."""
    desired = (np.abs(np.array(p_mask) - 1))[None, :]  # (1, T) 1 = passage token or [CLS]
    blocked = desired == 0.0
    start = np.where(blocked, -10000.0, start[None, :])  # (1, T)
    end = np.where(blocked, -10000.0, end[None, :])
    start = np.exp(start - start.max(axis=-1, keepdims=True))
    start = start / start.sum()
    end = np.exp(end - end.max(axis=-1, keepdims=True))
    end = end / end.sum()
    if handle_impossible_answer:
        min_null_score = min(min_null_score, (start[0, 0] * end[0, 0]).item())
    start[0, 0] = end[0, 0] = 0.0  # [CLS] is never part of a span
    starts, ends, scores = decode_spans(start, end, top_k, max_answer_len, desired)
    return starts, ends, scores, min_null_score


def _chars(w: Window, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    """Token span -> character span of the passage; with align_to_words, widened to whole words."""
    if align_to_words and w.word_ids[s] is not None and w.word_ids[e] is not None:
        sw, ew = w.word_ids[s], w.word_ids[e]
        first = [i for i in range(len(w)) if w.sequence_ids[i] == 1 and w.word_ids[i] == sw]
        last = [i for i in range(len(w)) if w.sequence_ids[i] == 1 and w.word_ids[i] == ew]
        return w.offsets[first[0]][0], w.offsets[last[-1]][1]
    return w.offsets[s][0], w.offsets[e][1]


def spans_to_answers(context: str, windows: Sequence[Window], starts_ends: Sequence[tuple[np.ndarray, np.ndarray]],
                     top_k: int = 1, handle_impossible_answer: bool = False, max_answer_len: int = 15,
                     align_to_words: bool = True) -> dict | list[dict]:
    """Best answers over all windows of one question (transformers' QuestionAnsweringPipeline.postprocess)."""
    min_null = 1000000.0
    answers: list[dict] = []
    pre_top_k = top_k * 2 + 10 if align_to_words else top_k  # some candidates merge when aligned to words
    for w, (start, end) in zip(windows, starts_ends):
        starts, ends, scores, min_null = select_starts_ends(start, end, np.array(w.p_mask), min_null, pre_top_k,
                                                            handle_impossible_answer, max_answer_len)
        for s, e, score in zip(starts, ends, scores):
            a, b = _chars(w, int(s), int(e), align_to_words)
            text = context[a:b]
            same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
            if same is not None:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": a, "end": b, "answer": text})
    if handle_impossible_answer:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    return answers[0] if len(answers) == 1 else answers


def question_answering(lm: Any, question: str | Sequence[str], context: str | Sequence[str], *,
                       doc_stride: int = 128, max_answer_len: int = 15, max_seq_len: int = 384,
                       handle_impossible_answer: bool = False, top_k: int = 1, align_to_words: bool = True,
                       batch_size: int = 16, model: torch.nn.Module | None = None) -> dict | list:
    """Answer `question` from `context` (or lists of each, pairwise): {"score", "start", "end", "answer"}, or a
    list of top_k of them; lists in give one result per pair. `model` may be a TaskModel being trained."""
    check_encoder(lm, "question answering")
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} must be a positive integer")
    if not isinstance(max_answer_len, int) or max_answer_len < 1:
        raise ConfigError(f"max_answer_len={max_answer_len!r} must be a positive integer")
    if not isinstance(doc_stride, int) or doc_stride < 0:
        raise ConfigError(f"doc_stride={doc_stride!r} must be a non-negative integer")
    max_seq_len = min(max_seq_len, lm.max_seq_length)
    single = isinstance(question, str)
    questions = [question] if single else list(question)
    contexts = [context] if isinstance(context, str) else list(context if context is not None else [])
    if len(contexts) != len(questions):
        raise DataError(f"{len(questions)} question(s) but {len(contexts)} context(s): give one context per question")
    for q, c in zip(questions, contexts):
        if not isinstance(q, str) or not isinstance(c, str):
            raise DataError("questions and contexts must be strings")
    model = model if model is not None else task_model(lm, "question_answering")
    windows = [qa_windows(lm.tokenizer, q, c, max_seq_len, doc_stride) for q, c in zip(questions, contexts)]
    flat = [w for ws in windows for w in ws]
    encs = [_as_encoding(w) for w in flat]
    outs = forward_batches(model, lm.tokenizer, encs, batch_size)
    logits = []  # (start, end) per window, cut to the window's length
    i = 0
    for st, en in outs:
        for s, e in zip(st, en):
            n = len(flat[i])
            logits.append((s[:n].numpy(), e[:n].numpy()))
            i += 1
    results, k = [], 0
    for c, ws in zip(contexts, windows):
        results.append(spans_to_answers(c, ws, logits[k:k + len(ws)], top_k, handle_impossible_answer,
                                        max_answer_len, align_to_words))
        k += len(ws)
    return results[0] if single else results


def _as_encoding(w: Window):
    return Encoding(w.ids, w.tokens, w.offsets, w.word_ids, w.sequence_ids, w.type_ids)


# ---- training features ---------------------------------------------------------------------------------------------
def answer_positions(w: Window, answer_start: int | None, answer_text: str) -> tuple[int, int]:
    """Token (start, end) of the answer inside window `w`; (0, 0), the [CLS] position, when the question has no
    answer or the answer is not wholly inside this window (the SQuAD 2.0 training convention)."""
    if answer_start is None or not answer_text:
        return 0, 0
    a, b = answer_start, answer_start + len(answer_text)
    ctx = [i for i in range(len(w)) if w.sequence_ids[i] == 1]
    if not ctx or w.offsets[ctx[0]][0] > a or w.offsets[ctx[-1]][1] < b:
        return 0, 0
    s = max(i for i in ctx if w.offsets[i][0] <= a)
    e = min(i for i in ctx if w.offsets[i][1] >= b)
    return s, max(s, e)


@row_mean
def qa_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2, as BertForQuestionAnswering computes it."""
    start, end = model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))  # (B, T) each
    T = start.shape[1]
    sp = batch["start_positions"].clamp(0, T)
    ep = batch["end_positions"].clamp(0, T)
    return (F.cross_entropy(start.float(), sp, ignore_index=T) + F.cross_entropy(end.float(), ep, ignore_index=T)) / 2


# ---- SQuAD data and the official v2 metric -------------------------------------------------------------------------
def read_squad(data: dict) -> list[dict]:
    """SQuAD JSON -> [{"id", "question", "context", "answers": [{"text", "answer_start"}], "is_impossible"}]."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError("not SQuAD JSON: expected {\"data\": [{\"paragraphs\": [...]}, ...]}")
    out = []
    for article in data["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                out.append({"id": qa["id"], "question": qa["question"], "context": para["context"],
                            "answers": qa.get("answers", []), "is_impossible": bool(qa.get("is_impossible")),
                            "title": article.get("title", "")})
    if not out:
        raise DataError("the SQuAD file holds no questions")
    return out


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (the official script's)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold, pred = _tokens(a_gold), _tokens(a_pred)
    common = collections.Counter(gold) & collections.Counter(pred)
    same = sum(common.values())
    if not gold or not pred:
        return float(gold == pred)  # both empty (a correct "no answer"): 1, else 0
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_v2_metrics(examples: Sequence[dict], predictions: dict[str, str]) -> dict[str, float]:
    """exact / f1 (percent) over all questions, and over the answerable (HasAns_) and unanswerable (NoAns_)."""
    exact, f1, has = {}, {}, {}
    for ex in examples:
        qid = ex["id"]
        if qid not in predictions:
            raise DataError(f"no prediction for question {qid!r}")
        gold = [a["text"] for a in ex["answers"] if normalize_answer(a["text"])] or [""]
        pred = predictions[qid]
        exact[qid] = max(compute_exact(g, pred) for g in gold)
        f1[qid] = max(compute_f1(g, pred) for g in gold)
        has[qid] = gold != [""]
    if not exact:
        raise DataError("no questions to score")

    def part(ids: list[str], name: str) -> dict[str, float]:
        if not ids:
            return {}
        return {f"{name}exact": 100.0 * sum(exact[i] for i in ids) / len(ids),
                f"{name}f1": 100.0 * sum(f1[i] for i in ids) / len(ids), f"{name}total": len(ids)}

    out = part(list(exact), "")
    out.update(part([i for i in exact if has[i]], "HasAns_"))
    out.update(part([i for i in exact if not has[i]], "NoAns_"))
    return out
