#!/usr/bin/env bash
# CIFAR-10 (JPEG) ResNet-20 on the whole training set (preset cpu-full: 45,000 training images,
# the other 5,000 the validation split every value is chosen on; 10,000 test images; 45 epochs,
# weight decay 5e-4, bf16 + channels_last): each method's value tuned with a 10-epoch budget on
# coarser (×2) grids than MNIST's, validated after BatchNorm recalibration (without it, PILoT at
# strengths 0.5 and 1 pruned to 90-98% after 10 epochs sat at chance, 10-13%: the choice would
# be noise; the same values serve both tables); then the one-shot table at 3 seeds without
# BatchNorm recalibration and at seeds 1-2 with it (a grid whose best value sits at its edge is
# extended: `tune` warns; L1's 4e-4 and spred's 1e-3 came out best, so 8e-4 and 2e-3, 4e-3 were added;
# STR's first grid, -4,-3,-2,-1.5, was coarser than the others around its best, -2, so it
# got the MNIST grid's -2.5 and -1.75; GMP's best target, 0.98, was the grid's largest, so
# 0.992 was added),
# then the fixed targets 90/95/98% at seeds 1-2 under the same budget: pilot aimed by its target
# controller at its defaults (chosen on MNIST: a 10-epoch `tune --aim` of mass_tol cannot choose
# here, the controller never brings 90% in reach in 10 epochs, so every value trains the same
# model: results/targets-cifar10-full/controller-10-epochs/), gmp by its ramp, spred and str by
# the grid value their tune found best on validation at each target (--aim-from; their
# built-in aim tables are MNIST's); gmp and spred aimed at 98% are the one-shot runs (gmp's
# target 0.98, spred's alpha 1e-3: the same configuration), copied with --reuse, not trained
# again (seeds 1-2: the seeds whose models were kept); then the same trained targets after
# BatchNorm recalibration (TARGETS_OUT-bnrecal).
# Each finished run keeps final.pt (its trained model, exported plain: ~1 MB), committed with
# its logs and sweep, so the recalibrated table re-evaluates it without training. Six seed-0
# runs were trained before final.pt was written and their models are lost: training them
# again with the same seed would repeat their numbers, so a third seed is trained instead
# (the same cost) and the recalibrated table is over seeds 1-2 (RECAL_FIRST_SEED=1).
# About 30 hours of this 2-core machine (~75-85 min per 45-epoch run, two at a time);
# resumable (rerun to continue), so it spans sessions.
#
#   bash benchmarks/cifar10_full.sh [OUT] [TARGETS_OUT]
#        (defaults: results/oneshot-cifar10-full, results/targets-cifar10-full)
#   EXTRA="..." adds options to every run (e.g. --weight-decay W; the preset's 5e-4 was chosen
#   by `mirrorprune tune --method dense --grid weight_decay=... --levels 0` on validation)
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=$(python3 -c "import json; print(json.load(open('benchmarks/results/strength_transfer/choice.json'))['chosen']['shape'])")
export DATASET=cifar10 MODEL=resnet20 PRESET=cpu-full TUNE_EPOCHS=${TUNE_EPOCHS:-10}
export SEEDS=${SEEDS:-3} RECAL_FIRST_SEED=${RECAL_FIRST_SEED:-1}
export METHODS=${METHODS:-dense pilot pilot_opt l1 gmp spred str} BNRECAL=1 TUNE_EXTRA=--bn-recalibrate
export GRIDS="pilot strength=0.5,1,2,4,8 --hp=pilot.shape=$SHAPE
pilot_opt strength=0.5,1,2,4,8 --hp=pilot_opt.shape=$SHAPE
l1 lam=2.5e-05,5e-05,0.0001,0.0002,0.0004,0.0008
spred alpha=6.25e-05,0.000125,0.00025,0.0005,0.001,0.002,0.004
str s_init=-4,-3,-2.5,-2,-1.75,-1.5
gmp target=0.9,0.95,0.98,0.992"
bash benchmarks/tune_oneshot.sh "${1:-results/oneshot-cifar10-full}"
MP=${MIRRORPRUNE:-.venv/bin/mirrorprune}
T=${2:-results/targets-cifar10-full}
for recal in "" --bn-recalibrate; do
  if [ -n "$recal" ]; then bash benchmarks/recal_copy.sh "$T" 1; fi
  # shellcheck disable=SC2086
  $MP targets --dataset cifar10 --model resnet20 --preset cpu-full --resume --quiet \
    --sparsities 0.9,0.95,0.98 --methods pilot,gmp,str,spred --seeds "${TARGET_SEEDS:-2}" \
    --first-seed 1 --reuse "${1:-results/oneshot-cifar10-full}" \
    --parallel "${PARALLEL:-2}" --out "$T${recal:+-bnrecal}" $recal \
    --aim-from "${1:-results/oneshot-cifar10-full}/tune/spred/tune.json" \
    --aim-from "${1:-results/oneshot-cifar10-full}/tune/str/tune.json" \
    ${EXTRA:-}
done
