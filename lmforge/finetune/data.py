"""Fine-tuning data: reading records, prompt templates, response-only loss masks, padding and packing.

Three kinds of supervised data, each a list of records read from JSON / JSONL / TSV / CSV (`read_records`):

* **Classification**: `{"text": ..., "label": ...}` (or a headerless TSV `label<TAB>text`, the SMS Spam
  Collection's layout). Labels are strings; the label set is fixed at training time and saved with the model.
* **Instructions, Alpaca format** (Taori et al. 2023): `{"instruction", "input", "output"}` rendered with the
  Alpaca prompt template (`alpaca_prompt`); the model learns to write `output` after "### Response:\\n".
* **Chat messages**: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}` rendered
  with the model's chat template (`lmforge.tokenizers.chat_template`); every assistant turn is a response.
* **Preferences** (DPO): Alpaca fields plus `chosen` and `rejected` responses.

**Loss only on the response.** An SFT example is prompt + response + EOS. The model sees all of it, but the loss
counts only the response tokens (and EOS, so it learns to stop): we want it to learn to *answer*, not to
reproduce the instruction. The standard way is to set the training targets of the prompt positions to -100,
which `F.cross_entropy(..., ignore_index=-100)` skips. With targets shifted by one (position t predicts token
t+1), target t is masked exactly when token t+1 belongs to the prompt:

    tokens   : [P0 P1 P2 R0 R1 EOS]          (P = prompt, R = response)
    inputs   : [P0 P1 P2 R0 R1]
    targets  : [-100 -100 R0 R1 EOS]         (P1 and P2 are never predicted; R0 is, from the whole prompt)

**Padding vs packing.** A batch is a rectangle. *Padding* fills short rows up to the longest row with a pad id
(targets -100, so padding never counts). Causal attention means real tokens never look at the padding that
follows them, so right padding needs no attention mask. *Packing* instead concatenates examples into rows of
exactly `max_length` tokens: no compute is spent on padding, at the price that an example can attend to the
unrelated example before it in its row (the common, cheap form of packing; targets stay masked per example).
Either way a row is cut at `max_length` tokens.
"""

from __future__ import annotations

import csv
import math
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.tokenizers.chat_template import apply_chat_template
from lmforge.training.data import Batches as _Batches, read_documents, source_list

IGNORE_INDEX = -100

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


# ----------------------------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------------------------
def read_records(path: str | Path, columns: Sequence[str] = ("label", "text")) -> list[dict[str, Any]]:
    """Records from a .json (a list of objects), .jsonl (one object per line), .tsv or .csv file.

    A TSV/CSV file whose first row does not name `columns` is read as headerless with those columns in that
    order (default label, text: the SMS Spam Collection). Raises DataError naming the file and the bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    elif suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records")
    else:
        delimiter = "," if suffix == ".csv" else "\t"
        rows = list(csv.reader(text.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == ","
                               else csv.QUOTE_NONE))
        rows = [r for r in rows if r]
        if not rows:
            raise DataError(f"{path}: no rows")
        header = [h.strip() for h in rows[0]]
        if all(c in header for c in columns):
            names, rows = header, rows[1:]
        else:
            names = list(columns)
        records = []
        for i, r in enumerate(rows, 1):
            if len(r) < len(names):
                raise DataError(f"{path}: row {i} has {len(r)} columns, expected {len(names)} ({', '.join(names)})")
            if len(r) > len(names):  # a TAB or comma inside the last field
                r = r[:len(names) - 1] + [delimiter.join(r[len(names) - 1:])]
            records.append(dict(zip(names, r)))
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def require(record: Mapping[str, Any], fields: Sequence[str], index: int, source: str = "data") -> None:
    """DataError naming the record when a field is missing or not a string."""
    for f in fields:
        if f not in record or record[f] is None:
            preview = json.dumps(record, ensure_ascii=False)[:80]
            raise DataError(f"{source}: record {index} has no {f!r} field: {preview}")
        if not isinstance(record[f], str):
            raise DataError(f"{source}: record {index}: field {f!r} must be a string, got {type(record[f]).__name__}")


def split(items: Sequence, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 123) -> list[list]:
    """Shuffle with a fixed seed and cut into parts (train/val/test). The last part takes the rounding rest."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be >= 0 and sum to 1, got {list(fractions)}")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    parts, start = [], 0
    for k, f in enumerate(fractions):
        end = len(idx) if k == len(fractions) - 1 else start + int(round(f * len(idx)))
        parts.append([items[i] for i in idx[start:end]])
        start = end
    return parts


