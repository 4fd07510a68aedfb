#!/usr/bin/env bash
# Every method's hyperparameter for the MNIST one-shot table, chosen on the validation split
# (the last 10% of the training set; the test set plays no part), then the table itself with
# those values, 3 seeds. Resumable: rerun the same command after an interruption.
#
#   bash benchmarks/tune_oneshot_mnist.sh [OUT]          (default OUT: results/oneshot-mnist)
#
# Grids: PILoT's strength and L1's λ on the same √2-spaced grid density (11 points, a 32× range);
# the other methods' knobs on ×2 grids (spred α, L1-on-m λ) or their natural ranges (CS and STR
# s_init, Powerprop's exponent, GMP's target). Each `tune` trains one seed per value with the
# `cpu` preset (15 epochs, batch 128) and picks the best mean validation accuracy at 90/95/98%.
# PILoT (both forms) uses the default shape (benchmarks/results/strength_transfer/choice.json);
# PILoTAdamW (experimental) its default lr_factor 0.1. JOBS tunes at a time, each training
# PARALLEL runs at once (defaults 1 and 2), and the table PARALLEL runs at once; MIRRORPRUNE is
# the command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/oneshot-mnist}
MP=${MIRRORPRUNE:-.venv/bin/mirrorprune}
JOBS=${JOBS:-1}
PARALLEL=${PARALLEL:-2}
METHODS="dense l1 l1_m spred pilot pilot_opt pilot_adamw cs powerprop str gmp"
sqrt2() { python3 -c "print(','.join(f'{$1 * 2 ** (k / 2):.4g}' for k in range($2)))"; }
times2() { python3 -c "print(','.join(f'{$1 * 2 ** k:.4g}' for k in range($2)))"; }
SHAPE=$(python3 -c "import json; print(json.load(open('benchmarks/results/strength_transfer/choice.json'))['chosen']['shape'])")
GRIDS="pilot strength=$(sqrt2 0.25 11) --hp=pilot.shape=$SHAPE
pilot_opt strength=$(sqrt2 0.25 11) --hp=pilot_opt.shape=$SHAPE
pilot_adamw strength=$(sqrt2 0.25 11) --hp=pilot_adamw.shape=$SHAPE
l1 lam=$(sqrt2 1.25e-5 11)
l1_m lam=$(times2 1e-5 8)
spred alpha=$(times2 1.5625e-5 8)
cs s_init=0,-0.02,-0.05,-0.1,-0.2
powerprop a=1.5,2,3,4
str s_init=-4,-3,-2.5,-2,-1.75,-1.5
gmp target=0.8,0.9,0.95,0.98"
COMMON="--dataset mnist --model lenet_300_100 --preset cpu --resume --quiet ${EPOCHS:+--epochs $EPOCHS}"
echo "$GRIDS" | xargs -P "$JOBS" -L 1 sh -c \
  "$MP tune $COMMON --parallel $PARALLEL --method \$0 --grid \$1 \$2 --out $OUT/tune/\$0 > /dev/null \
   && echo tuned \$0"
HPFROM=$(for f in "$OUT"/tune/*/tune.json; do printf -- '--hp-from %s ' "$f"; done)
$MP oneshot $COMMON --seeds 3 --methods "$(echo $METHODS | tr ' ' ,)" $HPFROM \
  --parallel "$PARALLEL" --out "$OUT"
