"""The strong membership attack (issue 22): recovers membership where it is real, ~0.5 where there is none,
and its intervals cover the truth."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from daemon.privacy.attack import lira_offline_scores, membership_report, rmia_scores
from daemon.privacy.metrics import auc, bootstrap_ci, hanley_mcneil_ci, report, tpr_at_fpr

N, D, C = 400, 20, 5


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """A small MLP trained to memorise (random labels): a deliberately overfit toy model."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(D, 256), nn.ReLU(), nn.Linear(256, C))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def _conf(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return m(x).softmax(1).gather(1, y[:, None]).squeeze(1).double().numpy()


def _toy(refs: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * N, D, generator=g)
    y = torch.randint(0, C, (2 * N,), generator=g)
    target_in = np.zeros(2 * N, bool)
    target_in[:N] = True  # the target trains on the first half; the second half is held out
    target = _train(x[:N], y[:N], 100)
    rng = np.random.default_rng(1)
    ref_in = np.zeros((refs, 2 * N), bool)
    ref_models = []
    for j in range(refs):
        ref_in[j, rng.permutation(2 * N)[:N]] = True
        idx = torch.from_numpy(np.flatnonzero(ref_in[j]))
        ref_models.append(_train(x[idx], y[idx], j))
    # a population no model saw (z for RMIA, and the "unseen" check)
    xp = torch.randn(N, D, generator=g)
    yp = torch.randint(0, C, (N,), generator=g)
    rconf = np.stack([_conf(r, x, y) for r in ref_models])
    pop_t = _conf(target, xp, yp)
    pop_r = np.stack([_conf(r, xp, yp) for r in ref_models])
    return target_in, _conf(target, x, y), rconf, ref_in, pop_t, pop_r


def test_attacks_recover_membership_on_an_overfit_model_and_not_on_unseen_data():
    target_in, tconf, rconf, ref_in, pop_t, pop_r = _toy()
    s = rmia_scores(tconf, rconf, ref_in, pop_t, pop_r)
    a = auc(s[target_in], s[~target_in])
    assert a > 0.9, a  # 0.94 measured with 4 reference models
    lira = lira_offline_scores(tconf, rconf, ref_in)
    ok = ~np.isnan(lira)
    assert auc(lira[ok & target_in], lira[ok & ~target_in]) > 0.9
    # data no model saw: split the unseen population in two halves; neither is a member, AUC ~0.5
    s_half = rmia_scores(pop_t, pop_r, np.zeros_like(pop_r, bool), pop_t, pop_r)
    half = N // 2
    a0 = auc(s_half[:half], s_half[half:])
    lo, hi = hanley_mcneil_ci(a0, half, N - half)
    assert lo <= 0.5 <= hi, (a0, lo, hi)


def test_hanley_mcneil_and_bootstrap_cover_the_true_auc_in_simulation():
    # scores N(d, 1) vs N(0, 1): the true AUC is Phi(d / sqrt 2)
    d = 1.0
    true = 0.5 * (1 + float(torch.erf(torch.tensor(d / 2.0))))
    rng = np.random.default_rng(7)
    reps, hm, boot = 200, 0, 0
    for r in range(reps):
        m, n = rng.normal(d, 1, 60), rng.normal(0, 1, 80)
        a = auc(m, n)
        lo, hi = hanley_mcneil_ci(a, 60, 80)
        hm += lo <= true <= hi
        if r < 60:
            blo, bhi = bootstrap_ci(m, n, reps=300, seed=r)
            boot += blo <= true <= bhi
    assert hm / reps >= 0.9, hm / reps
    assert boot / 60 >= 0.85, boot / 60


def test_auc_and_tpr_at_fpr_on_a_known_curve():
    assert auc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0
    assert auc(np.array([0.0]), np.array([0.0])) == 0.5
    nonmember = np.arange(1000, dtype=float)  # FPR 1% threshold: 989.x -> members above 989 count
    member = np.array([995.0, 991.0, 985.0, 500.0])
    assert tpr_at_fpr(member, nonmember, 0.01) == 0.5
    assert tpr_at_fpr(member, nonmember, 0.001) == 0.0  # above 998: none
    r = report(member, nonmember, reps=50)
    assert r["auc_ci_hm"][0] <= r["auc"] <= r["auc_ci_hm"][1]


def test_membership_report_carries_rmia_with_intervals_and_the_loss_auc_beside_it():
    target_in, tconf, rconf, ref_in, pop_t, pop_r = _toy()
    r = membership_report(tconf, rconf, ref_in, np.flatnonzero(target_in), np.flatnonzero(~target_in),
                          pop_t, pop_r, reps=100)
    assert r["attack"] == "rmia" and r["references"] == 4
    assert r["auc"] > 0.9 and r["auc_ci_boot"][0] <= r["auc"] <= r["auc_ci_boot"][1]
    assert r["loss_auc"] > 0.9  # an overfit model: even the loss finds its members
    assert 0.0 <= r["tpr01"] <= r["tpr1"] <= 1.0
