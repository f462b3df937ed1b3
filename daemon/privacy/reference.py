"""Reference (shadow) models for the membership attack, cached on disk and keyed by recipe and seed.

Each model trains on a random half of the training set with the pre-training recipe (the caller's
``train`` function) and is stored with the indices it saw, so a rerun or ``unlearnd audit`` reuses it.
A model's weights are written before its index entry, both atomically: a kill at any instant leaves
either a complete model or none (an orphan weight file is retrained and overwritten).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from daemon.registry.files import atomic_write_bytes

Train = Callable[[np.ndarray, int], Mapping[str, torch.Tensor]]


@dataclass
class ReferenceSet:
    """Loaded reference models: weights, which examples each saw (``in_mask[j, i]``), and their cost."""

    states: list[dict[str, torch.Tensor]]
    in_mask: np.ndarray
    train_seconds: list[float]
    trained_now: int


def recipe_key(recipe: Mapping[str, object]) -> str:
    """A short stable key for a recipe (architecture, training settings, data, canaries)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _index_path(root: Path, key: str) -> Path:
    return root / key / "index.json"


def _load_index(root: Path, key: str) -> dict:
    p = _index_path(root, key)
    return json.loads(p.read_text()) if p.exists() else {"models": {}}


def ensure_references(root: str | Path, recipe: Mapping[str, object], count: int, n_examples: int,
                      train: Train, seed: int = 0) -> ReferenceSet:
    """Load ``count`` reference models for ``recipe``, training (and caching) only the missing ones.

    Model j trains on the half of ``range(n_examples)`` drawn with seed ``seed * 1000 + j``."""
    root = Path(root)
    key = recipe_key({"recipe": dict(recipe), "n": n_examples})
    (root / key).mkdir(parents=True, exist_ok=True)
    index = _load_index(root, key)
    states, masks, secs, trained = [], [], [], 0
    for j in range(count):
        s = seed * 1000 + j
        entry = index["models"].get(str(s))
        if entry is None:
            idx = np.sort(np.random.default_rng(s).permutation(n_examples)[: n_examples // 2])
            t0 = time.perf_counter()
            state = {k: v.detach().cpu().contiguous() for k, v in train(idx, s).items()}
            took = time.perf_counter() - t0
            atomic_write_bytes(root / key / f"ref-{s}.safetensors", save(state))
            atomic_write_bytes(root / key / f"ref-{s}.idx.npy", _npy(idx))
            entry = {"seconds": took, "examples": int(idx.size)}
            index["models"][str(s)] = entry
            atomic_write_bytes(_index_path(root, key), json.dumps(index | {"recipe": dict(recipe)}, indent=1).encode())
            trained += 1
        states.append(load_file(root / key / f"ref-{s}.safetensors"))
        mask = np.zeros(n_examples, bool)
        mask[np.load(root / key / f"ref-{s}.idx.npy")] = True
        masks.append(mask)
        secs.append(float(entry["seconds"]))
    return ReferenceSet(states, np.stack(masks) if masks else np.zeros((0, n_examples), bool), secs, trained)


def cached_count(root: str | Path, recipe: Mapping[str, object], n_examples: int) -> int:
    """How many reference models are cached for ``recipe`` (0: the audit has nothing to compare against)."""
    return len(_load_index(Path(root), recipe_key({"recipe": dict(recipe), "n": n_examples}))["models"])


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
