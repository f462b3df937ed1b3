#!/usr/bin/env bash
# Rounds of one instance (what the daemon runs when requests arrive one at a time), with and without
# held class impressions (rounds.held_impressions): make bench-small-rounds, ~25 min here. Writes
# benchmarks/results/small_rounds/{default,held_impressions_64}/ (rows, report, plots) and the comparison
# summary.md + small_rounds.png beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
U=${UNLEARND:-.venv/bin/unlearnd}
OUT=${OUT:-benchmarks/results/small_rounds}
CACHE=${CACHE:-var/bench-cache}
common=(--dataset mnist --cache "$CACHE" --methods adv_imp --presets default --kind forget --k 1 --seeds 0,1,2
        --continual 12x1 --accumulations max)
$U bench "${common[@]}" --out "$OUT/default"
$U bench "${common[@]}" --out "$OUT/held_impressions_64" --set held_impressions=64
${PYTHON:-.venv/bin/python} benchmarks/compare_small_rounds.py "$OUT"