# ----------------------------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------------------------
def alpaca_prompt(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt (as in the course's `format_input`), ending where the response begins.

    >>> alpaca_prompt({"instruction": "Add 2 and 3.", "input": ""})[-40:]
    '### Instruction:\\nAdd 2 and 3.\\n\\n### Response:\\n'
    """
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


def chat_segments(messages: Sequence[Mapping[str, Any]], template: str | None, bos_token: str = "",
                  eos_token: str = "") -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_response) pieces: each assistant turn is a response.

    The text before assistant turn i is the template rendered for messages[:i] with the generation prompt;
    the turn itself is what rendering messages[:i+1] adds after that (its content and end-of-turn marker).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prefix = apply_chat_template(messages[:i], template, add_generation_prompt=True, bos_token=bos_token,
                                     eos_token=eos_token)
        full = apply_chat_template(messages[:i + 1], template, add_generation_prompt=False, bos_token=bos_token,
                                   eos_token=eos_token)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError("the chat template does not render conversations incrementally (each turn appended), "
                            "so assistant turns cannot be located for the loss mask")
        segments.append((prefix[len(done):], False))
        segments.append((full[len(prefix):], True))
        done = full
    rest = apply_chat_template(messages, template, add_generation_prompt=False, bos_token=bos_token,
                               eos_token=eos_token)[len(done):]
    if rest:
        segments.append((rest, False))
    return [(t, r) for t, r in segments if t]


# ----------------------------------------------------------------------------------------------------------------
# Tokenized examples
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenized example: `ids` and, per token, whether it is a training target (a response token)."""

    ids: list[int]
    target: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def _encode(tok, text: str, specials: bool) -> list[int]:
    """Special-token text is read as special tokens only where a template put it (`specials=True`)."""
    try:
        if specials:
            return list(tok.encode(text, allowed_special="all"))
        return list(tok.encode(text, disallowed_special=()))
    except TypeError:  # a tokenizer without tiktoken-style special-token arguments
        return list(tok.encode(text))


def _bos(tok) -> list[int]:
    bos = getattr(tok, "bos_token_id", None)
    return [bos] if getattr(tok, "add_bos_token", False) and bos is not None else []


def encode_prompt_response(tok, prompt: str, response: str, add_eos: bool = True) -> Example:
    """[BOS] prompt response [EOS], targets on the response and EOS only."""
    p = _bos(tok) + _encode(tok, prompt, False)
    r = _encode(tok, response, False)
    eos = getattr(tok, "eos_token_id", None)
    if add_eos and eos is not None:
        r = r + [eos]
    return Example(p + r, [False] * len(p) + [True] * len(r))


def encode_chat(tok, messages: Sequence[Mapping[str, Any]], template: str | None) -> Example:
    ids, target = [], []
    bos_tok = getattr(tok, "bos_token", None) or ""
    eos_tok = getattr(tok, "eos_token", None) or ""
    for text, is_response in chat_segments(messages, template, bos_tok, eos_tok):
        part = _encode(tok, text, True)
        ids += part
        target += [is_response] * len(part)
    return Example(ids, target)


def is_chat_record(record: Mapping[str, Any]) -> bool:
    return "messages" in record


def sft_example(tok, record: Mapping[str, Any], index: int, template: str | None = None,
                source: str = "data") -> Example:
    """A record in Alpaca or chat-messages form -> Example. Missing fields raise DataError naming the record."""
    if is_chat_record(record):
        msgs = record["messages"]
        if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                 for m in msgs):
            raise DataError(f"{source}: record {index}: 'messages' must be a list with at least one assistant turn")
        from lmforge.errors import GenerationError

        try:
            return encode_chat(tok, msgs, template)
        except GenerationError as e:
            raise DataError(f"{source}: record {index}: {e}") from None
    require(record, ("instruction", "output"), index, source)
    if record.get("input") is not None and not isinstance(record["input"], str):
        raise DataError(f"{source}: record {index}: field 'input' must be a string")
    return encode_prompt_response(tok, alpaca_prompt(record), record["output"])


def sft_prompt(record: Mapping[str, Any], template: str | None = None) -> str:
    """The text a model continues to answer a record (for generation at evaluation time)."""
    if is_chat_record(record):
        from lmforge.tokenizers.chat_template import apply_chat_template

        msgs = list(record["messages"])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        return apply_chat_template(msgs, template, add_generation_prompt=True)
    return alpaca_prompt(record)


def sft_reference(record: Mapping[str, Any]) -> str:
    """The expected answer of a record (the output, or the last assistant turn)."""
    if is_chat_record(record):
        return next(m["content"] for m in reversed(record["messages"]) if m.get("role") == "assistant")
    return record["output"]


def truncate(ex: Example, max_length: int) -> Example:
    """Keep the first max_length + 1 tokens (max_length inputs and their targets)."""
    return Example(ex.ids[:max_length + 1], ex.target[:max_length + 1])


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------
def to_inputs_targets(ex: Example) -> tuple[list[int], list[int]]:
    """Shift by one: inputs = ids[:-1], targets[t] = ids[t+1] if token t+1 is a target else -100."""
    inputs = ex.ids[:-1]
    targets = [tid if is_t else IGNORE_INDEX for tid, is_t in zip(ex.ids[1:], ex.target[1:])]
    return inputs, targets


def pad_collate(examples: Sequence[Example], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (B, T), labels (B, T) with -100 on prompt and padding,
    attention_mask (B, T)."""
    pairs = [to_inputs_targets(truncate(e, max_length) if max_length else e) for e in examples]
    T = max(len(i) for i, _ in pairs)
    B = len(pairs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (inp, tgt) in enumerate(pairs):
        input_ids[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
        labels[b, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        mask[b, :len(inp)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples (in order) and cut into rows of max_length + 1 tokens; the last partial row is kept."""
    ids, target = [], []
    for e in examples:
        ids += e.ids
        target += e.target
    rows, step = [], max_length + 1
    for s in range(0, len(ids), max_length):
        chunk_ids, chunk_t = ids[s:s + step], target[s:s + step]
        if len(chunk_ids) >= 2:
            rows.append(Example(chunk_ids, [False] + chunk_t[1:]))  # token 0 of a row is never predicted
    return rows


class Batches(_Batches):
    """index -> batch over a list of items (the loop's data source), reshuffled per epoch from (seed, epoch).

    `lmforge.training.data.Batches` plus two options:
    * `weights` (one per item): each epoch draws its items with replacement in proportion to the weights, so a
      rare class is seen as often as a common one (class-balanced sampling);
    * `lengths` (one per item): group items of similar length into the same batch (Hugging Face's
      `group_by_length`). A padded batch costs (batch size x its longest row); random batches of texts whose
      lengths vary a lot are mostly padding. Each epoch's shuffled order is cut into windows of 50 batches, each
      window is sorted by length and cut into batches, and the batches are shuffled again.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any],
                 shuffle: bool = True, seed: int = 0, weights: Sequence[float] | None = None,
                 lengths: Sequence[int] | None = None):
        if not items:
            raise DataError("no examples to make batches of")
        super().__init__(list(items), batch_size, shuffle=shuffle, drop_last=shuffle and len(items) >= batch_size,
                         seed=seed, collate=collate)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            self.weights = w / w.sum()
        self.lengths = np.asarray(lengths) if lengths is not None else None

    def _order(self, epoch: int) -> np.ndarray:
        if self.weights is None:
            order = super()._order(epoch)
        else:
            rng = np.random.default_rng([self.seed, epoch, 1])
            order = rng.choice(len(self.dataset), size=len(self.dataset), replace=True, p=self.weights)
        if self.lengths is None or not self.shuffle:
            return order
        bs, window = self.batch_size, self.batch_size * 50
        batches = []
        for s in range(0, len(order), window):
            chunk = order[s:s + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
        full = [b for b in batches if len(b) == bs]
        rng = np.random.default_rng([self.seed, epoch, 2])
        perm = rng.permutation(len(full))
        return np.concatenate([full[i] for i in perm] + [b for b in batches if len(b) < bs])

    def all(self) -> list[Any]:
        """Every batch of one pass in order (for evaluation)."""
        return [self.collate(self.dataset[s:s + self.batch_size])
                for s in range(0, len(self.dataset), self.batch_size)]


def balanced_weights(labels: Sequence[int]) -> list[float]:
    """Per-item weights so that each class is drawn equally often: 1 / count(class)."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return [1.0 / counts[y] for y in labels]


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------
def classification_examples(records: Sequence[Mapping[str, Any]], text_field: str = "text",
                            label_field: str = "label", source: str = "data") -> tuple[list[str], list[str]]:
    """(texts, label strings), checking every record."""
    texts, labels = [], []
    for i, r in enumerate(records):
        if r.get(text_field) is None:
            raise DataError(f"{source}: record {i} has no {text_field!r} field")
        if r.get(label_field) is None or str(r[label_field]).strip() == "":
            raise DataError(f"{source}: record {i} has no {label_field!r} (label) value")
        texts.append(str(r[text_field]))
        labels.append(str(r[label_field]).strip())
    return texts, labels


def label_ids(labels: Sequence[str], names: Sequence[str], source: str = "data") -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, y in enumerate(labels):
        if y not in index:
            raise DataError(f"{source}: record {i} has label {y!r}, which the model was not trained on "
                            f"(labels: {', '.join(names)})")
        out.append(index[y])
    return out


def encode_texts(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text ([BOS] text), cut to max_length (keeping the start). An empty text gets one token."""
    out = []
    for t in texts:
        ids = (_bos(tok) + _encode(tok, t, False))[:max_length]
        if not ids:
            eos = getattr(tok, "eos_token_id", None)
            ids = [eos if eos is not None else 0]
        out.append(ids)
    return out


def classification_collate(items: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """[(ids, label)] -> input_ids (B, T) right-padded, attention_mask (B, T), labels (B,)."""
    T = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for b, (ids, _) in enumerate(items):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, :len(ids)] = 1
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------
# Preferences (DPO)
# ----------------------------------------------------------------------------------------------------------------
def preference_examples(tok, record: Mapping[str, Any], index: int, source: str = "data") -> tuple[Example, Example]:
    """(chosen, rejected) examples sharing the Alpaca prompt; targets on each response only."""
    require(record, ("instruction", "chosen", "rejected"), index, source)
    prompt = alpaca_prompt(record)
    return (encode_prompt_response(tok, prompt, record["chosen"]),
            encode_prompt_response(tok, prompt, record["rejected"]))


def preference_collate(pairs: Sequence[tuple[Example, Example]], pad_id: int,
                       max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B] (TRL's order), padded together: (2B, T)."""
    batch = pad_collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, max_length)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Pretraining text: forgetting checks and replay
# ----------------------------------------------------------------------------------------------------------------
def text_tokens(tok, sources: str | Sequence[str]) -> np.ndarray:
    """The token stream pretraining builds from `sources` (files, globs, or "builtin"): each document encoded with
    special-token text read as text, followed by EOS (`lmforge.training.data.tokenize_to_shards`, held in memory
    instead of shards). Comma-separated sources are several."""
    eos = getattr(tok, "eos_token_id", None)
    out: list[np.ndarray] = []
    for text, last in read_documents(source_list(sources)):
        out.append(np.asarray(_encode(tok, text, specials=False), dtype=np.int64))
        if last and eos is not None:
            out.append(np.asarray([eos], dtype=np.int64))
    tokens = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    if len(tokens) < 2:
        raise DataError(f"{sources}: no text to read")
    return tokens


class ReplayMix:
    """Batch source that replaces a fraction `ratio` of the batches of `main` with `replay` batches (plain
    next-token batches of pretraining text), spread evenly: batch i is a replay batch when floor((i+1) r) >
    floor(i r). With r = 0.25 batches 3, 7, 11, ... are replay batches; main's batches keep their order.

        mixed(i) = replay(floor(i r))  if batch i is a replay batch
                   main(i - floor(i r)) otherwise (i minus the replay batches before it)

    Rehearsal (replay) of the old task's data is the oldest cure for catastrophic forgetting (Robins 1995); for
    language models, mixing pretraining batches into fine-tuning keeps the pretraining loss from drifting far
    (e.g. Ouyang et al. 2022's "PPO-ptx"; Ibrahim et al. 2024 for continual pretraining). Both sources are
    addressed by index, so the mix is the same in every run and after a resume. `len` is the main source's
    batches per epoch plus the replay batches among them, so `epochs` still means passes over `main`.
    """

    def __init__(self, main, replay, ratio: float):
        if not 0.0 < ratio < 1.0:
            raise DataError(f"replay ratio must be in (0, 1), got {ratio}")
        self.main, self.replay, self.ratio = main, replay, ratio

    def __len__(self) -> int:
        return math.ceil(len(self.main) / (1.0 - self.ratio))

    def is_replay(self, i: int) -> bool:
        return math.floor((i + 1) * self.ratio) > math.floor(i * self.ratio)

    def __call__(self, i: int):
        k = math.floor(i * self.ratio)  # replay batches before batch i
        return self.replay(k) if self.is_replay(i) else self.main(i - k)
