"""Canaries carry a wrong label; the atypical set is the lowest held-out margin under the reference models."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.privacy.forget_sets import make_canaries, margin, most_atypical, relabel


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
