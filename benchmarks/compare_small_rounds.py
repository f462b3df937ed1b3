"""Compare the small-rounds benchmark's two settings (run_small_rounds.sh): a table and one plot.

Each setting's folder holds an ordinary benchmark result (rows, report, plots); this puts them side by side:
the test loss of every published version along twelve one-instance rounds, and of each first round alone.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SETTINGS = {"default": "default preset", "held_impressions_64": "held_impressions = 64"}


def _rows(folder: Path) -> list[dict]:
    path = folder / "mnist.json"
    if not path.is_file():
        sys.exit(f"{path}: no benchmark rows; run benchmarks/run_small_rounds.sh (make bench-small-rounds) first")
    return json.loads(path.read_text())["rows"]


def _loss(r: dict) -> float:
    return 100 * (r["acc_test_original"] - r["acc_test"])


def _line(label: str, seed: str, cells: tuple) -> str:
    first, mean, last, steps, wall, failed = cells
    return (f"| {label} | {seed} | {first:.2f} | {mean:.2f} | {last:.2f} | {steps:.0f} | {wall:.1f} "
            f"| {failed:g} |")


def main(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Rounds of one instance: with and without held class impressions", "",
             "MNIST, `adv_imp` default preset, twelve rounds of one instance in sequence (`--continual 12x1`, "
             "accumulation `max`), seeds 0 / 1 / 2; `held_impressions = 64` adds 64 class impressions of the "
             "model to each round's held examples (`rounds.held_impressions` in the daemon). Test loss against "
             "the original model, in percentage points. Rows: `default/` and `held_impressions_64/` beside this "
             "file (each with its own report).", "",
             "| setting | seed | first round alone | mean over the 12 published versions | after round 12 "
             "| steps per round | wall s per round | rounds not forgotten |",
             "|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"default": "tab:blue", "held_impressions_64": "tab:orange"}
    for name, label in SETTINGS.items():
        rows = _rows(out / name)
        seeds = sorted({r["seed"] for r in rows})
        per_seed = []
        for seed in seeds:
            cont = sorted((r for r in rows if r["protocol"] == "continual" and r["seed"] == seed),
                          key=lambda r: r["round"])
            single = [r for r in rows if r["protocol"] == "single" and r["seed"] == seed]
            losses = [_loss(r) for r in cont]
            failed = sum(r["outcome"] != "forgotten" for r in cont)
            cells = (_loss(single[0]), statistics.fmean(losses), losses[-1],
                     statistics.fmean(r["steps"] for r in cont), statistics.fmean(r["wall_s"] for r in cont), failed)
            per_seed.append(cells)
            lines.append(_line(label, str(seed), cells))
            ax.plot([r["round"] for r in cont], losses, color=colours[name], alpha=0.8,
                    label=label if seed == seeds[0] else None)
        lines.append(_line(f"**{label}**", "**mean**", tuple(statistics.fmean(c) for c in zip(*per_seed))))
    ax.set_xlabel("round (one instance each)")
    ax.set_ylabel("test loss vs original (pp)")
    ax.set_title("MNIST: twelve one-instance rounds, seeds 0-2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "small_rounds.png", dpi=120)
    lines += ["", "![small_rounds.png](small_rounds.png)", ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(out / "summary.md")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/small_rounds"))
