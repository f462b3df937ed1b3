"""AUC, TPR at a fixed FPR, and their confidence intervals (Hanley–McNeil, bootstrap).

Membership results are read at low FPR (an attack that finds a few records for sure matters even when its
AUC is near 0.5), and every number is reported with an interval, so a reader can tell a difference from noise.
"""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054


def auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Exact AUC (Mann–Whitney, ties half) that a member scores higher than a non-member; NaN if a side is empty."""
    m = np.asarray(member, dtype=np.float64).ravel()
    n = np.asarray(nonmember, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        return float("nan")
    allv = np.concatenate([m, n])
    uniq, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid = ends - (counts - 1) / 2.0  # average rank of each tied group
    ranks = mid[inverse]
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def hanley_mcneil_ci(a: float, n_member: int, n_nonmember: int, z: float = Z95) -> tuple[float, float]:
    """Hanley & McNeil (1982) normal interval for an AUC, clipped to [0, 1]: cheap, no resampling."""
    q1 = a / (2 - a)
    q2 = 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_member - 1) * (q1 - a * a) + (n_nonmember - 1) * (q2 - a * a)) / (n_member * n_nonmember)
    half = z * float(np.sqrt(max(var, 0.0)))
    return max(0.0, a - half), min(1.0, a + half)


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float) -> float:
    """Fraction of members scoring strictly above the threshold that at most ``fpr`` of non-members exceed.

    With n non-members the smallest FPR that can be told from 0 is 1/n; below it the threshold is the
    highest non-member score (FPR 0), which is the conservative reading."""
    m = np.asarray(member, dtype=np.float64).ravel()
    n = np.sort(np.asarray(nonmember, dtype=np.float64).ravel())[::-1]
    if m.size == 0 or n.size == 0:
        return float("nan")
    allowed = int(np.floor(fpr * n.size + 1e-9))  # non-members allowed above the threshold
    thr = n[allowed] if allowed < n.size else -np.inf
    return float((m > thr).mean())


def bootstrap_ci(member: np.ndarray, nonmember: np.ndarray, stat: str = "auc", fpr: float = 0.01,
                 reps: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``auc`` or ``tpr`` (at ``fpr``), resampling members and non-members apart."""
    rng = np.random.default_rng(seed)
    m = np.asarray(member, dtype=np.float64).ravel()
    n = np.asarray(nonmember, dtype=np.float64).ravel()
    vals = np.empty(reps)
    for i in range(reps):
        mb = m[rng.integers(0, m.size, m.size)]
        nb = n[rng.integers(0, n.size, n.size)]
        vals[i] = auc(mb, nb) if stat == "auc" else tpr_at_fpr(mb, nb, fpr)
    lo = (1 - level) / 2
    return float(np.quantile(vals, lo)), float(np.quantile(vals, 1 - lo))


def report(member: np.ndarray, nonmember: np.ndarray, reps: int = 1000, seed: int = 0) -> dict:
    """AUC with Hanley–McNeil and bootstrap intervals, TPR at 1% and 0.1% FPR with bootstrap intervals."""
    a = auc(member, nonmember)
    out = {"auc": a, "auc_ci_hm": hanley_mcneil_ci(a, len(member), len(nonmember)),
           "auc_ci_boot": bootstrap_ci(member, nonmember, "auc", reps=reps, seed=seed),
           "n_member": int(len(member)), "n_nonmember": int(len(nonmember))}
    for name, f in (("tpr1", 0.01), ("tpr01", 0.001)):
        out[name] = tpr_at_fpr(member, nonmember, f)
        out[name + "_ci"] = bootstrap_ci(member, nonmember, "tpr", fpr=f, reps=reps, seed=seed)
    return out
