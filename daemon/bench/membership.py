"""The strong membership attack's setting on MNIST (issue 22), shared by benchmarks/membership_before.py and
benchmarks/privacy.py: a target model trained with mislabeled canaries, reference models on random halves of
the same data (cached), and every example's probability of its label under each of them.

Examples are numbered in one universe: the training set (``0..n-1``, canaries at their wrong labels), the test
set at its labels (``n..n+9999``), and the same test digits at a wrong label drawn the way the canaries' were
(``n+10000..``): the non-members a canary is compared with (a mislabeled digit the model never saw), so a
canary's membership is not confused with its label being wrong.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from daemon.bench.runner import pretrain
from daemon.data.mnist import load_mnist
from daemon.data.splits import DatasetSplits
from daemon.engine.models import build_model
from daemon.engine.training import TrainConfig
from daemon.privacy.forget_sets import make_canaries, relabel
from daemon.privacy.reference import ReferenceSet, ensure_references, recipe_key
from daemon.registry.files import atomic_write_bytes

__all__ = ["MembershipSetting", "label_probs", "load_setting"]


def label_probs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """p(y|x) per example (eval mode, no autograd)."""
    model.eval()
    with torch.no_grad():
        p = torch.cat([model(x[i:i + 4096]).softmax(1) for i in range(0, x.shape[0], 4096)])
    return p.gather(1, y[:, None]).squeeze(1).double().numpy()


@dataclass
class MembershipSetting:
    """Everything the attack needs, and how to build the benchmark's model from a state."""

    splits: DatasetSplits             # training labels with the canaries' wrong labels
    canaries: np.ndarray              # training indices of the canaries
    x_all: torch.Tensor
    y_all: torch.Tensor
    refs: ReferenceSet
    ref: np.ndarray                   # [models, universe] p(label) under each reference model
    ref_in: np.ndarray                # [models, universe] whether the reference model trained on the example
    target_state: dict[str, torch.Tensor]
    target: np.ndarray                # [universe] p(label) under the target
    population: np.ndarray            # RMIA's population z (test digits at their labels)
    nonmembers: np.ndarray            # test digits at their labels, not in the population
    ref_wall_s: float
    recipe: dict
    cache: str

    @property
    def n_train(self) -> int:
        return int(self.splits.train_y.shape[0])

    def mislabeled(self, idx: np.ndarray) -> np.ndarray:
        """The universe indices of test digits ``idx`` (universe indices of the test block) at a wrong label."""
        return np.asarray(idx) + self.splits.test_y.shape[0]

    def build(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        mean, std = self.splits.mean_std()
        model = build_model("mnist_cnn", num_classes=10, input_shape=(1, 28, 28), mean=mean, std=std)
        model.load_state_dict(state)
        return model.eval()

    def probs(self, model: torch.nn.Module, idx: np.ndarray) -> np.ndarray:
        """p(label) under ``model`` for universe indices ``idx``."""
        t = torch.from_numpy(np.asarray(idx))
        return label_probs(model, self.x_all[t], self.y_all[t])

    def retrain(self, exclude: np.ndarray) -> tuple[dict[str, torch.Tensor], float]:
        """The pre-training recipe without ``exclude`` (training indices), cached like a reference model."""
        key = {"retrain_without": sorted(int(i) for i in exclude)}
        cfg = TrainConfig()

        def train(_idx: np.ndarray, _seed: int) -> dict:
            return pretrain("mnist_cnn", self.splits, cfg, "cpu", exclude=torch.from_numpy(np.asarray(exclude)))[0] \
                .state_dict()

        got = ensure_references(self.cache, self.recipe | key, 1, self.n_train, train, seed=77)
        return got.states[0], got.train_seconds[0]


def load_setting(refs: int = 8, canaries: int = 300, cache: str = "var/privacy-cache") -> MembershipSetting:
    """The setting, training (and caching) only what the cache lacks."""
    s = load_mnist()
    n = s.train_y.shape[0]
    cidx, wrong = make_canaries(s.train_y.numpy(), canaries, 10, seed=0)
    y_train = torch.from_numpy(relabel(s.train_y.numpy(), cidx, wrong))
    sc = dataclasses.replace(s, train_y=y_train)
    cfg = TrainConfig()
    recipe = {"arch": "mnist_cnn", "train": dataclasses.asdict(cfg), "canaries": canaries, "canary_seed": 0}

    def train(idx: np.ndarray, seed: int) -> dict:
        keep = np.ones(n, bool)
        keep[idx] = False
        model, _ = pretrain("mnist_cnn", sc, dataclasses.replace(cfg, seed=seed), "cpu",
                            exclude=torch.from_numpy(np.flatnonzero(keep)))
        return model.state_dict()

    t0 = time.perf_counter()
    ref_set = ensure_references(cache, recipe, refs, n, train)
    ref_wall = time.perf_counter() - t0
    tgt = ensure_references(cache, recipe | {"target": True}, 1, n, lambda idx, seed: pretrain(
        "mnist_cnn", sc, cfg, "cpu")[0].state_dict(), seed=99)  # the target saw every training digit
    m = s.test_y.shape[0]
    rng = np.random.default_rng(1)                             # the held-out digits' wrong labels
    test_wrong = (s.test_y + torch.from_numpy(rng.integers(1, 10, m))) % 10
    x_all = torch.cat([s.train_x, s.test_x, s.test_x])
    y_all = torch.cat([y_train, s.test_y, test_wrong])
    setting = MembershipSetting(sc, cidx, x_all, y_all, ref_set, np.empty(0), np.empty(0), tgt.states[0],
                                np.empty(0), np.empty(0), np.empty(0), ref_wall, recipe, cache)
    # every example's probability under the 1 + refs models: minutes on a loaded CPU, so kept beside the models
    probs = Path(cache) / f"probs-{recipe_key(recipe | {'refs': refs, 'wrong_seed': 1})}.npz"
    if probs.exists():
        with np.load(probs) as f:
            setting.target, setting.ref = f["target"], f["ref"]
    else:
        setting.target = label_probs(setting.build(tgt.states[0]), x_all, y_all)
        setting.ref = np.stack([label_probs(setting.build(st), x_all, y_all) for st in ref_set.states])
        buf = io.BytesIO()
        np.savez(buf, target=setting.target, ref=setting.ref)
        atomic_write_bytes(probs, buf.getvalue())
    setting.ref_in = np.concatenate([ref_set.in_mask, np.zeros((refs, 2 * m), bool)], axis=1)
    test = n + np.random.default_rng(0).permutation(m)
    setting.population, setting.nonmembers = test[:5000], test[5000:]
    return setting
