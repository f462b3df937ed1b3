"""The ``unseen`` goal's online membership check: do the forget instances still look like training data?

A deletion should leave its instances looking like data the model never saw, not like data it was taught to
get wrong (the zero rule's over-forgetting, issue 22). The daemon holds no training data, so the held-out
reference is the model's probe set (data it did not train on). The score is LiRA's per-example statistic, the
logit-scaled confidence ``log p(y|x) − log(1 − p(y|x)) = z_y − logsumexp_{j≠y} z_j`` (Carlini et al. 2022):
monotone in the loss but without its saturation, and read from the logits a round computes anyway. It is
compared per class (an instance labelled y against probe examples labelled y, as RMIA calibrates by the
population), pooled over the instances into one AUC: the chance that an instance scores above a held-out
example of its class. 0.5: indistinguishable; above: still member-like (under-forgotten); below: less
member-like than held-out data (over-forgotten).

What it is not: a strong attack. It has no reference models, so an instance that is hard for any model
(atypical, or mislabeled: its held-out twin is *misclassified* as its label) is judged against typical
held-out examples of its label; the offline attack (``daemon.privacy``, ``unlearnd audit``) is the strong
check. Cheap by design: the instances' scores come from the round's own forward pass, and the probe's are
refreshed every ``unseen_refresh`` steps (one forward over the probe set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from daemon.engine.evaluate import logits as model_logits
from daemon.privacy.metrics import hanley_mcneil_ci

__all__ = ["SCORE", "HeldOutReference", "MembershipEvidence", "confidence_score", "verdict"]

#: how receipts name the score (and its reference) they report
SCORE = "lira_logit_confidence_per_class_vs_probe"


def confidence_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence per row: ``z_y − logsumexp_{j≠y} z_j`` (high: member-like)."""
    z = logits.detach().float()
    lab = labels.view(-1, 1).to(z.device)
    z_y = z.gather(1, lab).squeeze(1)
    rest = z.scatter(1, lab, float("-inf")).logsumexp(1)
    return (z_y - rest).cpu()


def verdict(auc: float, margin: float) -> str:
    """``under`` (still member-like), ``over`` (less member-like than held-out data) or ``indistinguishable``."""
    if auc > 0.5 + margin:
        return "under"
    if auc < 0.5 - margin:
        return "over"
    return "indistinguishable"


@dataclass(frozen=True)
class MembershipEvidence:
    """What a receipt says about its instances' membership after the round."""

    auc: float
    ci: tuple[float, float]
    verdict: str
    margin: float
    n_instances: int
    n_reference: int
    auc_before: float | None = None
    score: str = SCORE

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "reference": "probe", "auc": round(self.auc, 4),
                "auc_ci95": [round(self.ci[0], 4), round(self.ci[1], 4)], "verdict": self.verdict,
                "margin": self.margin, "instances": self.n_instances, "reference_size": self.n_reference,
                "auc_before": None if self.auc_before is None else round(self.auc_before, 4)}


class HeldOutReference:
    """The held-out examples' scores under one model, per class, to place instances' scores against."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError("the held-out reference needs labelled examples (the model's probe set)")
        self.x, self.y, self.num_classes = x, y.to(torch.int64).cpu(), num_classes
        self.by_class: list[np.ndarray] = []
        self.all: np.ndarray = np.empty(0)
        self.seconds = 0.0        # time spent scoring the reference (the check's cost)

    def refresh(self, model: nn.Module) -> HeldOutReference:
        """Score the held-out examples under ``model`` (eval mode, no autograd; the model's mode is kept)."""
        t0 = time.perf_counter()
        s = confidence_score(model_logits(model, self.x), self.y).numpy().astype(np.float64)
        self.all = np.sort(s)
        self.by_class = [np.sort(s[(self.y == c).numpy()]) for c in range(self.num_classes)]
        self.seconds += time.perf_counter() - t0
        return self

    def auc(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        """Per-class AUC pooled over the instances: the mean chance an instance scores above a held-out example
        of its label (ties half); a class with no held-out example is placed against all of them."""
        s = scores.double().cpu().numpy()
        lab = labels.cpu().numpy()
        total = 0.0
        for score, c in zip(s, lab, strict=True):
            ref = self.by_class[int(c)] if int(c) < len(self.by_class) and self.by_class[int(c)].size else self.all
            below = np.searchsorted(ref, score, side="left")
            upto = np.searchsorted(ref, score, side="right")
            total += (below + upto) / (2.0 * ref.size)
        return float(total / max(len(s), 1))

    def evidence(self, scores: torch.Tensor, labels: torch.Tensor, margin: float,
                 auc_before: float | None = None) -> MembershipEvidence:
        """The AUC with its Hanley–McNeil interval (instances against the whole reference) and its verdict."""
        a = self.auc(scores, labels)
        ci = hanley_mcneil_ci(a, int(scores.numel()), int(self.all.size))
        return MembershipEvidence(a, ci, verdict(a, margin), margin, int(scores.numel()), int(self.all.size),
                                  auc_before)
