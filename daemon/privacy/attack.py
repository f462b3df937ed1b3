"""Per-example membership scores from a target model and reference (shadow) models: RMIA and offline LiRA.

Inputs are probabilities of the true label, ``target[i]`` under the target model and ``ref[j, i]`` under
reference model j, with ``ref_in[j, i]`` saying whether model j trained on example i. Higher score =
more likely a member. RMIA (Zarifzadeh et al., ICML 2024) is the default: it is strong with few reference
models (4–8 are what two shared CPU cores can train), where LiRA's per-example Gaussians need many.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _check(target: np.ndarray, ref: np.ndarray, ref_in: np.ndarray | None) -> None:
    if ref.ndim != 2 or ref.shape[1] != target.shape[0]:
        raise ValueError(f"reference confidences must be [models, {target.shape[0]}], got {list(ref.shape)}")
    if ref_in is not None and ref_in.shape != ref.shape:
        raise ValueError(f"ref_in must match the reference confidences {list(ref.shape)}, got {list(ref_in.shape)}")


def rmia_scores(target: np.ndarray, ref: np.ndarray, ref_in: np.ndarray | None, population_target: np.ndarray,
                population_ref: np.ndarray, gamma: float = 1.0, offline_a: float = 0.3) -> np.ndarray:
    """RMIA: the share of population examples z that x dominates, Pr(x|θ)/Pr(x) > γ·Pr(z|θ)/Pr(z).

    Pr(x) is the mean over reference models. With ``ref_in`` given (online), all models count; without it
    (offline, only OUT models) Pr(x) is the paper's linear correction ((1+a)·mean_out + (1−a))/2.
    ``population_*`` are the same quantities for non-member examples (z), e.g. the test split."""
    target = np.asarray(target, np.float64)
    ref = np.asarray(ref, np.float64)
    _check(target, ref, ref_in)

    def prior(r: np.ndarray) -> np.ndarray:
        mean = r.mean(axis=0)
        return mean if ref_in is not None else 0.5 * ((1 + offline_a) * mean + (1 - offline_a))

    ratio_x = target / np.maximum(prior(ref), EPS)
    ratio_z = np.asarray(population_target, np.float64) / np.maximum(prior(np.asarray(population_ref, np.float64)), EPS)
    sorted_z = np.sort(ratio_z)
    return np.searchsorted(sorted_z, ratio_x / gamma, side="left") / max(sorted_z.size, 1)


def logit_confidence(p: np.ndarray) -> np.ndarray:
    """LiRA's scaled confidence log(p / (1 − p)), which is close to Gaussian across models."""
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def lira_offline_scores(target: np.ndarray, ref: np.ndarray, ref_in: np.ndarray) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): how many OUT-model standard deviations the target sits above them.

    A monotone transform of the one-sided Gaussian test, so AUC and TPR are those of the test; examples
    with fewer than two OUT models get NaN (nothing to fit)."""
    target = np.asarray(target, np.float64)
    ref = np.asarray(ref, np.float64)
    _check(target, ref, ref_in)
    phi = logit_confidence(ref)
    out = ~np.asarray(ref_in, bool)
    cnt = out.sum(axis=0)
    mu = np.where(out, phi, 0).sum(axis=0) / np.maximum(cnt, 1)
    var = np.where(out, (phi - mu) ** 2, 0).sum(axis=0) / np.maximum(cnt - 1, 1)
    sd = np.sqrt(var) + 1e-3
    z = (logit_confidence(target) - mu) / sd
    return np.where(cnt >= 2, z, np.nan)


def membership_report(target: np.ndarray, ref: np.ndarray, ref_in: np.ndarray, members: np.ndarray,
                      nonmembers: np.ndarray, population_target: np.ndarray, population_ref: np.ndarray,
                      reps: int = 1000, seed: int = 0) -> dict:
    """RMIA on ``members`` against ``nonmembers`` (indices into ``target``), with the loss-based AUC beside it.

    Returns ``metrics.report``'s fields for RMIA (AUC with Hanley–McNeil and bootstrap CIs, TPR at 1% and
    0.1% FPR with CIs), ``loss_auc`` (a member has a lower loss, −log p, than a non-member) and ``references``."""
    from daemon.privacy.metrics import auc, report

    s = rmia_scores(target, ref, ref_in, population_target, population_ref)
    out = report(s[members], s[nonmembers], reps=reps, seed=seed)
    t = np.asarray(target, np.float64)
    out["loss_auc"] = auc(np.log(np.maximum(t[members], EPS)), np.log(np.maximum(t[nonmembers], EPS)))
    out["attack"] = "rmia"
    out["references"] = int(ref.shape[0])
    return out
