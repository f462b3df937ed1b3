"""Reference models are cached by recipe: a second call trains nothing and loads the same halves."""

from __future__ import annotations

import numpy as np
import torch

from daemon.privacy.reference import cached_count, ensure_references


def test_reference_cache_is_reused_and_keyed_by_recipe(tmp_path):
    calls = []

    def train(idx: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        calls.append(seed)
        return {"w": torch.full((3,), float(idx.sum()))}

    recipe = {"arch": "toy", "epochs": 1}
    assert cached_count(tmp_path, recipe, 100) == 0
    a = ensure_references(tmp_path, recipe, 3, 100, train)
    assert a.trained_now == 3 and len(calls) == 3
    assert a.in_mask.shape == (3, 100) and (a.in_mask.sum(1) == 50).all()
    b = ensure_references(tmp_path, recipe, 3, 100, train)
    assert b.trained_now == 0 and len(calls) == 3  # nothing trained the second time
    assert (a.in_mask == b.in_mask).all()
    for sa, sb, m in zip(a.states, b.states, b.in_mask):
        assert torch.equal(sa["w"], sb["w"]) and float(sb["w"][0]) == float(np.flatnonzero(m).sum())
    assert cached_count(tmp_path, recipe, 100) == 3
    c = ensure_references(tmp_path, recipe | {"epochs": 2}, 1, 100, train)
    assert c.trained_now == 1  # another recipe, another cache entry
    assert ensure_references(tmp_path, recipe, 4, 100, train).trained_now == 1  # only the missing one
