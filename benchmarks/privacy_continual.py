"""The continual protocol of issue 22: ten deletion rounds in a row on one live model, each under the attack.

Same setting, attack and daemon round as benchmarks/privacy.py (``one_round``'s configuration), but one
``UnlearningSession`` per (seed, forget set, goal) deletes ``daemon.bench.membership.continual_sets``' ten disjoint
sets one after another, the importance accumulating as the daemon's does. Round ``r`` is graded against the recipe
retrained without every instance deleted so far (cached like privacy.py's retrains): RMIA on that round's instances
against the same held-out comparison set, and the test accuracy lost since the untouched model (cumulative).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/privacy_continual.py [--seeds 0] [--goals unseen@models,unseen]``;
writes benchmarks/results/privacy_continual.{json,md,png}. Retrains the cache lacks are trained here (~2.5 min
each on one CPU thread): prebuild them with the same ``continual_sets``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.privacy import PROBE, _attack, daemon_reference_scores, label, with_reading
from daemon.bench.membership import MembershipSetting, continual_sets, load_setting
from daemon.bench.runner import machine_info
from daemon.engine.config import preset
from daemon.engine.evaluate import accuracy
from daemon.engine.requests import ForgetRequest
from daemon.engine.session import UnlearningSession
from daemon.registry import atomic_write_bytes

ROUNDS, K = 10, 32
AUC_BAR, LOSS_BAR_PP = 0.05, 1.0          # the continual bars: every round within ±0.05, ≤ 1.0 pp in all


def run_chain(st: MembershipSetting, sets: list[np.ndarray], name: str, goal: str, seed: int,
              acc_original: float) -> list[dict]:
    """One session deleting ``sets`` in order; a row per round."""
    test_x, test_y = st.splits.test_x, st.splits.test_y
    against = st.mislabeled(st.nonmembers) if name == "canary" else st.nonmembers
    session = UnlearningSession(st.build(st.target_state), num_classes=10, seed=seed)
    config = preset("default", "adv_imp", "forget")
    kind, _, reference = goal.partition("@")
    if kind == "unseen":
        config = config.with_overrides(stop="unseen")
    probe = torch.from_numpy(st.population[:PROBE])
    px, py = st.x_all[probe], st.y_all[probe]
    rows, deleted = [], np.empty(0, dtype=np.int64)
    for r, members in enumerate(sets, start=1):
        before_model = copy.deepcopy(session.model).eval()
        before = _attack(st, before_model, members, against, seed)
        t = torch.from_numpy(members)
        request = ForgetRequest("forget", st.x_all[t].clone(), st.y_all[t].clone())
        scores = daemon_reference_scores(st, members) if reference == "models" else None
        result, _ = session.run_round(request, method="adv_imp", config=config, sentinel=px, heldout=(px, py),
                                      reference_scores=scores)
        model = session.model.eval()
        after = _attack(st, model, members, against, seed)
        deleted = np.sort(np.concatenate([deleted, members]))
        retrained = st.build(st.retrain(deleted)[0])
        retrain = _attack(st, retrained, members, against, seed)
        ev = result.membership
        rows.append({
            "goal": kind, "reference": reference or "probe", "forget_set": name, "protocol": "continual",
            "k": int(members.size), "seed": seed, "round": r, "deleted": int(deleted.size), "attack": "rmia",
            "auc_before": before["auc"], "auc_after": after["auc"], "auc_retrain": retrain["auc"],
            "tpr1_before": before["tpr1"], "tpr1_after": after["tpr1"], "tpr1_retrain": retrain["tpr1"],
            "lira_auc_before": before["lira_auc"], "lira_auc_after": after["lira_auc"],
            "lira_auc_retrain": retrain["lira_auc"],
            "acc_test_before": acc_original, "acc_test": accuracy(model, test_x, test_y),
            "acc_test_retrain": accuracy(retrained, test_x, test_y),
            "acc_forget": result.acc_forget, "outcome": result.outcome, "stopped_by": result.stopped_by,
            "steps": result.steps, "wall_s": result.wall_s, "check_s": result.check_s,
            "online_auc_before": ev.auc_before if ev else None, "online_auc": ev.auc if ev else None,
            "online_verdict": ev.verdict if ev else None})
        row = rows[-1]
        print(f"{label(row)} {name} seed={seed} round {r}: auc {row['auc_after']:.3f} (retrain "
              f"{row['auc_retrain']:.3f}) test loss {100 * (acc_original - row['acc_test']):.2f} pp, "
              f"{row['steps']} steps, {row['stopped_by']}", flush=True)
    return rows


def _chains(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The rows per (goal, set, seed) chain, in round order, chains sorted."""
    chains: dict[tuple, list[dict]] = {}
    for r in rows:
        chains.setdefault((label(r), r["forget_set"], r["seed"]), []).append(r)
    return {key: sorted(rs, key=lambda r: r["round"]) for key, rs in sorted(chains.items())}


