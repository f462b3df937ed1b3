"""``lifetime.json``, ``lifetime.md`` and their plots from the parts ``benchmarks/lifetime_bench.py`` wrote.

    PYTHONPATH=. .venv/bin/python benchmarks/lifetime_report.py --parts var/lifetime/parts --out benchmarks/results

Every part is one run (mode, arch, seed, variant label); the rows keep the fields issue 21 names (the forgotten
items' indices stay in the parts). The bars are judged on the runs without a variant label (the defaults).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from daemon.registry import atomic_write_bytes

LOSS_BAR_PP, RELAPSE_BAR, WALL_RATIO_BAR, TARGET_DELETIONS = 3.0, 0.05, 2.0, 3200
KEEP = ("mode", "arch", "seed", "round", "deletions", "acc_test", "acc_test_original", "acc_probe", "acc_forget",
        "acc_forget_union", "relapse", "outcome", "gate_rejected", "reason", "steps", "wall_s", "round_s",
        "memory_fill", "frozen_layers", "version", "commit")


def _loss_pp(r: dict[str, Any]) -> float:
    return 100 * (r["acc_test_original"] - r["acc_test"])


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def load_runs(parts: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(parts.glob("*.json")):
        doc = json.loads(path.read_text())
        s = doc["settings"]
        runs.append({"name": path.stem, "settings": s, "machine": doc["machine"], "label": s.get("label", ""),
                     "summary": doc.get("summary"),
                     "rows": [{**{k: r.get(k) for k in KEEP}, "variant": s.get("label", "")} for r in doc["rows"]]})
    return runs


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    rows = run["rows"]
    last = rows[-1]
    first_gate = next((r for r in rows if r["gate_rejected"]), None)
    room = [r for r in rows if r["outcome"] != "applied" and not r["gate_rejected"]]
    applied = [r for r in rows if r["outcome"] == "applied"]
    earlier = [r for r in rows if r["round"] > 1 and r["relapse"] is not None]
    return {
        "name": run["name"], "seed": run["settings"]["seed"], "variant": run["label"], "rounds": last["round"],
        "deletions": last["deletions"], "loss_pp": _loss_pp(last),
        "max_relapse": max((r["relapse"] for r in earlier if r["relapse"] == r["relapse"]), default=None),
        "relapse": last["relapse"], "applied": len(applied), "gate_rejected": sum(r["gate_rejected"] for r in rows),
        "failed_other": len(room), "first_gate_deletions": first_gate["deletions"] if first_gate else None,
        "first_gate_round": first_gate["round"] if first_gate else None,
        "wall_first": rows[0]["wall_s"], "wall_last": last["wall_s"],
        "loss_at": {d: next((_loss_pp(r) for r in rows if r["deletions"] >= d), None)
                    for d in (320, 640, 1280, 2560, 3200)},
    }


def _plots(runs: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for run in runs:
        rows = run["rows"]
        tag = f"{run['settings']['mode']} s{run['settings']['seed']}" + (f" {run['label']}" if run["label"] else "")
        rounds = [r["round"] for r in rows]
        axes[0][0].plot([r["deletions"] for r in rows], [_loss_pp(r) for r in rows], label=tag)
        axes[0][1].plot(rounds, [r["deletions"] for r in rows], label=tag)
        axes[1][0].plot(rounds, [r["wall_s"] for r in rows], label=tag)
        axes[1][1].plot(rounds, [r["relapse"] if r["relapse"] == r["relapse"] else None for r in rows], label=tag)
    axes[0][0].axhline(LOSS_BAR_PP, color="grey", ls="--", lw=0.8)
    axes[0][0].set(xlabel="deletions applied", ylabel="test loss vs original (pp)", title="damage over a model's life")
    axes[0][1].plot([0, 100], [0, TARGET_DELETIONS], color="grey", ls="--", lw=0.8)
    axes[0][1].set(xlabel="round", ylabel="deletions applied", title="deletions applied (dashed: every round)")
    axes[1][0].set(xlabel="round", ylabel="seconds", title="engine wall time per round")
    axes[1][1].set(xlabel="round", ylabel="share correct again", title="relapse of earlier-forgotten instances")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lifetime.png", dpi=110)
    plt.close(fig)
    names.append("lifetime.png")

    defaults = [r for r in runs if not r["label"]][:1]
    if defaults:
        rows = defaults[0]["rows"]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for layer in rows[0]["memory_fill"]:
            ax.plot([r["round"] for r in rows], [r["memory_fill"].get(layer) for r in rows], label=layer)
        ax.set(xlabel="round", ylabel="share of input directions protected", ylim=(0, 1.05),
               title=f"subspace memory fill per layer ({defaults[0]['name']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lifetime_memory.png", dpi=110)
        plt.close(fig)
        names.append("lifetime_memory.png")
    return names


def _rebase_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for run in runs:
        s, st = run["summary"], run["settings"]
        rows = run["rows"]
        loss = [_loss_pp(r) for r in rows]
        worst = max(rows, key=_loss_pp) if rows else None
        checks = s.get("rebases", [])
        lines += [f"## rebase ({run['name']})", "",
                  f"The daemon with `[models.rebase] source = \"mnist-train\"`, `epochs = {st['epochs']}`, "
                  f"`every_deletions = {st['every']}`; {st['requests']} requests of {st['k']} published one every "
                  f"{st['interval_s']:.0f} s; {s['applied']} applied, {s['failed']} failed; "
                  f"{len(checks)} rebases published.", "",
                  "| bar | measured | met |", "|---|---|---|",
                  f"| test loss ≤ 1.0 pp against the original at every published version | max "
                  f"{_f(max(loss) if loss else None)} pp (version {worst['version'] if worst else '–'}), "
                  f"{sum(v > 1.0 for v in loss)} of {len(loss)} versions above | "
                  f"{'yes' if loss and max(loss) <= 1.0 else 'no'} |",
                  f"| no request waits more than two rounds' time while a rebase trains | longest wait of a request "
                  f"published during a rebase {_f(s.get('max_wait_during_rebase_s'), 1)} s; two rounds "
                  f"{_f(s.get('wait_bar_s'), 1)} s (median engine time {_f(s.get('round_median_s'), 1)} s) | "
                  + ("yes" if s.get("max_wait_during_rebase_s") is not None and s.get("wait_bar_s")
                     and s["max_wait_during_rebase_s"] <= s["wait_bar_s"] else "no") + " |",
                  f"| every rebase excludes every forgotten instance (by hash, against the ledger) | "
                  + ", ".join(f"v{c['version']}: {c['excluded']} excluded, ledger {c['ledger_hashes']}, ours "
                              f"{c['bench_forgotten_before']} {'all in' if c['all_in_ledger'] else 'MISSING'}"
                              for c in checks) + " | "
                  + ("yes" if checks and all(c["all_in_ledger"] and c["excluded"] == c["ledger_hashes"]
                                             for c in checks) else "no") + " |",
                  f"| the default retention gate never rejects a round | {s['gate_rejections']} rounds failed by it, "
                  f"{s.get('gate_deferred', 0)} refused and deferred until the running rebase (no request failed); "
                  f"{s.get('rebases_failed', 0)} rebases failed (a re-applied round refused by the gate) | "
                  f"{'yes' if not s['gate_rejections'] and not s.get('gate_deferred') else 'no'} |", ""]
    return lines


def _rebase_plot(runs: list[dict[str, Any]], out: Path) -> list[str]:
    if not runs:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run in runs:
        rows = run["rows"]
        ax.plot([r["deletions"] for r in rows], [_loss_pp(r) for r in rows], marker=".", lw=0.8, label=run["name"])
        rb = [r for r in rows if r["outcome"] == "rebased"]
        ax.scatter([r["deletions"] for r in rb], [_loss_pp(r) for r in rb], color="red", zorder=3,
                   label="rebase versions")
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="deletions applied", ylabel="test loss vs original (pp)",
           title="served versions with exact rebases (dashed: the 1.0 pp bar)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lifetime_rebase.png", dpi=110)
    plt.close(fig)
    return ["lifetime_rebase.png"]


def write(parts: Path, out: Path, notes: Path | None = None) -> dict[str, Any]:
    runs = load_runs(parts)
    if not runs:
        raise SystemExit(f"no parts in {parts}")
    free = [r for r in runs if r["settings"]["mode"] == "data_free"]
    rebase = [r for r in runs if r["settings"]["mode"] == "rebase"]
    summaries = [summarise(r) for r in free]
    doc = {"machine": runs[0]["machine"], "runs": [{"name": r["name"], "settings": r["settings"]} for r in runs],
           "summary": summaries, "rebase": [{"name": r["name"], **{k: v for k, v in r["summary"].items()
                                                                     if k not in ("waits_s",)}} for r in rebase],
           "rows": [row for r in runs for row in r["rows"]]}
    atomic_write_bytes(out / "lifetime.json", json.dumps(doc, indent=1).encode())
    plots = _plots(free, out) + _rebase_plot(rebase, out)
    lines = ["# The life of a model (issue 21)", "",
             f"Machine: {doc['machine'].get('cpu')} ({doc['machine'].get('cpu_count')} cores), torch "
             f"{doc['machine'].get('torch')}; {runs[0]['settings'].get('threads')} thread per run. "
             "Every round is the daemon's own round path (`ModelRuntime.run_round` → retention gate → "
             "`ModelRuntime.publish` into a registry, the session reopened from the registry every 10 rounds); "
             "rows: `lifetime.json`; runs: `benchmarks/lifetime_bench.py`.", ""]
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r, s in zip(free, summaries, strict=True):
        by_mode[r["settings"]["mode"]].append(s)
    for mode, ss in by_mode.items():
        lines += [f"## {mode}", "",
                  "| run | rounds | deletions applied | test loss (pp) at 320 / 640 / 1280 / 3200 | final loss (pp) | "
                  "relapse (max) | gate rejections (first at) | other failures | wall s round 1 → last |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in ss:
            at = " / ".join(_f(s["loss_at"][d]) for d in (320, 640, 1280, 3200))
            first = f" (at {s['first_gate_deletions']} deletions, round {s['first_gate_round']})" \
                if s["first_gate_round"] else ""
            lines.append(f"| {s['name']} | {s['rounds']} | {s['deletions']} | {at} | {_f(s['loss_pp'])} | "
                         f"{_f(s['max_relapse'], 3)} | {s['gate_rejected']}{first} | {s['failed_other']} | "
                         f"{_f(s['wall_first'], 1)} → {_f(s['wall_last'], 1)} |")
        lines.append("")
        defaults = [s for s in ss if not s["variant"]]
        if mode == "data_free" and defaults:
            reached = [s for s in defaults if s["deletions"] >= TARGET_DELETIONS]
            loss = _mean([s["loss_pp"] for s in defaults])
            lines += ["### Bars (defaults, mean of seeds " + ", ".join(str(s["seed"]) for s in defaults) + ")", "",
                      "| bar | measured | met |", "|---|---|---|",
                      f"| no round fails for lack of room | {sum(s['failed_other'] for s in defaults)} failed rounds "
                      "besides the gate's" + "".join(f"; {v['variant']}: {v['failed_other']} of {v['rounds']} rounds "
                                                     f"failed for lack of room"
                                                     for v in ss if v["variant"]) + " | "
                      + ("yes" if not any(s["failed_other"] for s in ss) else "no")
                      + (" (the gate stopped the default runs before they ran out of room)"
                         if not any(s["failed_other"] for s in defaults) and any(v["failed_other"] for v in ss) else "")
                      + " |",
                      f"| test loss ≤ {LOSS_BAR_PP} pp after {TARGET_DELETIONS} deletions | {_f(loss)} pp after "
                      f"{_f(_mean([s['deletions'] for s in defaults]), 0)} deletions applied (of "
                      f"{_f(_mean([32 * s['rounds'] for s in defaults]), 0)} requested) | "
                      f"{'yes' if len(reached) == len(defaults) and loss is not None and loss <= LOSS_BAR_PP else 'no'} |",
                      f"| relapse ≤ {RELAPSE_BAR:.0%} | max {_f(max((s['max_relapse'] or 0) for s in defaults), 3)} | "
                      f"{'yes' if all((s['max_relapse'] or 0) <= RELAPSE_BAR for s in defaults) else 'no'} |",
                      f"| wall time at round 100 ≤ {WALL_RATIO_BAR}× round 1's | "
                      + ", ".join(f"{s['wall_last'] / s['wall_first']:.2f}×" for s in defaults) + " | "
                      + ("yes" if all(s["wall_last"] <= WALL_RATIO_BAR * s["wall_first"] for s in defaults) else "no")
                      + " |",
                      f"| the default retention gate never rejects | "
                      f"{sum(s['gate_rejected'] for s in defaults)} rejections | "
                      f"{'yes' if not any(s['gate_rejected'] for s in defaults) else 'no'} |", ""]
    lines += _rebase_lines(rebase)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    if notes is not None and notes.exists():
        lines += [notes.read_text()]
    atomic_write_bytes(out / "lifetime.md", "\n".join(lines).encode())
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", type=Path, default=Path("var/lifetime/parts"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--notes", type=Path, default=Path("benchmarks/results/lifetime_notes.md"))
    args = ap.parse_args()
    write(args.parts, args.out, args.notes)


if __name__ == "__main__":
    main()
