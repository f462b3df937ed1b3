"""``byo.md`` and its plots from ``byo.json`` (benchmarks/byo_bench.py): the issue-20 bars per architecture."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

SINGLE_BAR_PP, CONTINUAL_BAR_PP, RELAPSE_BAR = 1.0, 3.0, 0.05


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def summarise(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per architecture: the k = 64 round's loss, forgetting, collapse and time split; the continual run's
    final loss, relapse and failed rounds; the e2e result."""
    by_arch: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["rows"]:
        by_arch[r["arch"]].append(r)
    out: dict[str, dict[str, Any]] = {}
    for arch, rows in by_arch.items():
        s: dict[str, Any] = {"params": rows[0]["params"], "factory": rows[0]["factory"]}
        single = [r for r in rows if r["protocol"] == "single"]
        if single:
            s["single_seeds"] = sorted({r["seed"] for r in single})
            s["single_loss_pp"] = _mean([100 * (r["acc_test_original"] - r["acc_test"]) for r in single])
            s["single_losses_pp"] = [round(100 * (r["acc_test_original"] - r["acc_test"]), 2) for r in single]
            s["single_forget"] = max(r["acc_forget"] for r in single)
            s["single_outcomes"] = sorted({r["outcome"] for r in single})
            s["acc_test_original"] = single[0]["acc_test_original"]
            for key in ("wall_s", "attack_s", "optimise_s", "memory_s", "steps", "mia_auc"):
                s[key] = _mean([r[key] for r in single])
        cont = [r for r in rows if r["protocol"] == "continual"]
        if cont:
            last = max(r["round"] for r in cont)
            final = [r for r in cont if r["round"] == last]    # the seeds that got furthest
            s["continual_rounds"] = last
            s["continual_seeds"] = sorted({r["seed"] for r in final})
            s["continual_loss_pp"] = _mean([100 * (r["acc_test_original"] - r["acc_test"]) for r in final])
            s["continual_losses_pp"] = [round(100 * (r["acc_test_original"] - r["acc_test"]), 2) for r in final]
            # the union holds the last round's instances too (at 0 when it forgot them): relapse is the earlier ones'
            s["relapse"] = _mean([r["acc_forget_union"] * last / (last - 1) for r in final if last > 1])
            s["continual_failed"] = sum(1 for r in cont if r["outcome"] != "forgotten")
            s["continual_wall_s"] = _mean([r["wall_s"] for r in cont])
        shares = [r.get("left_out_update_share") for r in rows]
        s["left_out_single"] = _mean([r.get("left_out_update_share") for r in single]) if single else None
        s["left_out_later"] = _mean([r.get("left_out_update_share") for r in cont if r["round"] > 1]) if cont else None
        s["left_out_any"] = any(v for v in shares if v)
        e2e = doc.get("e2e", {}).get(arch)
        if e2e:
            s["e2e_ok"] = e2e.get("ok")
        out[arch] = s
    return out


def _bars(summary: dict[str, dict[str, Any]], doc: dict[str, Any]) -> list[str]:
    lines = ["| architecture | bar | measured | met |", "|---|---|---|---|"]
    for arch, s in summary.items():
        if "single_loss_pp" in s:
            ok = (s["single_loss_pp"] <= SINGLE_BAR_PP and s["single_forget"] == 0
                  and s["single_outcomes"] == ["forgotten"])
            lines.append(f"| {arch} | k = 64: forget accuracy 0, test loss ≤ {SINGLE_BAR_PP} pp (mean of seeds), "
                         f"no collapse | {_f(s['single_loss_pp'])} pp (seeds: {s['single_losses_pp']}), forget "
                         f"{_f(s['single_forget'], 3)}, outcomes {', '.join(s['single_outcomes'])} | "
                         f"{'yes' if ok else '**no**'} |")
        if "continual_loss_pp" in s:
            ok = (s["continual_loss_pp"] <= CONTINUAL_BAR_PP and s["relapse"] is not None
                  and s["relapse"] <= RELAPSE_BAR and not s["continual_failed"])
            done = s["continual_rounds"] >= 10
            verdict = "yes" if ok and done else "**no**" if not ok else "not yet (partial run)"
            partial = "" if done else f" (stopped after round {s['continual_rounds']} of 10)"
            lines.append(f"| {arch} | continual 10 × 32: test loss ≤ {CONTINUAL_BAR_PP} pp, relapse ≤ "
                         f"{100 * RELAPSE_BAR:.0f}% | {_f(s['continual_loss_pp'])} pp (seeds "
                         f"{s['continual_seeds']}: {s['continual_losses_pp']}), relapse "
                         f"{_f(100 * (s['relapse'] or 0))}%, failed rounds {s['continual_failed']}{partial} | "
                         f"{verdict} |")
        if "e2e_ok" in s:
            lines.append(f"| {arch} | import → unlearn → daemon (folder refs over Kafka) → serve (tritonclient) | "
                         f"{'ran, every check held' if s['e2e_ok'] else 'see the e2e record'} | "
                         f"{'yes' if s['e2e_ok'] else '**no**'} |")
    return lines


