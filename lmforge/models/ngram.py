"""N-gram language models: the first language model of every course, and the baseline a transformer must beat.

An n-gram model assumes the next token depends only on the previous ``n - 1`` tokens (a Markov chain of order
``n - 1``) and estimates ``P(w | h)`` by counting how often ``h w`` followed ``h`` in the training tokens:

    P_ML(w | h) = c(h w) / c(h)

The maximum-likelihood estimate gives probability zero to every continuation it never saw, so a single unseen
5-gram makes the perplexity of held-out text infinite. *Smoothing* moves some probability to the unseen events:

- **Add-k (Laplace when k = 1).** Pretend every continuation was seen k more times:
  ``P(w | h) = (c(h w) + k) / (c(h) + k V)``. Simple, but with a large vocabulary V it hands most of the mass to
  the unseen tokens and is a poor model (it is here for comparison, as in Jurafsky & Martin, ch. 3).
- **Interpolated Kneser-Ney** (Kneser & Ney 1995; Chen & Goodman 1998), the best classic smoother. Subtract a
  discount ``D`` (between 0 and 1) from every seen count and give the freed mass to the lower-order model:

      P_KN(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h •) / c(h) * P_KN(w | h')

  where ``h'`` drops the oldest token of ``h`` and ``N1+(h •)`` is the number of distinct tokens seen after ``h``
  (so the freed mass is exactly D per distinct continuation, and the distribution sums to one). The lower orders
  do not use raw counts but *continuation counts*, ``N1+(• h' w)``: in how many distinct contexts ``h' w`` occurs.
  The classic example: "Francisco" is frequent but follows almost only "San", so as a back-off guess after an
  unseen context it should be rare — its continuation count is 1. At the bottom, the unigram level interpolates
  with the uniform distribution 1/V, so every token keeps some probability. ``D`` per order is Ney's estimate
  ``n1 / (n1 + 2 n2)`` from the number of n-grams seen once (n1) and twice (n2).

Contexts at the very start of a text are shorter than ``n - 1`` tokens; they use the highest order they fill.
The model works on token ids, so it scores exactly the tokens a transformer is scored on: cross-entropy in nats per
token, and perplexity = exp(cross-entropy).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from lmforge.errors import ConfigError, DataError


class NGramLM:
    """An n-gram model over token ids with interpolated Kneser-Ney or add-k smoothing.

    >>> lm = NGramLM(n=2, smoothing="add_k", k=1.0, vocab_size=3).fit([0, 1, 0, 1, 2])
    >>> round(lm.prob([0], 1), 4)   # c(0 1) = 2, c(0) = 2: (2 + 1) / (2 + 3)
    0.6
    """

    def __init__(self, n: int = 3, smoothing: str = "kneser_ney", k: float = 1.0,
                 discount: float | None = None, vocab_size: int | None = None):
        smoothing = smoothing.replace("-", "_").lower()
        if smoothing in ("kn", "kneser_ney", "interpolated_kneser_ney"):
            smoothing = "kneser_ney"
        if smoothing not in ("kneser_ney", "add_k"):
            raise ConfigError(f"unknown n-gram smoothing {smoothing!r}; use kneser_ney or add_k")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n-gram order must be a positive integer, got {n!r}")
        if k <= 0:
            raise ConfigError(f"add-k needs k > 0, got {k}")
        if discount is not None and not 0 < discount <= 1:
            raise ConfigError(f"Kneser-Ney discount must be in (0, 1], got {discount}")
        self.n, self.smoothing, self.k, self.fixed_discount, self.vocab_size = n, smoothing, k, discount, vocab_size
        self.fitted = False

    # ---- training: counting ------------------------------------------------------------------------------------
    def fit(self, tokens: Sequence[int] | np.ndarray) -> "NGramLM":
        toks = np.asarray(tokens, dtype=np.int64).tolist()
        if len(toks) < 2:
            raise DataError(f"an n-gram model needs at least 2 training tokens, got {len(toks)}")
        V = self.vocab_size if self.vocab_size is not None else max(toks) + 1
        if max(toks) >= V or min(toks) < 0:
            raise DataError(f"token ids must be in [0, {V}), got range [{min(toks)}, {max(toks)}]")
        self.V = V
        n = self.n
        # raw[k]: counts of k-grams (tuples of length k), k = 1..n
        raw = {k: Counter(zip(*(toks[i:] for i in range(k)))) for k in range(1, n + 1)}
        if self.smoothing == "kneser_ney":
            # order n uses raw counts; lower orders use continuation counts N1+(• g) = distinct left extensions of g
            counts = {n: raw[n]}
            for k in range(n - 1, 0, -1):
                counts[k] = Counter(g[1:] for g in raw[k + 1])
        else:
            counts = raw
        self.counts = counts
        self.ctx_total: dict[int, Counter] = {}
        self.ctx_types: dict[int, Counter] = {}
        self.discount: dict[int, float] = {}
        for k, cnt in counts.items():
            total, types = Counter(), Counter()
            for g, c in cnt.items():
                total[g[:-1]] += c
                types[g[:-1]] += 1
            self.ctx_total[k], self.ctx_types[k] = total, types
            if self.fixed_discount is not None:
                self.discount[k] = self.fixed_discount
            else:
                n1 = sum(1 for c in cnt.values() if c == 1)
                n2 = sum(1 for c in cnt.values() if c == 2)
                self.discount[k] = n1 / (n1 + 2 * n2) if n1 and n2 else 0.75
        self.fitted = True
        return self

    # ---- probabilities -----------------------------------------------------------------------------------------
    def _check(self):
        if not self.fitted:
            raise ConfigError("the n-gram model is not fitted: call fit(tokens) first")

    def _kn(self, h: tuple[int, ...], w: int) -> float:
        """P_KN(w | h), the recursion from the order len(h) + 1 down to the uniform distribution."""
        p = 1.0 / self.V
        for k in range(1, len(h) + 2):  # bottom-up: order k uses the last k - 1 tokens of h
            ctx = h[len(h) - (k - 1):] if k > 1 else ()
            total = self.ctx_total[k].get(ctx, 0)
            if total == 0:
                continue  # context never seen at this order: keep the lower-order estimate
            D = self.discount[k]
            c = self.counts[k].get(ctx + (w,), 0)
            p = max(c - D, 0.0) / total + D * self.ctx_types[k][ctx] / total * p
        return p

    def _addk(self, h: tuple[int, ...], w: int) -> float:
        k = len(h) + 1
        c = self.counts[k].get(h + (w,), 0)
        total = self.ctx_total[k].get(h, 0)
        return (c + self.k) / (total + self.k * self.V)

    def prob(self, context: Sequence[int], token: int) -> float:
        """P(token | the last n - 1 tokens of context)."""
        self._check()
        h = tuple(int(t) for t in context)[-(self.n - 1):] if self.n > 1 else ()
        return self._kn(h, int(token)) if self.smoothing == "kneser_ney" else self._addk(h, int(token))

    def distribution(self, context: Sequence[int]) -> np.ndarray:
        """P(w | context) for every w: a (V,) array that sums to one."""
        return np.array([self.prob(context, w) for w in range(self.V)])

    def cross_entropy(self, tokens: Sequence[int] | np.ndarray) -> float:
        """Mean negative log-likelihood (nats/token) of tokens[1:], each given up to n - 1 preceding tokens."""
        self._check()
        toks = np.asarray(tokens, dtype=np.int64).tolist()
        if len(toks) < 2:
            raise DataError(f"need at least 2 tokens to score, got {len(toks)}")
        if max(toks) >= self.V:
            raise DataError(f"token id {max(toks)} is outside the model's vocabulary of {self.V}")
        nll = 0.0
        for i in range(1, len(toks)):
            nll -= math.log(self.prob(toks[max(0, i - self.n + 1):i], toks[i]))
        return nll / (len(toks) - 1)

    def perplexity(self, tokens: Sequence[int] | np.ndarray) -> float:
        return math.exp(self.cross_entropy(tokens))

    def generate(self, context: Sequence[int], max_new_tokens: int, seed: int = 0) -> list[int]:
        """Sample a continuation (the Markov chain run forward): each token from P(w | last n - 1 tokens)."""
        self._check()
        rng = np.random.default_rng(seed)
        out = [int(t) for t in context]
        for _ in range(max_new_tokens):
            p = self.distribution(out)
            out.append(int(rng.choice(self.V, p=p / p.sum())))
        return out[len(context):]
