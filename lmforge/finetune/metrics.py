"""Scores for fine-tuned models: classification metrics and a confusion-matrix plot, and ROUGE-L for generations.

**Accuracy is not enough** when classes are unbalanced: 87% of the SMS Spam Collection is ham, so a model that
never says "spam" is 87% accurate. Per class c:

    precision_c = TP / (TP + FP)   of the messages we called c, how many were c
    recall_c    = TP / (TP + FN)   of the messages that were c, how many we found
    F1_c        = 2 P R / (P + R)  their harmonic mean (low if either is low)

The confusion matrix M[i][j] counts examples of true class i predicted as j; its diagonal holds the correct ones.

**ROUGE-L** (Lin 2004) scores a generated text against a reference by their *longest common subsequence*: the
longest run of words that appear in both in the same order, not necessarily adjacent. With LCS length L,
candidate length m and reference length n: precision L/m, recall L/n, F = 2PR/(P+R). It rewards getting the
content words in the right order without demanding exact phrasing. Words are the lowercased alphanumeric runs
(the tokenization of Google's `rouge-score` package, without stemming).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence
from lmforge.utils import atomic_write


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> list[list[int]]:
    m = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred):
        m[t][p] += 1
    return m


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """accuracy, per-class precision/recall/F1/support, macro averages and the confusion matrix."""
    K = len(labels)
    m = confusion_matrix(y_true, y_pred, K)
    n = len(y_true)
    per_class = {}
    for c, name in enumerate(labels):
        tp = m[c][c]
        fp = sum(m[r][c] for r in range(K)) - tp
        fn = sum(m[c]) - tp
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": sum(m[c])}
    return {
        "n": n,
        "accuracy": sum(m[c][c] for c in range(K)) / n if n else 0.0,
        "macro_precision": sum(v["precision"] for v in per_class.values()) / K,
        "macro_recall": sum(v["recall"] for v in per_class.values()) / K,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / K,
        "per_class": per_class,
        "confusion_matrix": m,
    }


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Write the confusion matrix as a PNG heat map with counts in the cells (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * K + 2.5, 1.2 * K + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(K), labels=list(labels))
    ax.set_yticks(range(K), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i in range(K):
        for j in range(K):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > top / 2 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercased alphanumeric words: "Hello, World-2!" -> ['hello', 'world', '2']."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by dynamic programming, O(len(a) * len(b)) time, O(len(b)) memory.

    >>> lcs_length("a b c d".split(), "a c x d".split())
    3
    """
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F-measure of one candidate against one reference."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "fmeasure": 2 * p * rec / (p + rec)}
