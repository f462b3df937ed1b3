"""The benchmark's Markdown report and PNG plots, rebuilt from the committed JSON alone."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.fmean(v) if v else None


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _plots(rows: list[dict], extra: dict, out: Path, dataset: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    single = [r for r in rows if r["protocol"] == "single" and r["kind"] == "forget" and r["method"] != "retrain"]
    ks = sorted({r["k"] for r in single})
    if ks:
        fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
        colors: dict[str, Any] = {}
        for ax, k in zip(axes[0], ks):
            for r in [r for r in single if r["k"] == k]:
                key = "|".join(str(r[f]) for f in ("method", "preset", "kind", "protocol", "k", "seed", "round",
                                                  "accumulation"))
                traj = (extra.get(key) or {}).get("trajectory") or []
                pts = [(1 - t[1] if False else t[1], t[2]) for t in traj if t[2] is not None]
                if not pts:
                    continue
                label = f"{r['method']} ({r['preset']})"
                base = pts[0][1]
                color = colors.setdefault(label, f"C{len(colors) % 10}")
                ax.plot([100 * (base - p[1]) for p in pts], [100 * p[0] for p in pts], color=color, alpha=0.6,
                        label=label if r["seed"] == min(x["seed"] for x in single) else None)
            ax.set_title(f"k = {k}")
            ax.set_xlabel("test-accuracy loss on the tracked test images (pp)")
            ax.set_ylabel("forget accuracy (%)")
            ax.set_xscale("symlog", linthresh=1)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{dataset}: forgetting vs retention along each round (lower left is better)")
        fig.tight_layout()
        name = f"{dataset}_tradeoff.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    cont = [r for r in rows if r["protocol"] == "continual"]
    if cont:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in cont:
            groups[(r["method"], r["accumulation"])].append(r)
        for (method, acc), rs in sorted(groups.items()):
            by_round: dict[int, list[dict]] = defaultdict(list)
            for r in rs:
                by_round[r["round"]].append(r)
            rounds = sorted(by_round)
            loss = [100 * _mean([x["acc_test_original"] - x["acc_test"] for x in by_round[i]]) for i in rounds]
            relapse = [100 * (_mean([x["acc_forget_union"] for x in by_round[i]]) or 0) for i in rounds]
            a1.plot(rounds, loss, marker="o", label=f"{method} / {acc}")
            a2.plot(rounds, relapse, marker="o", label=f"{method} / {acc}")
        a1.set_xlabel("round")
        a1.set_ylabel("cumulative test-accuracy loss (pp)")
        a2.set_xlabel("round")
        a2.set_ylabel("accuracy on all instances forgotten so far (%)")
        a1.legend(fontsize=7)
        a1.grid(alpha=0.3)
        a2.grid(alpha=0.3)
        fig.suptitle(f"{dataset}: continual unlearning")
        fig.tight_layout()
        name = f"{dataset}_continual.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def write_report(out: Path, dataset: str) -> Path:
    """Rebuild ``<dataset>.md`` and its plots from ``<dataset>.json``; returns the report's path."""
    path = out / f"{dataset}.json"
    doc = json.loads(path.read_text())
    extra_path = out / f"{dataset}_trajectories.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    rows: list[dict] = doc["rows"]
    lines = [f"# Unlearning benchmark: {dataset}", ""]
    m = doc["machine"]
    s = doc["settings"]
    lines += [f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('torch_threads')} torch threads), "
              f"torch {m.get('torch')}, device {m.get('device')}.",
              f"Original test accuracy: {100 * s['acc_test_original']:.2f}%. "
              f"Default accumulation: `{s.get('default_accumulation')}`. Rows: {len(rows)}.", ""]
    single = [r for r in rows if r["protocol"] == "single" and r["kind"] != "forget_class"]
    if single:
        lines += ["## Single rounds (mean over seeds)", "",
                  "| kind | k | method | preset | outcomes | forget acc % | test loss pp | retain acc % | MIA AUC | steps | attack s | optimise s | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in single:
            groups[(r["kind"], r["k"], r["method"], r["preset"])].append(r)
        for (kind, k, method, preset), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
            outcomes = defaultdict(int)
            for r in rs:
                outcomes[r["outcome"]] += 1
            loss = _mean([r["acc_test_original"] - r["acc_test"] for r in rs if r["acc_test"] is not None])
            lines.append(
                f"| {kind} | {k} | {method} | {preset} | {', '.join(f'{n}×{o}' for o, n in sorted(outcomes.items()))} "
                f"| {_pp(_mean([r['acc_forget'] for r in rs]))} | {_pp(loss)} "
                f"| {_pp(_mean([r['acc_retain'] for r in rs]))} | {_fmt(_mean([r['mia_auc'] for r in rs]), 3)} "
                f"| {_fmt(_mean([r['steps'] for r in rs]), 0)} | {_fmt(_mean([r['attack_s'] for r in rs]))} "
                f"| {_fmt(_mean([r['optimise_s'] for r in rs]))} | {_fmt(_mean([r['wall_s'] for r in rs]))} |")
        lines.append("")
    fc = [r for r in rows if r["kind"] == "forget_class"]
    if fc:
        lines += ["## Class forgetting (k column = the class)", "",
                  "| class | method | seed | outcome | class test acc % | other classes acc % | steps | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(fc, key=lambda r: (r["k"], r["method"], r["seed"])):
            lines.append(f"| {r['k']} | {r['method']} | {r['seed']} | {r['outcome']} | {_pp(r['acc_forget'])} "
                         f"| {_pp(r['acc_other_classes'])} | {r['steps']} | {_fmt(r['wall_s'])} |")
        lines.append("")
    cont = [r for r in rows if r["protocol"] == "continual"]
    if cont:
        lines += ["## Continual rounds (final round, mean over seeds)", "",
                  "| method | accumulation | rounds | failed rounds | cumulative test loss pp | accuracy on all forgotten % | mean wall s/round |",
                  "|---|---|---|---|---|---|---|"]
        groups2: dict[tuple, list[dict]] = defaultdict(list)
        for r in cont:
            groups2[(r["method"], r["accumulation"])].append(r)
        for (method, acc), rs in sorted(groups2.items()):
            last = max(r["round"] for r in rs)
            final = [r for r in rs if r["round"] == last]
            failed = sum(1 for r in rs if r["outcome"] not in ("forgotten", "relabelled"))
            lines.append(f"| {method} | {acc} | {last} | {failed} "
                         f"| {_pp(_mean([r['acc_test_original'] - r['acc_test'] for r in final]))} "
                         f"| {_pp(_mean([r['acc_forget_union'] for r in final]))} "
                         f"| {_fmt(_mean([r['wall_s'] for r in rs]))} |")
        lines.append("")
    for name in _plots(rows, extra, out, dataset):
        lines += [f"![{name}]({name})", ""]
    report = out / f"{dataset}.md"
    report.write_text("\n".join(lines) + "\n")
    return report
