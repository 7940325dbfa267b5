"""`lmforge.pipeline(task, model)`: one call per task, answers in the same shape as Hugging Face's pipelines.

The courses meet most models through `transformers.pipeline("fill-mask")` and friends: one line that hides the
tokenizer, the model and the post-processing. This module is that line for lmforge. Each task says which model
family fits it:

| task                          | family                       | what it returns (as transformers does)             |
|-------------------------------|------------------------------|----------------------------------------------------|
| text-generation               | decoder (GPT-2, Llama, ...)  | [{"generated_text": prompt + completion}]          |
| text2text-generation          | encoder-decoder (T5)         | [{"generated_text": ...}]                          |
| summarization                 | encoder-decoder (T5)         | [{"summary_text": ...}]                            |
| translation                   | encoder-decoder (T5)         | [{"translation_text": ...}]                        |
| text-classification           | encoder + classification head | [{"label", "score"}]                               |
| zero-shot-classification      | encoder + NLI head           | {"sequence", "labels", "scores"}                   |
| token-classification          | encoder + token head (NER)   | [{"entity" or "entity_group", "score", "word", "start", "end"}] |
| question-answering            | encoder + span head (SQuAD)  | {"score", "start", "end", "answer"}                |
| fill-mask                     | encoder + masked-LM head     | [{"score", "token", "token_str", "sequence"}]      |
| feature-extraction            | encoder                      | [[token vectors]] (the last hidden states)         |
| sentence-similarity           | encoder (sentence embeddings) | [cosine similarity to each sentence]              |

    from lmforge import pipeline
    fill = pipeline("fill-mask", "runs/mlm-demo")
    fill("The [MASK] statement ends a loop.")

A model that cannot do the task is a one-line error (a decoder asked for fill-mask, an encoder without a QA head
asked for question answering). Inputs may be one item or a list (a batch); the answer has the same nesting as
transformers'. `device` is where the model runs.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.loader import load
from lmforge.tasks.common import is_encoder, labels_of
from lmforge.tasks.fill_mask import fill_mask
from lmforge.tasks.question_answering import question_answering
from lmforge.tasks.text_classification import text_classification
from lmforge.tasks.token_classification import token_classification


def _family(lm: Any) -> str:
    if is_encoder(lm):
        return "encoder"
    if getattr(lm, "is_seq2seq", False):
        return "encoder-decoder"
    return "decoder"


def _require(lm: Any, task: str, family: str) -> None:
    have = _family(lm)
    if have != family:
        raise ConfigError(f"{task} needs {'an' if family[0] in 'ae' else 'a'} {family} model; "
                          f"{getattr(lm, 'path', None) or 'this model'} is {'an' if have[0] in 'ae' else 'a'} {have}")


def _one_or_many(inputs: Any, what: str) -> tuple[list, bool]:
    if isinstance(inputs, str):
        return [inputs], False
    if isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs):
        if not inputs:
            raise ConfigError(f"{what}: an empty list of inputs")
        return list(inputs), True
    raise ConfigError(f"{what}: expected a string or a list of strings, got {type(inputs).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# The tasks
# ----------------------------------------------------------------------------------------------------------------
def _text_generation(lm, inputs, return_full_text: bool = True, **controls):
    texts, many = _one_or_many(inputs, "text-generation")
    outs = lm.generate(texts, **controls)
    res = [[{"generated_text": (t + o) if return_full_text else str(o)}] for t, o in zip(texts, outs)]
    return res if many else res[0]


def _seq2seq(key: str, task: str):
    def run(lm, inputs, **controls):
        texts, many = _one_or_many(inputs, task)
        prefix = getattr(lm, "task_prefixes", {}).get(task, "")
        outs = lm.generate([prefix + t for t in texts], **controls)
        res = [[{key: str(o)}] for o in outs]
        return res if many else res[0]
    return run


def _text_classification(lm, inputs, text_pair=None, top_k: int | None = 1, function_to_apply=None, **kw):
    texts, many = _one_or_many(inputs, "text-classification")
    pairs = None if text_pair is None else (_one_or_many(text_pair, "text-classification")[0])
    out = text_classification(lm, texts, pairs, top_k=top_k, function_to_apply=function_to_apply, **kw)
    if top_k == 1:  # transformers: [{"label", "score"}] for one text, a list of those dicts for a batch
        return out if many else [out[0]]
    return out if many else out[0]


def _entailment_id(lm) -> int:
    labels = labels_of(lm) or []
    for i, name in enumerate(labels):
        if name.lower().startswith("entail"):
            return i
    raise ConfigError("zero-shot-classification needs an NLI model whose labels include 'entailment' "
                      f"(this model's labels: {', '.join(labels) or 'none'})")


def _zero_shot(lm, inputs, candidate_labels: str | Sequence[str] = (), hypothesis_template: str = "This example is {}.",
               multi_label: bool = False, batch_size: int = 16):
    """NLI as a classifier (Yin et al. 2019): each candidate label becomes a hypothesis ("This example is sports.")
    scored against the text as premise; the entailment logits rank the labels."""
    texts, many = _one_or_many(inputs, "zero-shot-classification")
    labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
    if not labels:
        raise ConfigError("zero-shot-classification needs candidate_labels")
    if "{}" not in hypothesis_template:
        raise ConfigError(f"hypothesis_template {hypothesis_template!r} has no {{}} for the label")
    ent = _entailment_id(lm)
    names = labels_of(lm)
    contra = next((i for i, n in enumerate(names) if n.lower().startswith("contradict")), None)
    results = []
    for text in texts:
        hyps = [hypothesis_template.format(label) for label in labels]
        rows = text_classification(lm, [text] * len(labels), hyps, top_k=None, function_to_apply="none",
                                   batch_size=batch_size)
        logits = torch.tensor([[{d["label"]: d["score"] for d in row}[n] for n in names] for row in rows])  # (L, C)
        if multi_label or len(labels) == 1:
            if contra is None:
                raise ConfigError("multi-label zero-shot needs a 'contradiction' label in the NLI model")
            scores = logits[:, [contra, ent]].softmax(-1)[:, 1]
        else:
            scores = logits[:, ent].softmax(0)
        order = sorted(range(len(labels)), key=lambda i: -float(scores[i]))
        results.append({"sequence": text, "labels": [labels[i] for i in order],
                        "scores": [float(scores[i]) for i in order]})
    return results if many else results[0]


def _token_classification(lm, inputs, aggregation_strategy: str = "none", **kw):
    texts, many = _one_or_many(inputs, "token-classification")
    out = token_classification(lm, texts, aggregation_strategy=aggregation_strategy, **kw)
    return out if many else out[0]


def _question_answering(lm, question=None, context=None, **kw):
    if isinstance(question, dict):  # pipeline({"question": ..., "context": ...})
        question, context = question.get("question"), question.get("context")
    if question is None or context is None:
        raise ConfigError("question-answering needs both question= and context=")
    return question_answering(lm, question, context, **kw)


def _fill_mask(lm, inputs, top_k: int = 5, targets=None, **kw):
    texts, many = _one_or_many(inputs, "fill-mask")
    out = fill_mask(lm, texts, top_k=top_k, targets=targets, **kw)
    return out if many else out[0]


def _feature_extraction(lm, inputs, **kw):
    """The encoder's last hidden states, one vector per token ([CLS] and [SEP] included), as nested lists."""
    texts, many = _one_or_many(inputs, "feature-extraction")
    out = []
    with torch.inference_mode():
        for t in texts:
            enc = lm.tokenizer.encode_batch([t], truncation=True, max_length=lm.max_seq_length)
            batch = lm.tokenizer.pad(enc, padding=True, return_tensors="pt")
            h = lm.model(batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device),
                         batch["token_type_ids"].to(lm.device))  # (1, T, C)
            out.append(h.float().cpu().tolist())
    return out if many else out[0]


