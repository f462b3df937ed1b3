"""Forget sets where membership is real (issue 22 part 3): mislabeled canaries and the most atypical members.

A typical MNIST digit is barely memorised, so deleting one tests nothing; a digit trained with a wrong
label, or one the reference models find hard, is remembered only by the models that saw it.
"""

from __future__ import annotations

import numpy as np


def make_canaries(labels: np.ndarray, count: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` training indices (fixed seed) and a wrong label for each, uniform over the other classes.

    The caller trains the target (and the reference models) on the labels with these replaced."""
    labels = np.asarray(labels)
    if not 0 < count <= labels.size:
        raise ValueError(f"canary count must be in 1..{labels.size}, got {count}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(labels.size, count, replace=False))
    wrong = (labels[idx] + rng.integers(1, num_classes, count)) % num_classes
    return idx, wrong


def relabel(labels: np.ndarray, idx: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """A copy of ``labels`` with the canaries' wrong labels in place."""
    out = np.array(labels, copy=True)
    out[idx] = wrong
    return out


def margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit of the label minus the largest other logit, per example (negative: misclassified)."""
    logits = np.asarray(logits, np.float64)
    own = logits[np.arange(len(labels)), labels]
    other = logits.copy()
    other[np.arange(len(labels)), labels] = -np.inf
    return own - other.max(axis=1)


def most_atypical(ref_margins: np.ndarray, ref_in: np.ndarray, count: int,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """The ``count`` examples with the lowest mean margin under the reference models that did NOT train on them.

    Held-out margin is the atypicality (a low one: the rest of the data does not predict the example, so a
    model that classifies it well must have memorised it). Examples no reference model held out, and
    ``exclude`` (e.g. the canaries), are never chosen."""
    out = ~np.asarray(ref_in, bool)
    cnt = out.sum(axis=0)
    mean = np.where(out, ref_margins, 0).sum(axis=0) / np.maximum(cnt, 1)
    mean = np.where(cnt > 0, mean, np.inf)
    if exclude is not None:
        mean[np.asarray(exclude)] = np.inf
    order = np.argsort(mean, kind="stable")
    chosen = order[:count]
    if np.isinf(mean[chosen]).any():
        raise ValueError(f"only {int(np.isfinite(mean).sum())} examples can be ranked, asked for {count}")
    return np.sort(chosen)


def with_copies(idx: np.ndarray, canaries: np.ndarray, n: int, repeats: int) -> np.ndarray:
    """Training indices ``idx`` (of ``0..n-1``) plus the extra copies of the canaries among them.

    A canary inserted ``repeats`` times is row ``canaries[j]`` and rows ``n + r * len(canaries) + j``
    (r = 0..repeats-2) of the training set: the usual way canaries are inserted so that a model memorises
    them. A reference model's half, or a retrain's exclusion, takes a canary's copies with it, so a model
    saw all of a canary's copies or none."""
    idx = np.asarray(idx, np.int64)
    if repeats < 1:
        raise ValueError(f"canary repeats must be >= 1, got {repeats}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"training indices must lie in 0..{n - 1}")
    pos = np.flatnonzero(np.isin(np.asarray(canaries), idx))
    extra = [n + r * len(canaries) + pos for r in range(repeats - 1)]
    return np.concatenate([idx, *extra]).astype(np.int64)

