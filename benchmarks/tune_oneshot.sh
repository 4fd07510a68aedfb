#!/usr/bin/env bash
# Every method's hyperparameter chosen on the validation split (the last 10% of the training
# set; the test set plays no part), then the one-shot table with those values. Resumable:
# rerun the same command after an interruption (finished tunes and runs are reused).
#
#   bash benchmarks/tune_oneshot.sh [OUT]      MNIST LeNet-300-100, cpu preset, 3 seeds
#                                              (default OUT: results/oneshot-mnist)
#   DATASET=cifar10 MODEL=resnet20 PRESET=cpu-full TUNE_EPOCHS=10 SEEDS=2 \
#     METHODS="dense pilot pilot_opt l1 gmp spred str" bash benchmarks/tune_oneshot.sh \
#     results/oneshot-cifar10-full             CIFAR-10 on the whole training set (issue 16)
#
# Grids: PILoT's strength and L1's λ on the same √2-spaced grid density (11 points, a 32× range);
# the other methods' knobs on ×2 grids (spred α, L1-on-m λ) or their natural ranges (CS and STR
# s_init, Powerprop's exponent, GMP's target). Each `tune` trains one seed per value with the
# preset (TUNE_EPOCHS: a shorter budget for tuning) and picks the best mean validation accuracy
# at 90/95/98%. PILoT (both forms) uses the default shape
# (benchmarks/results/strength_transfer/choice.json); PILoTAdamW (experimental) its default
# lr_factor 0.1. JOBS tunes at a time, each training PARALLEL runs at once (defaults 1 and 2), and
# the table PARALLEL runs at once; MIRRORPRUNE is the command; EXTRA adds options to every call,
# TUNE_EXTRA to the tunes only (e.g. --bn-recalibrate: validate after BatchNorm recalibration);
# BNRECAL=1 adds the table after BatchNorm recalibration (OUT-bnrecal, same trained runs;
# RECAL_FIRST_SEED=K: over seeds K..SEEDS-1 only, e.g. where earlier seeds' models were lost);
# GRIDS replaces the grids (lines "METHOD KEY=v1,v2,... [--hp=...]").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/oneshot-mnist}
MP=${MIRRORPRUNE:-.venv/bin/mirrorprune}
DATASET=${DATASET:-mnist}
MODEL=${MODEL:-lenet_300_100}
PRESET=${PRESET:-cpu}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-1}
PARALLEL=${PARALLEL:-2}
METHODS=${METHODS:-dense l1 l1_m spred pilot pilot_opt pilot_adamw cs powerprop str gmp}
sqrt2() { python3 -c "print(','.join(f'{$1 * 2 ** (k / 2):.4g}' for k in range($2)))"; }
times2() { python3 -c "print(','.join(f'{$1 * 2 ** k:.4g}' for k in range($2)))"; }
SHAPE=$(python3 -c "import json; print(json.load(open('benchmarks/results/strength_transfer/choice.json'))['chosen']['shape'])")
GRIDS=${GRIDS:-"pilot strength=$(sqrt2 0.25 11) --hp=pilot.shape=$SHAPE
pilot_opt strength=$(sqrt2 0.25 11) --hp=pilot_opt.shape=$SHAPE
pilot_adamw strength=$(sqrt2 0.25 11) --hp=pilot_adamw.shape=$SHAPE
l1 lam=$(sqrt2 1.25e-5 11)
l1_m lam=$(times2 1e-5 8)
spred alpha=$(times2 1.5625e-5 8)
cs s_init=0,-0.02,-0.05,-0.1,-0.2
powerprop a=1.5,2,3,4
str s_init=-4,-3,-2.5,-2,-1.75,-1.5
gmp target=0.8,0.9,0.95,0.98"}
COMMON="--dataset $DATASET --model $MODEL --preset $PRESET --resume --quiet ${EXTRA:-}"
# only the methods asked for (dense has nothing to tune)
echo "$GRIDS" | while read -r m rest; do
  case " $METHODS " in *" $m "*) echo "$m $rest";; esac
done | xargs -r -P "$JOBS" -L 1 sh -c \
  "$MP tune $COMMON ${TUNE_EPOCHS:+--epochs $TUNE_EPOCHS} ${TUNE_EXTRA:-} --parallel $PARALLEL --method \$0 \
   --grid \$1 \$2 --out $OUT/tune/\$0 > /dev/null && echo tuned \$0"
HPFROM=$(for m in $METHODS; do f="$OUT/tune/$m/tune.json"; [ -f "$f" ] && printf -- '--hp-from %s ' "$f"; done; true)
# shellcheck disable=SC2086
$MP oneshot $COMMON --seeds "$SEEDS" --methods "$(echo $METHODS | tr ' ' ,)" $HPFROM \
  --parallel "$PARALLEL" --out "$OUT"
# BNRECAL=1: the same trained runs evaluated after re-estimating BatchNorm statistics, in
# OUT-bnrecal (a folder of its own: its settings differ; the runs are copied, not retrained)
if [ -n "${BNRECAL:-}" ]; then
  K=${RECAL_FIRST_SEED:-0}
  bash benchmarks/recal_copy.sh "$OUT" "$K"
  # shellcheck disable=SC2086
  $MP oneshot $COMMON --first-seed "$K" --seeds $((SEEDS - K)) \
    --methods "$(echo $METHODS | tr ' ' ,)" $HPFROM \
    --bn-recalibrate --parallel "$PARALLEL" --out "$OUT-bnrecal"
fi
