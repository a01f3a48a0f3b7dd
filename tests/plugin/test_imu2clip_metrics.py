"""Metrics on hand-built similarity matrices and labels whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from imu2clip_plugin.metrics import classification_metrics, confusion_matrix, retrieval_metrics, retrieval_ranks


def test_ranks_on_a_hand_built_matrix():
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],   # target 0 is the best: rank 1
        [0.8, 0.7, 0.1, 0.0],   # target 1 beaten by one: rank 2
        [0.5, 0.6, 0.1, 0.7],   # target 2 beaten by three: rank 4
        [0.2, 0.2, 0.2, 0.2],   # a tie counts in the query's favour: rank 1
    ])
    assert retrieval_ranks(sim).tolist() == [1, 2, 4, 1]
    m = retrieval_metrics(sim, ks=(1, 2, 3))
    assert m["N"] == 4 and m["queries"] == 4 and m["chance_R@1"] == 0.25
    assert m["R@1"] == 0.5 and m["R@2"] == 0.75 and m["R@3"] == 0.75
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1) / 4)
    assert m["median_rank"] == 1.5


def test_explicit_targets_and_both_directions():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(5, 7))
    target = np.array([6, 0, 3, 3, 1])
    sim[np.arange(5), target] = 10  # each target is the best of its row
    assert retrieval_ranks(sim, target).tolist() == [1] * 5
    # the other direction is the transpose; with a permutation the known ranks follow the permutation
    perm = rng.permutation(6)
    sq = np.eye(6)[perm] * 2 - 1  # row i's best column is perm[i]
    assert retrieval_ranks(sq, perm).tolist() == [1] * 6
    assert retrieval_ranks(sq.T, np.argsort(perm)).tolist() == [1] * 6
    worst = retrieval_ranks(-sq, perm)
    assert worst.tolist() == [6] * 6


def test_bad_inputs():
    with pytest.raises(ValueError, match="queries, candidates"):
        retrieval_ranks(np.zeros(3))
    with pytest.raises(ValueError, match=r"indices in \[0, 2\)"):
        retrieval_ranks(np.zeros((2, 2)), np.array([0, 2]))


def test_classification_metrics():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = classification_metrics(y_true, y_pred, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: class 0: tp1 / (2+2) *2 = 0.5; class 1: 2*2/(2+3) = 0.8; class 2: 2*1/(2+1) = 2/3
    assert m["per_class_f1"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class that never occurs (neither true nor predicted) does not dilute macro-F1
    assert classification_metrics([0, 1], [0, 1], 5)["macro_f1"] == 1.0
