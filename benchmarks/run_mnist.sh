#!/usr/bin/env bash
# Regenerates benchmarks/results/mnist.{json,md} and its plots (make bench). Several invocations
# gather their rows into one file; --resume keeps what earlier parts (or an interrupted run) measured.
# Set FRESH=1 to start from an empty results file.
set -euo pipefail
cd "$(dirname "$0")/.."
U=${UNLEARND:-.venv/bin/unlearnd}
OUT=${OUT:-benchmarks/results}
CACHE=${CACHE:-var/bench-cache}
common=(--dataset mnist --out "$OUT" --cache "$CACHE")
resume=--resume
[ -n "${FRESH:-}" ] && resume=
# 1. single rounds, default preset: every method (retrain is the oracle), k = 16/64/128, 3 seeds
$U bench "${common[@]}" --methods neggrad,adv,adv_imp,random_label,boundary_shrink,retrain \
    --k 16,64,128 --seeds 0,1,2 --kind forget --presets default $resume
# 2. continual: 10 rounds x 32, every accumulation rule for adv_imp, neggrad as reference
$U bench "${common[@]}" --methods adv_imp,neggrad --k 32 --seeds 0 --kind forget --presets default \
    --continual 10x32 --accumulations none,sum,max,decayed --resume
#    the default accumulation at two more seeds (the bar is the mean of three), and the two rules closest to it
$U bench "${common[@]}" --methods adv_imp,neggrad --k 32 --seeds 1,2 --kind forget --presets default \
    --continual 10x32 --accumulations max --resume
$U bench "${common[@]}" --methods adv_imp --k 32 --seeds 1,2 --kind forget --presets default \
    --continual 10x32 --accumulations sum,decayed --resume
#    for reference: the same 320 instances (seed 0's first 320) forgotten in one round
$U bench "${common[@]}" --methods adv_imp --k 320 --seeds 0 --kind forget --presets default --resume
# 3. class forgetting, and relabelling
$U bench "${common[@]}" --methods neggrad,adv_imp,random_label,boundary_shrink --k 32 --seeds 0 \
    --kind forget_class --forget-classes 0,3,8 --presets default --resume
$U bench "${common[@]}" --methods neggrad,adv_imp,random_label,boundary_shrink --k 16,64 --seeds 0 \
    --kind relabel --presets default --resume
# 4. attack efficiency (early exit vs the full iteration count, same examples)
${PYTHON:-.venv/bin/python} -m daemon.bench.attack --out "$OUT" --weights "$CACHE/mnist-mnist_cnn-e6-ls0.2.safetensors"
# 5. L2UL's exact settings (paper preset) beside them: all seeds at k = 16, seed 0 at k = 64 and 128
#    (each paper round runs up to 1000 steps of 256 adversarial examples: ~3 min here)
$U bench "${common[@]}" --methods neggrad,adv,adv_imp --k 16 --seeds 0,1,2 --kind forget --presets paper --resume
$U bench "${common[@]}" --methods neggrad,adv,adv_imp --k 64,128 --seeds 0 --kind forget --presets paper --resume
# 6. the report and plots
$U bench --dataset mnist --out "$OUT" --report-only
# 7. the calibrated stopping rule beside the zero rule: adv_imp stops once forget accuracy is at most the model's
#    test accuracy (the instances classified as well as unseen data); its own folder, since rows are keyed
#    without their settings (~5 min)
$U bench --dataset mnist --out "$OUT/calibrated" --cache "$CACHE" --methods adv_imp --k 16,64,128 --seeds 0,1,2 \
    --kind forget --presets default --set stop=calibrated $resume
