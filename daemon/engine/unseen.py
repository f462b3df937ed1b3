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

What the probe check is not: a strong attack. It has no reference models, so an instance that is hard for
any model (atypical, or mislabeled: its held-out twin is *misclassified* as its label) is judged against
typical held-out examples of its label: a memorised mislabeled record scores *below* them and the check calls
it forgotten before any step (benchmarks/results/privacy_canary_limit.md). Cheap by design: the instances'
scores come from the round's own forward pass, and the probe's are refreshed every ``unseen_refresh`` steps.

:class:`ModelReference` is the per-example check for operators who keep reference models (the same recipe on
data without the instance, e.g. random halves of the training set, as RMIA's and LiRA's shadows): each
instance is placed against the scores those models give *it* (LiRA offline, one Gaussian per instance with a
pooled spread), so a record the model memorised against its label is called member-like however atypical it
is, and the round pushes each instance's score down to what a model that never saw it gives, not to the
zero rule and not past it (:func:`toward_reference_loss`). The references do not move with the round: their
scores are computed once, before it (one forward of each reference over the round's instances).
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

__all__ = ["SCORE", "SCORE_MODELS", "HeldOutReference", "MembershipEvidence", "ModelReference", "confidence_score",
           "logit_confidence", "toward_reference_loss", "verdict", "MAX_Z"]

#: how receipts name the score (and its reference) they report
SCORE = "lira_logit_confidence_per_class_vs_probe"
SCORE_MODELS = "lira_offline_per_example_vs_reference_models"
#: the smallest spread the per-example Gaussian may have (logit-scaled confidence units): with two or three
#: references the sample spread can be near 0 and would turn any difference into certainty
MIN_SIGMA = 0.25
#: with reference models, a round also goes on while any instance lies more than this many spreads above its own
#: target: the mean statistic reaches 0.5 when half the instances are below their targets however far above the
#: rest still are, and a per-example attack finds those (benchmarks/results/privacy.md: at k = 64 the mean rule
#: left RMIA at +0.165 above retrain, this one at +0.093; seed 0). A true non-member exceeds 3 with chance 0.13%.
MAX_Z = 3.0


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y − logsumexp_{j≠y} z_j`` per row, differentiable (the ``unseen`` loss pushes it down)."""
    lab = labels.view(-1, 1).to(logits.device)
    z_y = logits.gather(1, lab).squeeze(1)
    rest = logits.scatter(1, lab, float("-inf")).logsumexp(1)
    return z_y - rest


def confidence_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence per row: ``z_y − logsumexp_{j≠y} z_j`` (high: member-like)."""
    return logit_confidence(logits.detach().float(), labels).cpu()


def toward_reference_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ``unseen`` forget term with reference models: each instance's confidence is pushed down to its target
    (what models that never saw it give it) and no further — ``relu(c_i − t_i)``, averaged over all instances."""
    per = torch.relu(logit_confidence(logits, labels) - targets.to(logits.device, logits.dtype))
    if weights is not None:
        per = per * weights
    return per.sum() / logits.shape[0]


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
    reference: str = "probe"

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "reference": self.reference, "auc": round(self.auc, 4),
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


class ModelReference:
    """Each instance against its own scores under reference models that never trained on it (LiRA offline).

    ``out_scores[i, j]``: instance i's logit-scaled confidence at its label under reference model j, NaN where
    model j trained on instance i. Instance i's statistic is ``Φ((s_i − μ_i) / σ)``: the chance its score under
    the live model exceeds a never-saw-it model's (μ_i the mean of its finite reference scores, σ one spread
    pooled over the round's instances, as LiRA's fixed-variance variant does with few references, floored at
    :data:`MIN_SIGMA`). Their mean is read like the probe check's AUC: 0.5 indistinguishable, above
    member-like, below over-forgotten."""

    def __init__(self, out_scores: torch.Tensor) -> None:
        s = torch.as_tensor(out_scores).double().cpu()
        if s.ndim != 2 or s.shape[1] == 0:
            raise ValueError("reference scores must be [instances, reference models] with at least one model")
        finite = torch.isfinite(s)
        counts = finite.sum(1)
        if bool((counts == 0).any()):
            raise ValueError(f"instances {torch.nonzero(counts == 0).flatten().tolist()} have no reference model "
                             "that did not train on them")
        filled = torch.where(finite, s, torch.zeros_like(s))
        self.mu = filled.sum(1) / counts
        dev = torch.where(finite, s - self.mu[:, None], torch.zeros_like(s))
        several = counts >= 2
        if bool(several.any()):
            var = (dev[several] ** 2).sum(1) / (counts[several] - 1)
            sigma = float(var.mean().sqrt())
        else:
            sigma = 1.0
        self.sigma = max(sigma, MIN_SIGMA)
        self.n_reference = int(s.shape[1])
        self.seconds = 0.0            # the references' scores were computed by the caller, before the round

    def refresh(self, model: nn.Module) -> ModelReference:
        """Nothing to redo: the reference models do not move with the round."""
        return self

    def targets(self) -> torch.Tensor:
        """Each instance's score under models that never saw it: where the ``unseen`` loss pushes it, no further."""
        return self.mu.float()

    def z(self, scores: torch.Tensor) -> torch.Tensor:
        """Each instance's distance above its target, in pooled spreads."""
        return (scores.double().cpu() - self.mu) / self.sigma

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr(self.z(scores))

    def none_far_above(self, scores: torch.Tensor) -> bool:
        """Whether every instance is within :data:`MAX_Z` spreads of its target (the per-example stop's 2nd half)."""
        return bool((self.z(scores) <= MAX_Z).all())

    def auc(self, scores: torch.Tensor, labels: torch.Tensor) -> float:
        """The mean over instances of ``Φ((s_i − μ_i) / σ)`` (``labels`` are implied by the reference scores)."""
        return float(self.probabilities(scores).mean())

    def evidence(self, scores: torch.Tensor, labels: torch.Tensor, margin: float,
                 auc_before: float | None = None) -> MembershipEvidence:
        """The statistic with a Hanley–McNeil interval (instances against reference models) and its verdict."""
        a = self.auc(scores, labels)
        ci = hanley_mcneil_ci(a, int(scores.numel()), self.n_reference)
        return MembershipEvidence(a, ci, verdict(a, margin), margin, int(scores.numel()), self.n_reference,
                                  auc_before, score=SCORE_MODELS, reference="models")
