"""Encoder tasks on a RoBERTa directory (byte-level BPE, `<s> q </s></s> c </s>` pairs, token types all 0):
extractive QA equals transformers' question-answering pipeline on the same random weights and tokenizer, with
windows (doc_stride) and "no answer"; NER equals the token-classification pipeline under every aggregation."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.encoder_lm import load_encoder_dir  # noqa: E402
from lmforge.tasks.question_answering import qa_windows, question_answering  # noqa: E402
from lmforge.tasks.token_classification import AGGREGATIONS, token_classification  # noqa: E402
from test_qa import CONTEXT, QUESTIONS, _pipeline_oracle  # noqa: E402
from test_roberta_tokenizer import make_tokenizer_dir  # noqa: E402


@pytest.fixture(scope="module")
def roberta_qa_dir(tmp_path_factory):
    d = make_tokenizer_dir(tmp_path_factory.mktemp("roberta-qa"), n_merges=400)
    vocab_size = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(5)
    cfg = transformers.RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=514,
                                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = transformers.RobertaForQuestionAnswering(cfg).eval()
    with torch.no_grad():  # confident spans, so the best ones are not near-ties
        model.qa_outputs.weight.mul_(100)
    model.save_pretrained(str(d))
    return d


def test_windows_use_the_roberta_pair_template(roberta_qa_dir):
    tok = load_encoder_dir(roberta_qa_dir).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(roberta_qa_dir))
    q = QUESTIONS[0]
    ours = qa_windows(tok, q, CONTEXT, max_seq_len=64, doc_stride=16)
    theirs = hf(q, CONTEXT, truncation="only_second", max_length=64, stride=16, return_overflowing_tokens=True,
                return_offsets_mapping=True)
    assert [w.ids for w in ours] == theirs["input_ids"]
    assert all(set(w.type_ids) == {0} for w in ours)
    assert [w.sequence_ids for w in ours] == [theirs.sequence_ids(i) for i in range(len(ours))]


def test_roberta_question_answering_equals_transformers_pipeline(roberta_qa_dir):
    settings = [{}, {"doc_stride": 16, "max_seq_len": 64}, {"top_k": 3, "handle_impossible_answer": True}]
    theirs = _pipeline_oracle(roberta_qa_dir, QUESTIONS, CONTEXT, settings)
    lm = load_encoder_dir(roberta_qa_dir)
    ours = [question_answering(lm, q, CONTEXT, **kw) for q in QUESTIONS for kw in settings]
    for m, t in zip(ours, theirs):
        m, t = (m, t) if isinstance(m, list) else ([m], [t])
        assert [(a["start"], a["end"], a["answer"]) for a in m] == [(a["start"], a["end"], a["answer"]) for a in t]
        assert [a["score"] for a in m] == pytest.approx([a["score"] for a in t], rel=1e-4, abs=1e-7)


LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NER_TEXTS = ["Angela Merkel visited New York and the Organisation for Economic Co-operation in 2019.",
             "unaffable playing überraschend café naïve ☃ snowman, didn't we?", "Short."]


@pytest.fixture(scope="module")
def roberta_ner_dir(tmp_path_factory):
    d = make_tokenizer_dir(tmp_path_factory.mktemp("roberta-ner"), n_merges=400)
    vocab_size = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(6)
    cfg = transformers.RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=514,
                                     type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                     num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                     label2id={lab: i for i, lab in enumerate(LABELS)})
    model = transformers.RobertaForTokenClassification(cfg).eval()
    with torch.no_grad():  # confident, varied labels so that grouping has something to group
        model.classifier.weight.mul_(60)
    model.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_roberta_token_classification_equals_transformers_pipeline(roberta_ner_dir, strategy):
    """Byte-level pieces carry no continuation prefix: words are found by the no-space heuristic and pieces are
    joined by their bytes, as transformers' pipeline does for such tokenizers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns that it uses the heuristic
        pipe = transformers.pipeline("token-classification", model=str(roberta_ner_dir),
                                     aggregation_strategy=strategy, device="cpu")
        theirs_all = [pipe(t) for t in NER_TEXTS]
    ours = token_classification(load_encoder_dir(roberta_ner_dir), NER_TEXTS, aggregation_strategy=strategy)
    n = 0
    for mine, theirs in zip(ours, theirs_all):
        assert len(mine) == len(theirs), (mine, theirs)
        for m, t in zip(mine, theirs):
            assert set(m) == set(t)
            for k in m:
                if k == "score":
                    assert m[k] == pytest.approx(float(t[k]), abs=1e-5)
                else:
                    assert m[k] == t[k], (k, m, t)
        n += len(mine)
    assert n > 3
