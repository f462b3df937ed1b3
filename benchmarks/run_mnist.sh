#!/usr/bin/env bash
# Regenerates benchmarks/results/mnist.{json,md} and its plots (make bench). Several invocations
# gather their rows into one file (--resume keeps what earlier parts measured).
set -euo pipefail
cd "$(dirname "$0")/.."
U=${UNLEARND:-.venv/bin/unlearnd}
OUT=${OUT:-benchmarks/results}
CACHE=${CACHE:-var/bench-cache}
common=(--dataset mnist --out "$OUT" --cache "$CACHE")
# 1. single rounds: every method, k = 16/64/128, 3 seeds, default and paper presets
$U bench "${common[@]}" --methods neggrad,adv,adv_imp,random_label,boundary_shrink,retrain \
    --k 16,64,128 --seeds 0,1,2 --kind forget --presets default,paper $( [ -n "${RESUME:-}" ] && echo --resume )
# 2. continual: 10 rounds x 32, every accumulation rule for adv_imp, neggrad as reference
$U bench "${common[@]}" --methods adv_imp,neggrad --k 32 --seeds 0 --kind forget --presets default \
    --continual 10x32 --accumulations none,sum,max,decayed --resume
# 3. class forgetting, and relabelling
$U bench "${common[@]}" --methods neggrad,adv_imp,random_label,boundary_shrink --k 32 --seeds 0 \
    --kind forget_class --forget-classes 0,3,8 --presets default --resume
$U bench "${common[@]}" --methods neggrad,adv_imp,random_label,boundary_shrink --k 16,64 --seeds 0 \
    --kind relabel --presets default --resume
# 4. attack efficiency (early exit vs the full iteration count, same examples)
${PYTHON:-.venv/bin/python} -m daemon.bench.attack --out "$OUT" --weights "$CACHE/mnist-mnist_cnn-e6.safetensors"
# 5. the report and plots
$U bench --dataset mnist --out "$OUT" --report-only