def _sentence_similarity(lm, inputs=None, *, source_sentence: str | None = None,
                         sentences: Sequence[str] | None = None, **kw):
    """Cosine similarity of `source_sentence` to each of `sentences` (the Hub's sentence-similarity task)."""
    if isinstance(inputs, dict):
        source_sentence, sentences = inputs.get("source_sentence"), inputs.get("sentences")
    if not isinstance(source_sentence, str) or not sentences:
        raise ConfigError("sentence-similarity needs source_sentence= (a string) and sentences= (a list)")
    vecs = lm.embed([source_sentence, *sentences], normalize=True, **kw)  # (1 + n, C)
    return (vecs[1:] @ vecs[0]).tolist()


TASKS: dict[str, Callable] = {
    "text-generation": _text_generation,
    "text2text-generation": _seq2seq("generated_text", "text2text-generation"),
    "summarization": _seq2seq("summary_text", "summarization"),
    "translation": _seq2seq("translation_text", "translation"),
    "text-classification": _text_classification,
    "sentiment-analysis": _text_classification,  # transformers' alias
    "zero-shot-classification": _zero_shot,
    "token-classification": _token_classification,
    "ner": _token_classification,  # transformers' alias
    "question-answering": _question_answering,
    "fill-mask": _fill_mask,
    "feature-extraction": _feature_extraction,
    "sentence-similarity": _sentence_similarity,
}


# the model family each task needs (every other task: an encoder)
FAMILY = {"text-generation": "decoder", "text2text-generation": "encoder-decoder",
          "summarization": "encoder-decoder", "translation": "encoder-decoder"}


class Pipeline:
    """A loaded model bound to one task: `pipe(inputs, **options)`. `pipe.lm` is the model it runs."""

    def __init__(self, task: str, lm: Any, defaults: dict[str, Any]):
        self.task, self.lm, self.defaults = task, lm, defaults
        self._fn = TASKS[task]

    def __call__(self, *args, **options):
        return self._fn(self.lm, *args, **{**self.defaults, **options})

    def __repr__(self) -> str:
        return f"Pipeline({self.task!r}, {self.lm!r})"


def pipeline(task: str, model: str | os.PathLike | Any, device: str | torch.device | None = None,
             dtype: str = "auto", **defaults: Any) -> Pipeline:
    """A `Pipeline` for `task` on `model` (a path or Hub id for `lmforge.load`, or an already loaded model).

    `defaults` are options every call gets (for example aggregation_strategy="simple", top_k=3); a call's own
    options win. A model of the wrong family for the task is refused here, before any input is read.
    """
    if task not in TASKS:
        close = difflib.get_close_matches(task, TASKS, n=1)
        raise ConfigError(f"unknown task {task!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                      f"; tasks: {', '.join(TASKS)}"))
    lm = load(model, dtype=dtype, device=device) if isinstance(model, (str, os.PathLike)) else model
    if device is not None and not isinstance(model, (str, os.PathLike)):
        lm.model.to(device)
    _require(lm, task, FAMILY.get(task, "encoder"))  # once, here: the task functions trust it
    return Pipeline(task, lm, defaults)