def report(rows: list[dict]) -> str:
    lines = ["# Continual deletion under the membership attack (issue 22): 10 rounds on one model", "",
             "Written by benchmarks/privacy_continual.py: privacy.md's setting, attack and daemon round; one session "
             "per seed, forget set and goal deletes ten disjoint sets in a row (random digits: 10 × 32; canaries: "
             "10 × 30, all 300 of them, as 300 canaries do not hold 10 × 32). Round r is compared with the recipe "
             "retrained without everything deleted in rounds 1..r, on round r's instances; test loss is cumulative, "
             "from the untouched model.", "",
             "## Bars (the issue's: every round's AUC within ±0.05 of retrain's; cumulative test loss ≤ 1.0 pp)", "",
             "| goal | set | seed | rounds | max abs(AUC after − retrain) | rounds within ±0.05 | test loss after the "
             "last round (pp) | steps (total) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    chains = _chains(rows)
    for (goal, name, seed), rs in chains.items():
        d = [abs(r["auc_after"] - r["auc_retrain"]) for r in rs]
        loss = 100 * (rs[-1]["acc_test_before"] - rs[-1]["acc_test"])
        ok = len(rs) == ROUNDS and max(d) <= AUC_BAR and loss <= LOSS_BAR_PP
        lines.append(f"| {goal} | {name} | {seed} | {len(rs)} | {max(d):.3f} | {sum(x <= AUC_BAR for x in d)} / "
                     f"{len(rs)} | {loss:.2f} | {sum(r['steps'] for r in rs)} | {'met' if ok else 'NOT met'} |")
    lines += ["", "## Every round", "",
              "| goal | set | seed | round | deleted | AUC before | AUC after | AUC retrain | TPR@1% after / retrain | "
              "LiRA after (retrain) | test acc → (retrain) | steps | wall s | check s | online → verdict | "
              "stopped by |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (goal, name, seed), rs in chains.items():
        for r in rs:
            online = "—" if r["online_auc"] is None else f"{r['online_auc']:.3f} {r['online_verdict']}"
            lines.append(
                f"| {goal} | {name} | {seed} | {r['round']} | {r['deleted']} | {r['auc_before']:.3f} | "
                f"{r['auc_after']:.3f} | {r['auc_retrain']:.3f} | {r['tpr1_after']:.3f} / {r['tpr1_retrain']:.3f} | "
                f"{r['lira_auc_after']:.3f} ({r['lira_auc_retrain']:.3f}) | {100 * r['acc_test']:.2f} "
                f"({100 * r['acc_test_retrain']:.2f}) | {r['steps']} | {r['wall_s']:.1f} | {r['check_s']:.2f} | "
                f"{online} | {r['stopped_by']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    chains = _chains(rows)
    for (goal, name, seed), rs in chains.items():
        x = [r["round"] for r in rs]
        style = "-" if name == "canary" else "--"
        axes[0].plot(x, [r["auc_after"] - r["auc_retrain"] for r in rs], style, marker="o",
                     label=f"{goal}, {name}, seed {seed}")
        axes[1].plot(x, [100 * (r["acc_test_before"] - r["acc_test"]) for r in rs], style, marker="o")
    for y in (AUC_BAR, -AUC_BAR):
        axes[0].axhline(y, color="grey", lw=0.8, ls=":")
    axes[1].axhline(LOSS_BAR_PP, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="round", ylabel="RMIA AUC after − retrain (round's instances)", title="membership vs retrain")
    axes[1].set(xlabel="round", ylabel="test accuracy lost since the untouched model (pp)", title="cumulative cost")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, rows: list[dict], settings: dict) -> None:
    atomic_write_bytes(out / "privacy_continual.json", json.dumps(
        {"machine": machine_info("cpu"), "setting": settings, "rows": rows}, indent=1).encode())
    md = out / "privacy_continual.md"
    atomic_write_bytes(md, with_reading(md, report(rows)).encode())
    plot(rows, out / "privacy_continual.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--sets", default="canary,random")
    ap.add_argument("--goals", default="unseen@models,unseen")
    ap.add_argument("--cache", default="var/privacy-cache")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="fewer for a smoke run (the bars need 10)")
    ap.add_argument("--append", action="store_true", help="keep privacy_continual.json's rows of other chains")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    st = load_setting(cache=args.cache)
    out = Path(args.out)
    old = out / "privacy_continual.json"
    rows = json.loads(old.read_text())["rows"] if args.append and old.exists() else []
    acc_original = accuracy(st.build(st.target_state), st.splits.test_x, st.splits.test_y)
    settings = {"rounds": ROUNDS, "k": K, "method": "adv_imp", "preset": "default", "attack": "rmia",
                "references": int(st.ref.shape[0]), "recipe": st.recipe, "threads": args.threads}
    for seed in (int(v) for v in args.seeds.split(",")):
        drawn = {name: sets[:args.rounds] for name, sets in
                 continual_sets(st.canaries, st.n_train, ROUNDS, K, seed).items()}
        for name in args.sets.split(","):
            for goal in args.goals.split(","):
                t0 = time.perf_counter()
                done = (label({"goal": goal.partition("@")[0], "reference": goal.partition("@")[2] or "probe"}),
                        name, seed)
                rows = [r for r in rows if (label(r), r["forget_set"], r["seed"]) != done]
                rows += run_chain(st, drawn[name], name, goal, seed, acc_original)
                print(f"chain {done}: {time.perf_counter() - t0:.0f} s", flush=True)
                write(out, rows, settings)


if __name__ == "__main__":
    main()
