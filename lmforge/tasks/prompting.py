"""Prompting: few-shot prompts, and classification by in-context learning (no training at all).

A pretrained language model can do a task it was never fine-tuned for if the prompt shows it what to do. GPT-3
(Brown et al. 2020, "Language Models are Few-Shot Learners") named the settings by how many solved examples, or
*demonstrations*, the prompt carries before the query:

    zero-shot   Input: Free entry in 2 a wkly comp to win FA Cup final tkts...\\nLabel:
    one-shot    Input: Ok lar... Joking wif u oni...\\nLabel: ham\\n\\nInput: Free entry in 2 a wkly comp...\\nLabel:
    few-shot    k demonstrations, then the query

Nothing is learned: the weights stay as they are. The demonstrations only make the continuation we want (" spam"
or " ham") the likely one. That works only in models large enough and trained on enough text; a small model
mostly copies surface patterns (the label of the last demonstration, the most frequent label in the prompt), which
is why results are reported next to chance and why demonstrations are drawn *balanced* across labels and shuffled
(Zhao et al. 2021, "Calibrate Before Use", measure these majority-label and recency biases).

Two ways to read the model's answer:

* **generate**: decode greedily after the prompt and parse the text into a label (the first label the answer
  starts with, case-insensitive). Honest about what a user would see, but an answer that names no label counts as
  wrong (reported as "unparsed").
* **score**: compare log p(label | prompt) for every label and take the largest (`api.score_batch`). Always gives
  a label; this is how lm-evaluation-harness runs multiple choice. The sum over a label's tokens favours labels of
  fewer tokens; for one-word labels that rarely matters.

**Contextual calibration** (Zhao et al. 2021, `calibrate=True`, score method). A model has a prior for the labels
that has nothing to do with the input: the prompt's demonstrations, the label's frequency in its training text.
Estimate it by asking with a *content-free* input ("N/A", "", "[MASK]") in place of the query: p_cf(label), the
label probabilities renormalized over the labels and averaged over those inputs. Then divide it out: predict
argmax_label p(label | prompt) / p_cf(label), i.e. subtract log p_cf from each label's log-likelihood. A model that
says "ham" to everything because "ham" is its prior then has to find evidence in the message.

Two ways to lay the prompt out (`PromptFormat.style`):

* **plain**: "Input: ...\\nLabel: ...\\n\\n" blocks, the format base (not chat-tuned) models read best;
* **chat**: each demonstration becomes a user turn (the input) and an assistant turn (the label), rendered with
  the model's chat template (`lmforge.tokenizers.chat_template`; ChatML when the model has none), the instruction
  as a system message. That is how instruction-tuned models expect few-shot examples.

Metrics (`evaluate_fewshot`): accuracy; **balanced accuracy**, the mean over the true classes of the fraction of
that class labelled correctly (87% of the SMS Spam Collection is ham, so "always ham" is 87% accurate but 50%
balanced-accurate: chance is 1/number of labels); and the confusion matrix (rows: true label, columns: predicted).

    pool = load_examples("SMSSpamCollection")                     # Example(input=text, label="ham"/"spam")
    shots = draw_shots(pool, 4, seed=0, balanced=True)
    text = build_prompt(shots, "WINNER!! Claim your prize", PromptFormat(instruction="Is this SMS spam or ham?"))
    result = evaluate_fewshot(lm, shots, test, labels=["ham", "spam"], method="score")
    result.accuracy, result.balanced_accuracy, result.confusion
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lmforge.errors import ConfigError, DataError
from lmforge.finetune.data import read_records
from lmforge.finetune.metrics import confusion_matrix
from lmforge.generation import api

UNPARSED = "(none)"  # the confusion matrix's extra column: a generated answer that names no label
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021's content-free inputs, for calibration


@dataclass(frozen=True)
class Example:
    """One solved example: the input text and its answer (a class label, or an instruction's output)."""

    input: str
    label: str


# ----------------------------------------------------------------------------------------------------------------
# Data: records -> examples -> demonstrations
# ----------------------------------------------------------------------------------------------------------------
def examples_from_records(records: Sequence[Mapping[str, Any]], input_field: str | None = None,
                          label_field: str | None = None, source: str = "data") -> list[Example]:
    """Examples from parsed records, in one of three shapes (or the fields named explicitly):

    classification {"text", "label"} (the SMS Spam TSV reads as this); Alpaca {"instruction", "input",
    "output"}: input = the instruction, plus a blank line and the input when there is one, label = the output.
    >>> examples_from_records([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    [Example(input='Add 2 and 3.', label='5')]
    """
    out = []
    fields = (input_field or "text", label_field or "label")
    for i, r in enumerate(records):
        if not (input_field or label_field) and "instruction" in r and "output" in r:  # Alpaca
            text = str(r["instruction"]) + (f"\n\n{r['input']}" if r.get("input") else "")
            out.append(Example(text, str(r["output"])))
            continue
        missing = [f for f in fields if r.get(f) is None]
        if missing:
            raise DataError(f"{source}: record {i} has no {missing[0]!r} field (fields: {', '.join(map(str, r))}); "
                            f"name the fields with input_field / label_field")
        out.append(Example(str(r[fields[0]]), str(r[fields[1]]).strip()))
    if not out:
        raise DataError(f"{source}: no examples")
    return out


def load_examples(path: str | Path, input_field: str | None = None, label_field: str | None = None) -> list[Example]:
    """Examples from a .json (Alpaca list), .jsonl or .tsv/.csv file (`finetune.data.read_records`; a headerless
    TSV is label<TAB>text, the SMS Spam Collection's layout)."""
    columns = ("label", "text") if not (input_field or label_field) else (label_field or "label",
                                                                          input_field or "text")
    return examples_from_records(read_records(path, columns=columns), input_field, label_field, source=str(path))


def draw_shots(pool: Sequence[Example], k: int, seed: int = 0, balanced: bool = False) -> list[Example]:
    """k demonstrations drawn from `pool` without replacement, reproducibly (`random.Random(seed)`).

    balanced: take labels in turn (each label's examples in a seeded random order), so k=4 over ham/spam gives two
    of each and k=1 gives one of the label that comes first after a seeded shuffle of the labels. The chosen
    demonstrations are then shuffled, so the last one (the one a small model copies most) is not always the same
    label.
    >>> pool = [Example(str(i), "ab"[i % 2]) for i in range(10)]
    >>> sorted(e.label for e in draw_shots(pool, 4, balanced=True))
    ['a', 'a', 'b', 'b']
    """
    if k < 0:
        raise ConfigError(f"the number of shots must be >= 0, got {k}")
    if k > len(pool):
        raise ConfigError(f"{k} shots asked for but the pool holds only {len(pool)} examples")
    rng = random.Random(seed)
    if not balanced:
        return rng.sample(list(pool), k)
    by_label: dict[str, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(ex.label, []).append(ex)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for name in labels:
        rng.shuffle(by_label[name])
    shots: list[Example] = []
    turn = 0
    while len(shots) < k:
        name = labels[turn % len(labels)]
        if by_label[name]:
            shots.append(by_label[name].pop())
        turn += 1
    rng.shuffle(shots)
    return shots


def balanced_subset(pool: Sequence[Example], per_label: int, seed: int = 0) -> list[Example]:
    """Up to `per_label` examples of every label (seeded), in a shuffled order: a test set where chance is
    1/labels."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for ex in pool:
        by_label.setdefault(ex.label, []).append(ex)
    out = []
    for name in sorted(by_label):
        items = list(by_label[name])
        rng.shuffle(items)
        out.extend(items[:per_label])
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PromptFormat:
    """How demonstrations and the query are laid out.

    style        "plain" (text blocks) or "chat" (alternating user/assistant turns, the model's chat template)
    instruction  a task description first ("Classify each SMS as spam or ham."); the system message in chat style
    input_prefix, label_prefix, separator: the plain layout, "Input: ...\\nLabel: spam\\n\\n" by default
    """

    style: str = "plain"
    instruction: str = ""
    input_prefix: str = "Input: "
    label_prefix: str = "Label:"
    separator: str = "\n\n"

    def __post_init__(self):
        if self.style not in ("plain", "chat"):
            raise ConfigError(f"prompt style must be 'plain' or 'chat', got {self.style!r}")


def render_plain(shots: Sequence[Example], query: str, fmt: PromptFormat | None = None) -> str:
    """The plain few-shot prompt; it ends with the label prefix, where the answer begins.

    >>> render_plain([Example("Ok lar", "ham")], "WIN cash now")
    'Input: Ok lar\\nLabel: ham\\n\\nInput: WIN cash now\\nLabel:'
    """
    fmt = fmt or PromptFormat()
    blocks = [fmt.instruction] if fmt.instruction else []
    blocks += [f"{fmt.input_prefix}{ex.input}\n{fmt.label_prefix} {ex.label}" for ex in shots]
    blocks.append(f"{fmt.input_prefix}{query}\n{fmt.label_prefix}")
    return fmt.separator.join(blocks)


def chat_messages(shots: Sequence[Example], query: str, fmt: PromptFormat | None = None) -> list[dict[str, str]]:
    """The few-shot conversation: [system instruction], then (user: input, assistant: label) per demonstration,
    then the query as the last user turn.

    >>> [m["role"] for m in chat_messages([Example("Ok lar", "ham")], "WIN", PromptFormat(instruction="Spam?"))]
    ['system', 'user', 'assistant', 'user']
    """
    fmt = fmt or PromptFormat(style="chat")
    messages = [{"role": "system", "content": fmt.instruction}] if fmt.instruction else []
    for ex in shots:
        messages += [{"role": "user", "content": ex.input}, {"role": "assistant", "content": ex.label}]
    return messages + [{"role": "user", "content": query}]


def build_prompt(shots: Sequence[Example], query: str, fmt: PromptFormat | None = None, lm=None) -> str:
    """The prompt text for `query` after `shots` (chat style renders with `lm`'s chat template, ChatML without one,
    and ends with the assistant header, so the model's next words are its answer)."""
    fmt = fmt or PromptFormat()
    if fmt.style == "plain":
        return render_plain(shots, query, fmt)
    messages = chat_messages(shots, query, fmt)
    if lm is None:
        from lmforge.tokenizers.chat_template import apply_chat_template

        return apply_chat_template(messages)
    return api.chat_prompt(lm, messages)


def model_input(lm, text: str, fmt: PromptFormat) -> str | list[int]:
    """What goes to `generate` / `score_batch`: plain text stays text (tokenized there as a completion prompt, BOS
    first when the model expects it, the label's tokens split from the prompt's as lm-evaluation-harness does);
    a rendered chat becomes ids as the template wrote it (its own BOS, special tokens read as such)."""
    return text if fmt.style == "plain" else api.encode_chat(lm, text)


# ----------------------------------------------------------------------------------------------------------------
# Reading the answer: by scoring each label, or by generating and parsing
# ----------------------------------------------------------------------------------------------------------------
def label_continuation(label: str, fmt: PromptFormat) -> str:
    """What follows the prompt when the answer is `label`: " spam" after "Label:", "spam" after a chat header."""
    return (" " + label) if fmt.style == "plain" else label


def classify_by_score(lm, prompts: Sequence[str | list[int]], labels: Sequence[str], fmt: PromptFormat,
                      batch_size: int = 16, log=None) -> tuple[list[str], list[list[float]]]:
    """For each prompt, the label whose continuation has the highest log-likelihood, and every label's log p.

    One (prompt, label) pair per row of `api.score_batch` (batched forwards; a prompt longer than the context
    keeps its end, as lm-evaluation-harness does). Ties go to the first label."""
    pairs = [(p, label_continuation(lab, fmt)) for p in prompts for lab in labels]
    scores: list[float] = []
    step = max(batch_size * 8, len(labels))
    for i in range(0, len(pairs), step):
        scores += [s.logprob for s in api.score_batch(lm, pairs[i:i + step], batch_size=batch_size)]
        if log:
            log(f"  scored {min(i + step, len(pairs))}/{len(pairs)} (prompt, label) pairs")
    K = len(labels)
    rows = [scores[j * K:(j + 1) * K] for j in range(len(prompts))]
    return [labels[max(range(K), key=row.__getitem__)] for row in rows], rows


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label a generated answer names: the longest label the stripped answer starts with, ignoring case and
    leading punctuation; None if it names none.

    >>> parse_label(" Spam.\\nInput: ...", ["ham", "spam"]), parse_label("maybe", ["ham", "spam"])
    ('spam', None)
    """
    answer = text.strip().lstrip("\"'*:-([ ").lower()
    for name in sorted(labels, key=len, reverse=True):
        if answer.startswith(name.lower()):
            return name
    return None


def classify_by_generate(lm, prompts: Sequence[str | list[int]], labels: Sequence[str], fmt: PromptFormat,
                         batch_size: int = 16, max_new_tokens: int | None = None, log=None) -> list[str | None]:
    """For each prompt, greedy decoding (a few tokens past the longest label; plain style stops at a newline, chat
    at the end of the turn), parsed with `parse_label`."""
    if max_new_tokens is None:
        longest = max(len(api.encode_text(lm.tokenizer, label_continuation(x, fmt))) for x in labels)
        max_new_tokens = longest + 3
    controls = dict(temperature=0.0, max_new_tokens=max_new_tokens)
    params = api.chat_params(lm, **controls) if fmt.style == "chat" else \
        api.resolve_params(lm, {**controls, "stop": [fmt.separator, "\n"]})
    out: list[str | None] = []
    for i in range(0, len(prompts), batch_size):
        texts = api.generate(lm, list(prompts[i:i + batch_size]), params, truncate=True)
        out += [parse_label(t, labels) for t in texts]
        if log:
            log(f"  generated {min(i + batch_size, len(prompts))}/{len(prompts)} answers")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FewShotResult:
    """One (shots, method) evaluation. confusion[i][j]: true labels[i] predicted as columns[j]; the columns are the
    labels, plus UNPARSED when a generated answer named no label."""

    shots: int
    method: str
    labels: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float
    confusion: list[list[int]]
    columns: list[str]
    unparsed: int = 0
    truncated: int = 0
    calibrated: bool = False
    label_prior: list[float] | None = None  # calibrated: p_cf(label), the content-free label probabilities
    predictions: list[str | None] = field(default_factory=list, repr=False)
    label_logprobs: list[list[float]] | None = field(default=None, repr=False)

    def confusion_square(self) -> list[list[int]]:
        """The confusion matrix with a (zero) UNPARSED row when there is an UNPARSED column: rows and columns name
        the same classes, as a heat map wants."""
        return self.confusion + [[0] * len(self.columns) for _ in self.columns[len(self.labels):]]

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("shots", "method", "labels", "n", "accuracy", "balanced_accuracy",
                                           "confusion", "columns", "unparsed", "truncated", "calibrated",
                                           "label_prior")}
        if with_predictions:
            d["predictions"] = self.predictions
        return d


def classification_scores(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]
                          ) -> tuple[float, float, list[list[int]], list[str]]:
    """(accuracy, balanced accuracy, confusion matrix, its column names). A None prediction goes to an UNPARSED
    column and counts as wrong; balanced accuracy averages the recall of the true classes that occur.

    >>> classification_scores(["ham", "ham", "ham", "spam"], ["ham", "ham", "ham", "ham"], ["ham", "spam"])[:2]
    (0.75, 0.5)
    """
    columns = list(labels) + ([UNPARSED] if any(p is None for p in y_pred) else [])
    index = {name: i for i, name in enumerate(columns)}
    unknown = [t for t in y_true if t not in index or t == UNPARSED]
    if unknown:
        raise DataError(f"true label {unknown[0]!r} is not one of the labels {list(labels)}")
    true_ids = [index[t] for t in y_true]
    pred_ids = [index[UNPARSED if p is None else p] for p in y_pred]
    m = confusion_matrix(true_ids, pred_ids, len(columns))[:len(labels)]
    n = len(y_true)
    accuracy = sum(m[i][i] for i in range(len(labels))) / n if n else 0.0
    recalls = [m[i][i] / sum(m[i]) for i in range(len(labels)) if sum(m[i])]
    return accuracy, (sum(recalls) / len(recalls) if recalls else 0.0), m, columns


def label_prior(lm, shots: Sequence[Example], labels: Sequence[str], fmt: PromptFormat,
                content_free: Sequence[str] = CONTENT_FREE) -> list[float]:
    """p_cf(label): the label probabilities after `shots` for content-free queries, each renormalized over the
    labels, averaged over the queries (Zhao et al. 2021)."""
    prompts = [model_input(lm, build_prompt(shots, q, fmt, lm), fmt) for q in content_free]
    _, rows = classify_by_score(lm, prompts, labels, fmt)
    probs = []
    for row in rows:
        top = max(row)
        z = sum(math.exp(x - top) for x in row)
        probs.append([math.exp(x - top) / z for x in row])
    return [sum(p[j] for p in probs) / len(probs) for j in range(len(labels))]


def evaluate_fewshot(lm, shots: Sequence[Example], test: Sequence[Example], labels: Sequence[str] | None = None,
                     method: str = "score", fmt: PromptFormat | None = None, batch_size: int = 16,
                     calibrate: bool = False, log=None) -> FewShotResult:
    """Classify every test example with the same demonstrations `shots` (k = len(shots); [] is zero-shot) and score
    the answers against the test labels. labels: the classes to choose from (default: the test set's, sorted).
    calibrate (score method): divide out the content-free label prior (`label_prior`)."""
    if method not in ("score", "generate"):
        raise ConfigError(f"method must be 'score' or 'generate', got {method!r}")
    if calibrate and method != "score":
        raise ConfigError("calibration adjusts label log-likelihoods: it needs method 'score'")
    if not test:
        raise DataError("no test examples to evaluate")
    fmt = fmt or PromptFormat()
    labels = list(labels) if labels is not None else sorted({ex.label for ex in test})
    prompts = [model_input(lm, build_prompt(shots, ex.input, fmt, lm), fmt) for ex in test]
    longest_label = max(len(api.encode_text(lm.tokenizer, label_continuation(x, fmt))) for x in labels)
    lengths = [len(p) if not isinstance(p, str) else len(api.encode_prompt(lm, p)) for p in prompts]
    truncated = sum(n + longest_label > lm.model.config.block_size for n in lengths)  # these keep their end
    logprobs = prior = None
    if method == "score":
        preds, logprobs = classify_by_score(lm, prompts, labels, fmt, batch_size, log)
        if calibrate:
            prior = label_prior(lm, shots, labels, fmt)
            adjusted = [[lp - math.log(max(p0, 1e-30)) for lp, p0 in zip(row, prior)] for row in logprobs]
            preds = [labels[max(range(len(labels)), key=row.__getitem__)] for row in adjusted]
    else:
        preds = classify_by_generate(lm, prompts, labels, fmt, batch_size, log=log)
    acc, bal, m, columns = classification_scores([ex.label for ex in test], preds, labels)
    return FewShotResult(shots=len(shots), method=method, labels=labels, n=len(test), accuracy=acc,
                         balanced_accuracy=bal, confusion=m, columns=columns,
                         unparsed=sum(p is None for p in preds), truncated=truncated, calibrated=calibrate,
                         label_prior=prior, predictions=list(preds), label_logprobs=logprobs)