def _time_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    ref = summary.get("mnist_cnn", {}).get("wall_s")
    lines = ["| architecture | params | k = 64 wall (s) | × mnist_cnn | steps | attack | optimise | memory | other |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, s in summary.items():
        if not s.get("wall_s"):
            continue
        w = s["wall_s"]
        other = max(w - s["attack_s"] - s["optimise_s"] - s["memory_s"], 0.0)
        share = [f"{100 * v / w:.0f}%" for v in (s["attack_s"], s["optimise_s"], s["memory_s"], other)]
        lines.append(f"| {arch} | {s['params']:,} | {w:.1f} | {_f(w / ref if ref else None, 1)} | "
                     f"{_f(s['steps'], 0)} | {' | '.join(share)} |")
    return lines


def _left_out_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| architecture | share of the k = 64 round's update in layers the memory leaves out | "
             "same, continual rounds 2–10 |", "|---|---:|---:|"]
    for arch, s in summary.items():
        single = s.get("left_out_single")
        later = s.get("left_out_later")
        lines.append(f"| {arch} | {_f(None if single is None else 100 * single)} % | "
                     f"{_f(None if later is None else 100 * later)} % |")
    return lines


def plot(doc: dict[str, Any], summary: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cont = [r for r in doc["rows"] if r["protocol"] == "continual"]
    if cont:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for arch in summary:
            rs = [r for r in cont if r["arch"] == arch]
            if not rs:
                continue
            rounds = sorted({r["round"] for r in rs})
            loss = [_mean([100 * (r["acc_test_original"] - r["acc_test"]) for r in rs if r["round"] == i]) for i in rounds]
            union = [_mean([100 * r["acc_forget_union"] for r in rs if r["round"] == i]) for i in rounds]
            a1.plot([32 * i for i in rounds], loss, marker="o", label=arch)
            a2.plot([32 * i for i in rounds], union, marker="o", label=arch)
        a1.axhline(CONTINUAL_BAR_PP, color="grey", ls="--", lw=1)
        a1.set(xlabel="instances forgotten", ylabel="test accuracy lost (pp, mean of seeds)",
               title="continual 10 × 32: cumulative test loss")
        a2.set(xlabel="instances forgotten", ylabel="accuracy on every instance forgotten so far (%)",
               title="relapse (0: nothing came back)")
        a1.legend()
        fig.tight_layout()
        fig.savefig(out / "byo_continual.png", dpi=110)
        plt.close(fig)
        written.append("byo_continual.png")
    timed = {a: s for a, s in summary.items() if s.get("wall_s")}
    if timed:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(timed)
        bottom = [0.0] * len(names)
        for key, label in (("attack_s", "attack"), ("optimise_s", "optimise"), ("memory_s", "memory")):
            vals = [timed[a][key] for a in names]
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        other = [max(timed[a]["wall_s"] - b, 0.0) for a, b in zip(names, bottom)]
        ax.bar(names, other, bottom=bottom, label="other")
        ax.set(ylabel="seconds (mean of seeds)", title="k = 64 round: where the time goes (this CPU)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "byo_time.png", dpi=110)
        plt.close(fig)
        written.append("byo_time.png")
    return written


def write_report(doc: dict[str, Any], out: Path) -> Path:
    from daemon.registry import atomic_write_bytes

    summary = summarise(doc)
    plots = plot(doc, summary, out)
    m = doc["machine"]
    lines = [
        "# Bring your own model: three torchvision classifiers, imported and unlearned (issue 20)",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {doc['settings']['threads']} thread(s) "
        f"per process, load {m.get('load_1m', 0):.1f} when written. Method `adv_imp`, default preset; rows in "
        "`byo.json` (one a round), made by `benchmarks/byo_bench.py`.",
        "",
        "## The bars",
        "",
        *_bars(summary, doc),
        "",
        "## Where a k = 64 round's time goes",
        "",
        *_time_table(summary),
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## What the subspace memory leaves out, and what it costs",
        "",
        "Rows made before commit 4f4ad52 (each row names its `commit`) ran with a memory that protected Linear "
        "and Conv2d layers and left out normalisation scale and shift, self-attention's projections, class and "
        "positional tokens; since then it holds self-attention too (`daemon/engine/protection.py`, and the notes "
        "below). The share of each round's squared weight update that lands in the parameters left out (relapse, "
        "above, is what it costs):",
        "",
        *_left_out_table(summary),
        "",
    ]
    scale = out / "byo_sources.json"
    if scale.exists():
        import json

        sc = json.loads(scale.read_text())
        lines += [
            "## A folder source of a million images (`benchmarks/sources_scale.py`)",
            "",
            f"{sc['files']:,} files ({sc['layout']}). Listing at start-up: {sc['list_s']} s, "
            f"{sc['list_added_mb']} MB of resident memory ({sc['bytes_per_file']} bytes a file), "
            f"{sc['files_opened_listing']} files opened. Resolving three refs ({', '.join(sc['refs'])}) and "
            f"decoding them: {1000 * sc['resolve_s']:.1f} ms, {sc['files_opened_to_resolve']} files opened.",
            "",
        ]
    notes = out / "byo_notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    path = out / "byo.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
