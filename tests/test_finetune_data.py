"""Fine-tuning data: prompt masking position by position, chat masks, packing, readers, bad records, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import DataError
from lmforge.finetune import data as D
from lmforge.finetune import metrics as M
from lmforge.tokenizers.bpe import Tokenizer

CORPUS = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request. ### Instruction: ### Input: ### Response: user assistant system hello world the spam ham ") * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([CORPUS], vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                           progress=False)


RECORDS = [{"instruction": "Say hello.", "input": "", "output": "Hello world."},
           {"instruction": "Rewrite the text.", "input": "the spam", "output": "The ham, really."}]


def test_alpaca_template_is_the_course_format():
    assert D.alpaca_prompt(RECORDS[0]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hello.\n\n### Response:\n")
    assert "\n\n### Input:\nthe spam\n\n### Response:\n" in D.alpaca_prompt(RECORDS[1])


def test_prompt_masking_position_by_position(tok):
    examples = [D.sft_example(tok, r, i) for i, r in enumerate(RECORDS)]
    batch = D.pad_collate(examples, pad_id=tok.eos_token_id)
    for b, r in enumerate(RECORDS):
        prompt_ids = tok.encode(D.alpaca_prompt(r))
        response_ids = tok.encode(r["output"]) + [tok.eos_token_id]
        full = prompt_ids + response_ids
        n_in = len(full) - 1
        ids, labels, mask = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b]
        assert ids[:n_in].tolist() == full[:-1]
        for t in range(ids.shape[0]):
            if t >= n_in:  # padding: never a target, not attended
                assert labels[t] == -100 and mask[t] == 0 and ids[t] == tok.eos_token_id
            elif t + 1 < len(prompt_ids):  # predicting a prompt token: ignored
                assert labels[t] == -100 and mask[t] == 1
            else:  # predicting a response token (or the final EOS) from everything before it
                assert labels[t] == full[t + 1] and mask[t] == 1
        assert tok.decode([x for x in labels.tolist() if x != -100]) == r["output"] + "<|endoftext|>"


def test_chat_masks_exactly_the_assistant_turns(tok):
    rec = {"messages": [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hello"},
                        {"role": "assistant", "content": "world"}, {"role": "user", "content": "spam?"},
                        {"role": "assistant", "content": "ham"}]}
    ex = D.sft_example(tok, rec, 0, template=None)  # ChatML
    text = tok.decode(ex.ids)
    assert text == ("<|im_start|>system\nbe terse<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant"
                    "\nworld<|im_end|>\n<|im_start|>user\nspam?<|im_end|>\n<|im_start|>assistant\nham<|im_end|>\n")
    trained = [tok.decode([i for i, t in zip(ex.ids, ex.target) if t])]
    assert trained == ["world<|im_end|>\nham<|im_end|>\n"]
    assert ex.ids.count(tok.special_tokens["<|im_start|>"]) == 5  # template markers are single special tokens
    # the generation prompt ends where the last assistant turn begins
    assert D.sft_prompt(rec).endswith("<|im_start|>user\nspam?<|im_end|>\n<|im_start|>assistant\n")
    assert D.sft_reference(rec) == "ham"


def test_user_text_never_becomes_a_special_token(tok):
    ex = D.sft_example(tok, {"instruction": "<|endoftext|>", "output": "x"}, 0)
    assert ex.ids.count(tok.eos_token_id) == 1  # only the EOS we append


def test_packing_keeps_targets_and_fills_rows(tok):
    examples = [D.sft_example(tok, r, i) for i, r in enumerate(RECORDS * 3)]
    rows = D.pack(examples, max_length=32)
    assert all(len(r) == 33 for r in rows[:-1]) and 2 <= len(rows[-1]) <= 33
    flat = [t for e in examples for t in e.ids]
    assert [t for r in rows for t in r.ids[1:]] == flat[1:]  # rows overlap by one token: every target once
    batch = D.pad_collate(rows, pad_id=0)
    n_targets = sum(sum(e.target) for e in examples)
    assert int((batch["labels"] != -100).sum()) == n_targets - int(examples[0].target[0])


def test_missing_fields_name_the_record(tmp_path, tok):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(RECORDS + [{"instruction": "no output here"}]))
    recs = D.read_records(p)
    with pytest.raises(DataError, match=r"record 2 has no 'output' field") as e:
        [D.sft_example(tok, r, i, source=str(p)) for i, r in enumerate(recs)]
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="record 0 has no 'rejected' field"):
        D.preference_examples(tok, {"instruction": "a", "chosen": "b"}, 0)
    with pytest.raises(DataError, match="record 1 has label 'eggs', which the model was not trained on"):
        D.label_ids(["ham", "eggs"], ["ham", "spam"])
    with pytest.raises(DataError, match="record 0 has no 'label'"):
        D.classification_examples([{"text": "x", "label": ""}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.read_records(bad)


def test_readers(tmp_path):
    tsv = tmp_path / "sms.tsv"
    tsv.write_text("ham\tGo until jurong point\nspam\tFree entry in 2 a wkly comp\tX\n")
    assert D.read_records(tsv) == [{"label": "ham", "text": "Go until jurong point"},
                                   {"label": "spam", "text": "Free entry in 2 a wkly comp\tX"}]
    csv_ = tmp_path / "d.csv"
    csv_.write_text('text,label\n"hello, there",pos\nbad,neg\n')
    assert D.read_records(csv_) == [{"text": "hello, there", "label": "pos"}, {"text": "bad", "label": "neg"}]
    a, b, c = D.split(list(range(100)), (0.7, 0.1, 0.2), seed=123)
    assert (len(a), len(b), len(c)) == (70, 10, 20) and sorted(a + b + c) == list(range(100))
    assert D.split(list(range(100)), seed=123)[0] == a


def test_batches_are_deterministic_and_balanced():
    items = list(range(10))
    src = D.Batches(items, 4, collate=list, seed=3)
    assert src(0) == D.Batches(items, 4, collate=list, seed=3)(0)
    assert len(set(src(0) + src(1))) == 8  # within an epoch no item repeats
    assert [src(k) for k in range(2, 6)] != [src(k) for k in range(4, 8)]  # each epoch has its own order
    labels = [0] * 9 + [1]
    bal = D.Batches(list(zip(items, labels)), 50, collate=list, seed=0, weights=D.balanced_weights(labels))
    drawn = [y for _, y in bal(0) + bal(1) + bal(2)]
    assert 0.35 < sum(drawn) / len(drawn) < 0.65  # the 1-in-10 class is drawn about half the time


def test_rouge_l_matches_rouge_score():
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rs.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("The cat sat on the mat.", "A cat was sitting on the mat"),
             ("Hello, World-2!", "hello world 2"), ("", "something"), ("x y z", "a b c"),
             ("the quick brown fox jumps over the lazy dog", "the lazy dog jumps over the quick brown fox")]
    for c, r in pairs:
        ref = scorer.score(r, c)["rougeL"]  # score(target, prediction)
        ours = M.rouge_l(c, r)
        assert ours["fmeasure"] == pytest.approx(ref.fmeasure)
        assert ours["precision"] == pytest.approx(ref.precision) and ours["recall"] == pytest.approx(ref.recall)


def test_classification_metrics_match_sklearn(tmp_path):
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=g).tolist()
    p = [t if torch.rand(1, generator=g).item() < 0.7 else (t + 1) % 3 for t in y]
    ours = M.classification_metrics(y, p, ["a", "b", "c"])
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert ours["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    prec = skm.precision_score(y, p, average=None)
    assert [ours["per_class"][k]["precision"] for k in "abc"] == pytest.approx(list(prec))
    assert ours["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()
    png = M.plot_confusion(ours["confusion_matrix"], ["a", "b", "c"], tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_by_length_cuts_padding_and_keeps_every_item():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (400,), generator=g).tolist()
    items = list(range(400))
    grouped = D.Batches(items, 8, collate=list, seed=1, lengths=lengths)
    plain = D.Batches(items, 8, collate=list, seed=1)
    for src in (grouped, plain):
        assert sorted(i for k in range(len(src)) for i in src(k)) == items  # one epoch: every item once
    pad = lambda src: sum(8 * max(lengths[i] for i in src(k)) for k in range(len(src)))  # noqa: E731
    assert pad(grouped) < 0.7 * pad(plain)
    assert grouped(0) != grouped(len(grouped))  # the next epoch is shuffled differently
