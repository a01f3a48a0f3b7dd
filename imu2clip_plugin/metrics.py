"""Evaluation metrics: cross-modal retrieval and classification.

Retrieval takes a similarity matrix ``sim (Q, N)`` (queries × candidates) and the index of each query's
correct candidate ``target (Q,)``. The rank of a query is 1 + the number of candidates scored strictly higher
than its target (ties count in the query's favour). Every result carries ``N``, the number of candidates, so
numbers from galleries of different sizes are never compared blindly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 50)


def retrieval_ranks(sim: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's target among the candidates. ``target`` defaults to ``arange(Q)``."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be (queries, candidates), got shape {sim.shape}")
    q, n = sim.shape
    target = np.arange(q) if target is None else np.asarray(target, dtype=np.int64)
    if target.shape != (q,) or (target < 0).any() or (target >= n).any():
        raise ValueError(f"target must be {q} indices in [0, {n}), got {target!r}")
    correct = sim[np.arange(q), target]
    return 1 + (sim > correct[:, None]).sum(axis=1)


def retrieval_metrics(sim: np.ndarray, target: np.ndarray | None = None, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """``{"N": candidates, "queries": Q, "R@k": fraction with rank <= k, "MRR", "median_rank", "chance_R@1"}``."""
    ranks = retrieval_ranks(sim, target)
    n = int(np.asarray(sim).shape[1])
    out: dict = {"N": n, "queries": int(ranks.size)}
    for k in ks:
        out[f"R@{k}"] = float(np.mean(ranks <= k))
    out["MRR"] = float(np.mean(1.0 / ranks))
    out["median_rank"] = float(np.median(ranks))
    out["chance_R@1"] = 1.0 / n
    return out


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = samples of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> dict:
    """Accuracy and macro-F1 (the mean F1 over the classes present in ``y_true`` or ``y_pred``)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    return {
        "n": int(cm.sum()),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_f1": f1.tolist(),
    }
