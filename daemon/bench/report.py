"""The benchmark's Markdown report and PNG plots, rebuilt from the committed JSON alone."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from daemon.engine.kinds import KINDS, ForgetClass, ForgetInstances, get_kind

__all__ = ["CONTINUAL_BAR_PROTOCOL", "write_report"]

#: (rounds, k) of the continual protocol the issue sets its bar for; other shapes are reported without one
CONTINUAL_BAR_PROTOCOL = (10, 32)


def _mean(vals: list[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return statistics.fmean(v) if v else None


def _names_class(row: dict) -> bool:
    """Whether the row's kind names a class (its ``k`` column then holds the class, not a count)."""
    return get_kind(row["kind"]).names_class


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _row_key(r: dict) -> str:
    return "|".join(str(r[f]) for f in ("method", "preset", "kind", "protocol", "k", "seed", "round", "accumulation"))


def _retrain_to_accuracy(retrain: list[dict], unlearned: list[dict], extra: dict) -> tuple[float, float] | None:
    """Mean training seconds the retrain oracle takes to first reach the test accuracy of the unlearned
    model of the same seed, and the mean of those accuracies; None without the retrain curves (rows from
    before they were recorded). A retrain that never reaches it counts with its whole time."""
    secs, targets = [], []
    for r in retrain:
        curve = (extra.get(_row_key(r)) or {}).get("retrain_curve")
        mine = [u for u in unlearned if u["seed"] == r["seed"]]
        if not curve or not mine:
            return None
        target = _mean([u["acc_test"] for u in mine])
        secs.append(next((t for t, _, acc in curve if acc >= target), r["wall_s"]))
        targets.append(target)
    return (_mean(secs), _mean(targets)) if secs else None


