"""``unlearnd audit membership``: how member-like named instances look to one published version, checked offline.

Why a tool beside the receipts: a receipt carries the round's own online check (per-class LiRA confidence
against the probe set, :mod:`daemon.engine.unseen`), computed once, when the round ran. An auditor (a data
protection officer, the team answering a complaint) needs to ask again later, of any version, with the instances
the requester resubmits (the daemon keeps only hashes), and ideally with a strong attack. This module computes,
for a model and the instances:

- the receipts' check, the same statistic and verdict (so the two can be compared);
- the population view: every instance's logit-scaled confidence against every held-out example's, as AUC with a
  Hanley–McNeil and a bootstrap interval and TPR at 1% and 0.1% FPR (the numbers attack papers report);
- with reference models the operator trained without the instances (their shadow models, or a retrain): offline
  RMIA (:func:`daemon.privacy.attack.rmia_scores`, the paper's OUT-only correction), the strong attack; the
  held-out set is split in two, one half the RMIA population, the other the non-members scored.

Pure: models and tensors in, a dict out; the CLI (:mod:`daemon.pipeline.cli`) reads the config, the registry
and the sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from daemon.engine.evaluate import logits as model_logits
from daemon.engine.unseen import HeldOutReference, confidence_score, verdict
from daemon.privacy.attack import rmia_scores
from daemon.privacy.metrics import report

__all__ = ["membership_audit"]


def _label_probs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    p = model_logits(model, x).softmax(1)
    return p.gather(1, y.view(-1, 1).to(p.device)).squeeze(1).double().cpu().numpy()


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, float):
            out[k] = round(v, 4)
        elif isinstance(v, tuple):
            out[k] = [round(float(a), 4) for a in v]
        else:
            out[k] = v
    return out


def membership_audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, heldout_x: torch.Tensor,
                     heldout_y: torch.Tensor, num_classes: int, *, margin: float = 0.03,
                     references: Sequence[nn.Module] = (), reps: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The membership evidence of instances ``x`` (at labels ``y``) under ``model`` against held-out data.

    ``references``: models trained without the instances (OUT); with at least one, offline RMIA is added.
    Raises ValueError for fewer than 2 held-out examples or no instance."""
    if x.shape[0] == 0:
        raise ValueError("the audit needs at least one instance")
    if heldout_x.shape[0] < 2:
        raise ValueError("the audit needs at least 2 held-out examples")
    check = HeldOutReference(heldout_x, heldout_y, num_classes).refresh(model)
    scores = confidence_score(model_logits(model, x), y)
    evidence = check.evidence(scores, y, margin)
    held_scores = confidence_score(model_logits(model, heldout_x), heldout_y).double().numpy()
    population = report(scores.double().numpy(), held_scores, reps=reps, seed=seed)
    out: dict[str, Any] = {
        "instances": int(x.shape[0]), "reference_size": int(heldout_x.shape[0]), "margin": margin,
        "check": evidence.to_dict(),
        "confidence": _rounded({k: v for k, v in population.items() if k.startswith(("auc", "tpr", "n_"))}),
        "rmia": None, "verdict": evidence.verdict}
    if references:
        n = heldout_x.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        pop, non = order[: n // 2], order[n // 2:]
        target_x = _label_probs(model, x, y)
        target_pop = _label_probs(model, heldout_x[pop], heldout_y[pop])
        target_non = _label_probs(model, heldout_x[non], heldout_y[non])
        ref_x = np.stack([_label_probs(r, x, y) for r in references])
        ref_pop = np.stack([_label_probs(r, heldout_x[pop], heldout_y[pop]) for r in references])
        ref_non = np.stack([_label_probs(r, heldout_x[non], heldout_y[non]) for r in references])
        member = rmia_scores(target_x, ref_x, None, target_pop, ref_pop)
        nonmember = rmia_scores(target_non, ref_non, None, target_pop, ref_pop)
        rm = report(member, nonmember, reps=reps, seed=seed)
        out["rmia"] = _rounded({**{k: v for k, v in rm.items() if k.startswith(("auc", "tpr", "n_"))},
                                "references": len(references), "population": int(pop.numel())})
        out["verdict_rmia"] = verdict(rm["auc"], margin)
    return out
