"""`lmforge.pipeline(task, model)`: one call per task, answers in the same shape as Hugging Face's pipelines.

The courses meet most models through `transformers.pipeline("fill-mask")` and friends: one line that hides the
tokenizer, the model and the post-processing. This module is that line for lmforge. Each task says which model
family fits it:

| task                          | family                       | what it returns (as transformers does)             |
|-------------------------------|------------------------------|----------------------------------------------------|
| text-generation               | decoder (GPT-2, Llama, ...)  | [{"generated_text": prompt + completion}]          |
| text2text-generation          | encoder-decoder (T5, BART)   | [{"generated_text": ...}]                          |
| summarization                 | encoder-decoder (T5, BART)   | [{"summary_text": ...}]                            |
| translation                   | encoder-decoder (T5, BART)   | [{"translation_text": ...}]                        |
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

The text2text tasks follow transformers 4's pipelines (transformers 5 dropped them): 4 beams and 256 new tokens
unless the model's generation_config.json or the call says otherwise, the prefix and settings of config.json's
`task_specific_params` (t5-small's "summarize: "), "translation_en_to_de"-style task names, `return_tensors=True`
for ids, and greedy or beam search unless `do_sample=True`. `min_length` bans the end of the text until the
decoder holds that many tokens, as in transformers (`lmforge.seq2seq_lm.DecodingRules`).

A model that cannot do the task is a one-line error (a decoder asked for fill-mask, an encoder without a QA head
asked for question answering). Inputs may be one item or a list (a batch); the answer has the same nesting as
transformers'. `device` is where the model runs.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Callable, Sequence

import torch

from lmforge.errors import ConfigError
from lmforge.generation.sampling import SamplingParams
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


# transformers' text2text pipelines generate with num_beams=4 and max_new_tokens=256 unless the model's
# generation_config.json says otherwise; config.json's task_specific_params[task] then adds a prefix and settings
_SEQ2SEQ_DEFAULTS = {"num_beams": 4, "max_new_tokens": 256}
_BEAM_KEYS = ("num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "num_return_sequences",
              "do_sample", "repetition_penalty", "temperature", "top_k", "top_p")


def task_params(lm, task: str) -> tuple[str, dict[str, Any]]:
    """(input prefix, generation settings) of config.json's task_specific_params for `task`, as transformers reads
    them; plain "translation" uses the first translation_* entry, as transformers' pipeline() does."""
    table = (getattr(getattr(lm, "config", None), "extra", None) or {}).get("task_specific_params") or {}
    if task == "translation":
        task = next((k for k in table if k.startswith("translation")), task)
    params = dict(table.get(task) or {})
    return str(params.pop("prefix", "") or ""), params


def _seq2seq_controls(lm, task: str, controls: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The generation controls of a text2text call, as transformers 4's pipeline sets them: its defaults
    (num_beams=4, max_new_tokens=256) < the model's generation_config.json < task_specific_params[task] < the
    call's options. Two of its rules matter: max_new_tokens beats max_length wherever either was set (so a
    max_length only counts when the model's generation_config.json sets a non-default one and no max_new_tokens),
    and the output is greedy or beam search unless do_sample=True (a temperature alone does not sample)."""
    gc = getattr(lm, "generation_config", None)
    extra = getattr(gc, "extra", None) or {}
    merged: dict[str, Any] = {**_SEQ2SEQ_DEFAULTS, "max_length": 20}
    merged.update({k: extra[k] for k in (*_BEAM_KEYS, "max_length") if extra.get(k) is not None})
    if gc is not None and gc.max_new_tokens != SamplingParams.max_new_tokens:  # the model's own limit
        merged["max_new_tokens"] = gc.max_new_tokens
    elif merged["max_length"] != 20:  # a model's non-default max_length beats the pipeline's 256
        merged["max_new_tokens"] = None
    prefix, params = task_params(lm, task)
    for source in (params, controls):
        merged.update(source)
    max_length = merged.pop("max_length")
    if merged.get("max_new_tokens") is None:
        merged["max_new_tokens"] = int(max_length) - 1  # counts the decoder start token
    if not merged.pop("do_sample", False):
        merged["temperature"] = 0.0
    elif merged.get("num_beams", 1) > 1:
        merged["do_sample"] = True
    return prefix, merged


def _seq2seq(key: str, task: str):
    """text2text-generation, summarization, translation: [{key_text}] per input, as transformers returns them (a
    list of inputs with one sequence each gives a flat list of dicts; several sequences, a list per input)."""
    def run(lm, inputs, return_tensors: bool = False, return_text: bool = True,
            clean_up_tokenization_spaces: bool = False, **controls):
        texts, many = _one_or_many(inputs, task)
        prefix, controls = _seq2seq_controls(lm, task, controls)
        size = controls.pop("batch_size", None) or len(texts)  # inputs searched together, `size` at a time
        outs = [o for i in range(0, len(texts), size)
                for o in lm.generate([prefix + t for t in texts[i:i + size]], **controls)]
        start, eos = lm.config.decoder_start_token_id, lm.config.eos_token_id
        res = []
        for out in outs:
            records = []
            for o in (out if isinstance(out, list) else [out]):
                if return_tensors:  # transformers' ids: the decoder start token, the text, EOS if it ended there
                    ended = o.finish_reason == "stop" and o.stop_reason == eos
                    records.append({f"{key}_token_ids": [start, *o.token_ids] + ([eos] if ended else [])})
                else:
                    text = str(o)
                    records.append({f"{key}_text": _clean_up(text) if clean_up_tokenization_spaces else text})
            res.append(records)
        if many and all(len(r) == 1 for r in res):
            return [r[0] for r in res]
        return res if many else res[0]
    return run


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


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
    elif isinstance(question, (list, tuple)) and question and all(isinstance(q, dict) for q in question):
        question, context = [q.get("question") for q in question], [q.get("context") for q in question]
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
    "text2text-generation": _seq2seq("generated", "text2text-generation"),
    "summarization": _seq2seq("summary", "summarization"),
    "translation": _seq2seq("translation", "translation"),
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


_TRANSLATION_PAIR = re.compile(r"translation_\w+_to_\w+")  # transformers' translation_en_to_de: that entry's prefix

# the model family each task needs (every other task: an encoder)
FAMILY = {"text-generation": "decoder", "text2text-generation": "encoder-decoder",
          "summarization": "encoder-decoder", "translation": "encoder-decoder"}


class Pipeline:
    """A loaded model bound to one task: `pipe(inputs, **options)`. `pipe.lm` is the model it runs."""

    def __init__(self, task: str, lm: Any, defaults: dict[str, Any]):
        self.task, self.lm, self.defaults = task, lm, defaults
        self._fn = TASKS[task] if task in TASKS else _seq2seq("translation", task)  # translation_xx_to_yy

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
    if task not in TASKS and not _TRANSLATION_PAIR.fullmatch(task):
        close = difflib.get_close_matches(task, TASKS, n=1)
        raise ConfigError(f"unknown task {task!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                      f"; tasks: {', '.join(TASKS)}"))
    lm = load(model, dtype=dtype, device=device) if isinstance(model, (str, os.PathLike)) else model
    if device is not None and not isinstance(model, (str, os.PathLike)):
        lm.model.to(device)
    _require(lm, task, FAMILY.get(task if task in TASKS else "translation", "encoder"))  # once, here
    return Pipeline(task, lm, defaults)
