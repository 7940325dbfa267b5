"""N-gram baseline: hand-computed Kneser-Ney and add-k values, normalization, continuation counts, held-out quality."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.models.ngram import NGramLM
from tests.conftest import data_file


def test_bigram_kneser_ney_by_hand():
    # bigrams (0,1)x2 (1,0) (0,2) (2,0); continuation counts: N1+(.0)=2, N1+(.1)=1, N1+(.2)=1; D = 0.5
    lm = NGramLM(n=2, smoothing="kneser_ney", discount=0.5, vocab_size=3).fit([0, 1, 0, 2, 0, 1])
    # unigram: (N1+(.w) - D) / 4 + D * 3 / 4 * 1/3
    assert lm.prob([], 0) == pytest.approx(0.5) and lm.prob([], 1) == pytest.approx(0.25)
    # P(1|0) = (2 - .5)/3 + .5 * 2/3 * P_uni(1)
    assert lm.prob([0], 1) == pytest.approx(7 / 12)
    assert lm.prob([0], 0) == pytest.approx(1 / 6)
    assert lm.prob([0], 2) == pytest.approx(1 / 4)


def test_add_k_closed_form():
    lm = NGramLM(n=2, smoothing="add_k", k=0.5, vocab_size=4).fit([0, 1, 0, 1, 2, 3])
    assert lm.prob([0], 1) == pytest.approx((2 + 0.5) / (2 + 0.5 * 4))
    assert lm.prob([3], 1) == pytest.approx(0.5 / (0 + 0.5 * 4))  # context never followed by anything
    assert lm.distribution([1]).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("smoothing", ["kneser_ney", "add_k"])
def test_distributions_sum_to_one(n, smoothing):
    rng = np.random.default_rng(n)
    toks = rng.integers(0, 12, size=400) // rng.integers(1, 3, size=400)  # skewed
    lm = NGramLM(n=n, smoothing=smoothing, vocab_size=12).fit(toks)
    for ctx in ([], [int(toks[5])], toks[10:13].tolist(), [11, 11, 11], [0, 5, 7, 3]):
        d = lm.distribution(ctx)
        assert d.min() > 0 and d.sum() == pytest.approx(1.0, abs=1e-9)


def test_continuation_counts_san_francisco():
    # token 9 ("Francisco") is frequent but always after 8 ("San"); token 5 is rarer but follows many tokens
    toks = [8, 9] * 20 + [1, 5, 2, 5, 3, 5, 4, 5]
    lm = NGramLM(n=2, vocab_size=10).fit(toks)
    unseen_ctx = [7]  # never seen as a context: the back-off (continuation) unigram decides
    assert lm.prob(unseen_ctx, 5) > lm.prob(unseen_ctx, 9)
    assert lm.prob([8], 9) > 0.9


def test_kneser_ney_beats_add_k_and_lower_orders_on_held_out_text():
    text = data_file("the-verdict.txt").read_text(encoding="utf-8")
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    cut = int(len(ids) * 0.9)
    tr, va = ids[:cut], ids[cut:]
    kn = {n: NGramLM(n=n, vocab_size=256).fit(tr).cross_entropy(va) for n in (1, 3, 5)}
    addk = NGramLM(n=5, smoothing="add_k", k=1.0, vocab_size=256).fit(tr).cross_entropy(va)
    assert kn[5] < kn[3] < kn[1] < math.log(256)
    assert kn[5] < addk - 0.5
    assert NGramLM(n=5, vocab_size=256).fit(tr).perplexity(va) == pytest.approx(math.exp(kn[5]))


def test_generate_and_errors():
    lm = NGramLM(n=3, vocab_size=5).fit([0, 1, 2, 3, 4] * 10)
    out = lm.generate([0, 1], 8, seed=1)
    assert len(out) == 8 and out[:3] == [2, 3, 4]  # the chain is almost deterministic here
    with pytest.raises(ConfigError, match="smoothing"):
        NGramLM(smoothing="witten_bell")
    with pytest.raises(ConfigError, match="not fitted"):
        NGramLM().prob([1], 2)
    with pytest.raises(DataError, match="outside"):
        lm.cross_entropy([1, 7])


def test_sliding_window_perplexity_scores_each_token_once_with_full_context():
    """stride=1: target t is predicted from the T tokens before it (from all of them while t <= T); checked against
    one forward per target. Non-overlapping windows (the default) cost less and see less context."""
    import torch
    import torch.nn.functional as F

    from lmforge.models.config import ModelConfig
    from lmforge.training.eval import perplexity
    from lmforge.models.decoder import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("llama-tiny", vocab_size=50, block_size=16, n_layer=2, n_embd=32,
                                              n_head=2, n_kv_head=1, intermediate_size=64)).eval()
    toks = np.random.default_rng(0).integers(0, 50, size=61)
    T = 8
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(toks)):
            ctx = torch.from_numpy(toks[max(0, t - T):t])[None]
            nll -= F.log_softmax(model(ctx)[0, -1], -1)[int(toks[t])].item()
    full = perplexity(model, toks, T, batch_size=5, stride=1)
    assert full["tokens"] == len(toks) - 1 and full["loss"] == pytest.approx(nll / (len(toks) - 1), rel=1e-5)
    for stride in (3, T):  # any stride scores every token exactly once
        assert perplexity(model, toks, T, stride=stride)["tokens"] == len(toks) - 1
    with pytest.raises(DataError, match="stride"):
        perplexity(model, toks, T, stride=T + 1)
