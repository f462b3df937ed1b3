"""Canaries carry a wrong label; the atypical set is the lowest held-out margin under the reference models."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.privacy.forget_sets import make_canaries, margin, most_atypical, relabel, with_copies


def test_canaries_are_seeded_distinct_and_always_wrong():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    idx, wrong = make_canaries(labels, 300, 10, seed=3)
    assert idx.size == 300 == np.unique(idx).size
    assert (wrong != labels[idx]).all() and ((wrong >= 0) & (wrong < 10)).all()
    idx2, wrong2 = make_canaries(labels, 300, 10, seed=3)
    assert (idx == idx2).all() and (wrong == wrong2).all()
    new = relabel(labels, idx, wrong)
    assert (new != labels).sum() == 300 and (labels == np.random.default_rng(0).integers(0, 10, 5000)).all()
    with pytest.raises(ValueError, match="canary count"):
        make_canaries(labels, 0, 10)


def test_most_atypical_uses_held_out_margins_only():
    logits = np.array([[3.0, 1.0], [0.0, 2.0], [1.0, 0.5]])
    assert np.allclose(margin(logits, np.array([0, 0, 0])), [2.0, -2.0, 0.5])
    # 2 reference models, 4 examples; model 0 saw 0 and 1, model 1 saw 2 and 3
    ref_in = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    ref_margins = np.array([[-9.0, -9.0, 5.0, -1.0],   # low margins on its own members must not count
                            [1.0, 4.0, 9.0, 9.0]])
    # held-out margins: ex0 1.0, ex1 4.0, ex2 5.0, ex3 -1.0
    assert most_atypical(ref_margins, ref_in, 2).tolist() == [0, 3]
    assert most_atypical(ref_margins, ref_in, 2, exclude=np.array([3])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="can be ranked"):
        most_atypical(ref_margins, ref_in, 4, exclude=np.array([3]))


def test_a_canarys_copies_go_in_and_out_with_it():
    canaries = np.array([2, 5, 7])
    # 10 training rows, each canary 3 times: copies at 10 + r * 3 + j
    assert with_copies(np.array([0, 5, 7]), canaries, 10, 3).tolist() == [0, 5, 7, 11, 12, 14, 15]
    assert with_copies(np.array([0, 1]), canaries, 10, 3).tolist() == [0, 1]      # no canary, no copy
    assert with_copies(np.array([5]), canaries, 10, 1).tolist() == [5]           # once: nothing appended
    # a half and its complement split every canary's copies between them, never one copy each way
    half = np.array([0, 2, 4, 6, 8])
    rest = np.setdiff1d(np.arange(10), half)
    a, b = with_copies(half, canaries, 10, 3), with_copies(rest, canaries, 10, 3)
    assert np.intersect1d(a, b).size == 0 and np.union1d(a, b).tolist() == list(range(16))
    with pytest.raises(ValueError, match="repeats"):
        with_copies(half, canaries, 10, 0)
    with pytest.raises(ValueError, match="0..9"):
        with_copies(np.array([10]), canaries, 10, 2)


def test_the_settings_training_data_holds_each_canary_repeated_at_its_wrong_label():
    from daemon.bench.membership import CANARY_REPEATS, training_plan
    from daemon.data.mnist import load_mnist

    plan = training_plan(canaries=300)
    n, c = plan.n_train, plan.canaries
    x, y = plan.train_splits.train_x, plan.train_splits.train_y
    assert x.shape[0] == n + (CANARY_REPEATS - 1) * 300 == y.shape[0]
    for r in range(CANARY_REPEATS - 1):
        rows = n + r * 300 + np.arange(300)
        assert (y[rows] == plan.splits.train_y[c]).all() and (x[rows] == x[c]).all()
    assert plan.recipe["canary_repeats"] == CANARY_REPEATS
    assert (plan.splits.train_y[c] != load_mnist().train_y[c]).all()


def test_continual_sets_are_disjoint_rounds_of_their_kind():
    """Ten disjoint rounds per kind, reproducible by seed: round r's retrain (without rounds 1..r) is well defined."""
    from daemon.bench.membership import continual_sets

    canaries = np.arange(0, 600, 2)                           # 300 canaries among 1000 training examples
    sets = continual_sets(canaries, 1000, rounds=10, k=32, seed=0)
    assert [s.size for s in sets["canary"]] == [30] * 10      # 300 canaries do not hold 10 × 32
    assert [s.size for s in sets["random"]] == [32] * 10
    for kind, members in (("canary", canaries), ("random", np.setdiff1d(np.arange(1000), canaries))):
        flat = np.concatenate(sets[kind])
        assert np.unique(flat).size == flat.size and np.isin(flat, members).all(), kind
    again = continual_sets(canaries, 1000, rounds=10, k=32, seed=0)
    other = continual_sets(canaries, 1000, rounds=10, k=32, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(sets["random"], again["random"]))
    assert not np.array_equal(sets["random"][0], other["random"][0])