def _plots(rows: list[dict], extra: dict, out: Path, dataset: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    single = [r for r in rows
              if r["protocol"] == "single" and r["kind"] == ForgetInstances.name and r["method"] != "retrain"]
    ks = sorted({r["k"] for r in single})
    if ks:
        fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
        colors: dict[str, Any] = {}
        for ax, k in zip(axes[0], ks):
            for r in [r for r in single if r["k"] == k]:
                traj = (extra.get(_row_key(r)) or {}).get("trajectory") or []
                pts = [(t[1], t[2]) for t in traj if t[2] is not None]
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
        # log scale: the baselines lose tens of points, adv_imp a few, and the bar is 3 pp
        a1.set_yscale("symlog", linthresh=1.0)
        a1.axhline(3.0, color="grey", linestyle="--", linewidth=1, label="bar: 3 pp after the last round")
        a1.set_xlabel("round")
        a1.set_ylabel("cumulative test-accuracy loss (pp, log above 1)")
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


def _bars(rows: list[dict], extra: dict, attack: dict | None = None) -> list[str]:
    """The issue's bars, each with its measured value and whether it is met (never a hard-coded verdict)."""
    out = ["## The bars (default preset; measured values)", "", "| bar | measured | met |", "|---|---|---|"]

    def add(bar: str, measured: str, ok: bool | None) -> None:
        out.append(f"| {bar} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")

    single = [r for r in rows
              if r["protocol"] == "single" and r["kind"] == ForgetInstances.name and r["preset"] == "default"]
    limits = {16: 0.005, 64: 0.010, 128: 0.020}
    # the bars' k; other single rows (the continual protocol's instances in one round) are references
    unlearners = [r for r in single if r["method"] != "retrain" and r["k"] in limits]
    if unlearners:
        bad = [r for r in unlearners if r["outcome"] != "forgotten"]
        add("every method reaches forget accuracy 0 within its budget",
            f"{len(unlearners) - len(bad)}/{len(unlearners)} rounds forgotten"
            + (f"; others: {', '.join(sorted({r['method'] + ':' + r['outcome'] for r in bad}))}" if bad else ""),
            not bad)
        collapsed = [r for r in unlearners if r["outcome"] == "forgotten" and (r["acc_test"] or 0) < 0.2]
        add("no published (forgotten) model is collapsed (test accuracy < 20%)",
            f"{len(collapsed)} collapsed among forgotten rounds", not collapsed)
    for k, limit in limits.items():
        rs = [r for r in single if r["k"] == k]
        if not rs:
            continue
        loss = {m: _mean([r["acc_test_original"] - r["acc_test"] for r in rs if r["method"] == m])
                for m in {r["method"] for r in rs}}
        ours = loss.get("adv_imp")
        if ours is None:
            continue
        add(f"k={k}: adv_imp test loss ≤ {100 * limit:.1f} pp (mean of seeds)", f"{100 * ours:.2f} pp", ours <= limit)
        peers = {m: v for m, v in loss.items() if m in ("neggrad", "random_label", "boundary_shrink") and v is not None}
        if peers:
            add(f"k={k}: adv_imp loses strictly less than neggrad, random_label, boundary_shrink",
                ", ".join(f"{m} {100 * v:.2f}" for m, v in sorted(peers.items())) + " pp",
                all(ours < v for v in peers.values()))
    cont = [r for r in rows if r["protocol"] == "continual" and r["method"] == "adv_imp"]
    if cont:
        # which accumulation is the default is recorded in the settings; report every rule
        for acc in sorted({r["accumulation"] for r in cont}):
            rs = [r for r in cont if r["accumulation"] == acc]
            last = max(r["round"] for r in rs)
            final = [r for r in rs if r["round"] == last]
            loss = _mean([r["acc_test_original"] - r["acc_test"] for r in final])
            relapse = _mean([r["acc_forget_union"] * last / (last - 1) for r in final
                             if r["acc_forget_union"] is not None and last > 1])
            failed = sum(1 for r in rs if r["outcome"] != "forgotten")
            seeds = len({r["seed"] for r in final})
            measured = (f"{_pp(loss)} pp, relapse {_pp(relapse)}%, failed rounds {failed} "
                        f"({seeds} seed{'s' if seeds != 1 else ''})")
            if (last, final[0]["k"]) != CONTINUAL_BAR_PROTOCOL:    # the bar is the issue's, for 10 × 32 only
                add(f"(no bar) continual {last}×{final[0]['k']} ({acc}): cumulative test loss, relapse", measured, None)
                continue
            add(f"continual {last}×{final[0]['k']} ({acc}): cumulative test loss ≤ 3.0 pp, relapse ≤ 5%", measured,
                loss is not None and relapse is not None and loss <= 0.03 and relapse <= 0.05 and not failed)
        last = max(r["round"] for r in cont)
        joint = [r for r in single if r["method"] == "adv_imp" and r["k"] == last * cont[0]["k"]
                 and r["seed"] in {c["seed"] for c in cont}]
        for r in joint:   # forget_indices(n, rounds * k, seed) draws the same instances in both protocols
            add(f"(for reference) the continual protocol's {r['k']} instances in one round (seed {r['seed']})",
                f"{_pp(r['acc_test_original'] - r['acc_test'])} pp test loss, {r['outcome']} after {r['steps']} "
                f"steps, forget accuracy {_pp(r['acc_forget'])}%", None)
    fc = [r for r in rows if r["kind"] == ForgetClass.name and r["method"] == "adv_imp"]
    for r in fc:
        add(f"forget_class {r['k']} (seed {r['seed']}): class 0%, other classes ≥ 99.15%",
            f"class {_pp(r['acc_forget'])}%, others {_pp(r['acc_other_classes'])}%",
            r["acc_forget"] == 0 and (r["acc_other_classes"] or 0) >= 0.9915)
    k64 = [r for r in single if r["k"] == 64 and r["method"] == "adv_imp"]
    if k64:
        wall = _mean([r["wall_s"] for r in k64])
        add("k=64 adv_imp round ≤ 20 s wall", f"{wall:.1f} s", wall <= 20)
        retrain = [r for r in single if r["k"] == 64 and r["method"] == "retrain"]
        if retrain:
            rt = _mean([r["wall_s"] for r in retrain])
            add("k=64 adv_imp ≥ 10× cheaper than retrain (retrain's whole recipe)",
                f"retrain {rt:.1f} s / adv_imp {wall:.1f} s = {rt / wall:.1f}×", rt / wall >= 10)
            reach = _retrain_to_accuracy(retrain, k64, extra)
            if reach is not None:
                secs, target = reach
                add("k=64 adv_imp ≥ 10× cheaper than retrain to the same test accuracy",
                    f"retrain reaches adv_imp's test accuracy ({_pp(target)}%, mean) after {secs:.1f} s / adv_imp "
                    f"{wall:.1f} s = {secs / wall:.1f}×", secs / wall >= 10)
    used = full = 0
    for r in single:
        if r["method"] != "adv_imp":
            continue
        a = (extra.get(_row_key(r)) or {}).get("attack") or {}
        used += a.get("example_iterations") or 0
        full += a.get("full_iterations") or 0
    if attack is not None:
        sm = attack["summary"]
        add(f"attack: ≥ 3× fewer example-iterations than the full count at the same success rate "
            f"(eps {attack['settings']['eps']}, {attack['rows'][0]['k']} instances, same examples)",
            f"{sm['iteration_ratio']:.1f}× fewer ({sm['time_ratio']:.1f}× faster); success {100 * sm['success_early_exit']:.1f}%"
            f" vs {100 * sm['success_full']:.1f}%",
            sm["iteration_ratio"] >= 3 and sm["success_early_exit"] >= sm["success_full"])
    if used:
        add("(for reference) attack inside the default adv_imp rounds (eps 1.5: many examples never reach "
            "their target and run all iterations)", f"{full} / {used} = {full / used:.1f}×", None)
    out.append("")
    return out


def _method_settings_lines(settings: list[dict]) -> list[str]:
    """The default preset's per-method settings: every row of those methods ran with them."""
    if not settings:
        return []
    lines = ["Per-method settings of the default preset (every other setting is shared):", ""]
    for m in settings:
        knobs = ", ".join(f"{k} = {v}" for k, v in m["overrides"].items())
        lines.append(f"- `{m['method']}` ({', '.join(m['kinds'])}): {knobs} — {m['why']}")
    return lines + [""]


def _calibrated_runs(settings: dict) -> list[str]:
    """The note that replaces the bars when rows stop at the calibrated rule: the bars read forget accuracy 0."""
    levels = sorted({r["overrides"]["stop_level"] for r in settings.get("runs", [settings])
                     if (r.get("overrides") or {}).get("stop") == "calibrated"})
    if not levels:
        return []
    return ["## Stopping rule", "",
            f"These rows stop at the calibrated rule: a round ends once forget accuracy is at most "
            f"{', '.join(f'{100 * v:.2f}%' for v in levels)} (the `stop_level`; by default the model's test accuracy, "
            "so the forgotten instances are classified as well as unseen data). The issue's bars read the zero rule "
            "(forget accuracy 0), so they are not read from these rows.", ""]


def _stopping_rules(rows: list[dict], calibrated: list[dict]) -> list[str]:
    """The zero rule's and the calibrated rule's single adv_imp rounds beside the retrain oracle, per k.

    Membership AUC 0.5 is what retraining gives; far below it, the forgotten instances have much *higher*
    loss than unseen data, which identifies them as surely as a far lower loss would.
    """
    def pick(rs: list[dict], method: str) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = defaultdict(list)
        wanted = (method, "default", ForgetInstances.name, "single")
        for r in rs:
            if (r["method"], r["preset"], r["kind"], r["protocol"]) == wanted:
                out[r["k"]].append(r)
        return out

    calibrated_by_k = pick(calibrated, "adv_imp")
    series = [("zero (forget accuracy 0)", pick(rows, "adv_imp")), ("calibrated (calibrated/)", calibrated_by_k),
              ("retrain (oracle)", pick(rows, "retrain"))]
    ks = sorted(calibrated_by_k)      # the k the calibrated rule ran at
    if not ks:
        return []
    lines = ["## Stopping rules: zero, calibrated, and retraining (adv_imp, single rounds, mean over seeds)", "",
             "| k | rule | seeds | forget acc % | test loss pp | MIA AUC | steps | wall s |", "|---|---|---|---|---|---|---|---|"]
    for k in ks:
        for name, by_k in series:
            rs = by_k.get(k, [])
            if rs:
                lines.append(f"| {k} | {name} | {len(rs)} | {_pp(_mean([r['acc_forget'] for r in rs]))} "
                             f"| {_pp(_mean([r['acc_test_original'] - r['acc_test'] for r in rs]))} "
                             f"| {_fmt(_mean([r['mia_auc'] for r in rs]), 3)} "
                             f"| {_fmt(_mean([r['steps'] for r in rs]), 0)} | {_fmt(_mean([r['wall_s'] for r in rs]))} |")
    return lines + [""]


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
    lines += _method_settings_lines(s.get("method_settings", {}).get("default", []))
    calibrated = _calibrated_runs(s)
    if calibrated:
        lines += calibrated
    else:
        attack_path = out / f"{dataset}_attack.json"
        lines += _bars(rows, extra, json.loads(attack_path.read_text()) if attack_path.exists() else None)
    notes = out / f"{dataset}_notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    single = [r for r in rows if r["protocol"] == "single" and not _names_class(r)]
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
    fc = [r for r in rows if _names_class(r)]
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
                  "Besides the final round, the mean test loss of every published version (each served in turn).", "",
                  "| method | accumulation | seeds | rounds | failed rounds | cumulative test loss pp | mean test loss over "
                  "the rounds pp | accuracy on all forgotten % | mean wall s/round |",
                  "|---|---|---|---|---|---|---|---|---|"]
        succeeded = {kind.success for kind in KINDS.values()}   # what a round that reached its goal is called
        groups2: dict[tuple, list[dict]] = defaultdict(list)
        for r in cont:
            groups2[(r["method"], r["accumulation"])].append(r)
        for (method, acc), rs in sorted(groups2.items()):
            last = max(r["round"] for r in rs)
            final = [r for r in rs if r["round"] == last]
            failed = sum(1 for r in rs if r["outcome"] not in succeeded)
            lines.append(f"| {method} | {acc} | {len({r['seed'] for r in final})} | {last} | {failed} "
                         f"| {_pp(_mean([r['acc_test_original'] - r['acc_test'] for r in final]))} "
                         f"| {_pp(_mean([r['acc_test_original'] - r['acc_test'] for r in rs]))} "
                         f"| {_pp(_mean([r['acc_forget_union'] for r in final]))} "
                         f"| {_fmt(_mean([r['wall_s'] for r in rs]))} |")
        lines.append("")
    calibrated_path = out / "calibrated" / f"{dataset}.json"
    if calibrated_path.exists():
        lines += _stopping_rules(rows, json.loads(calibrated_path.read_text())["rows"])
    for name in _plots(rows, extra, out, dataset):
        lines += [f"![{name}]({name})", ""]
    report = out / f"{dataset}.md"
    report.write_text("\n".join(lines) + "\n")
    return report
