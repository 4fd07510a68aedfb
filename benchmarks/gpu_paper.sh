#!/usr/bin/env bash
# The paper preset on one GPU (SPEC §4.2): ResNet-20 on CIFAR-10, 150 epochs, batch 256, lr 0.1
# (0.2 for the m ⊙ w methods), cosine, weight decay 1e-4, bf16 autocast + channels_last, the
# data held and augmented on the GPU; every (method, seed) run in a process of its own, all
# sharing the GPU (--parallel), then the one-shot sweep of each. Resumable: rerun the same
# command to continue or to add seeds.
#
#   bash benchmarks/gpu_paper.sh [OUT]                 (default OUT: results/paper-cifar10-gpu)
#
# Environment: METHODS (dense,pilot,l1,spred), SEEDS (1; then 2, 3: finished seeds are reused),
# PARALLEL (default: every run at once), EPOCHS (default: the preset's 150), COMPILE=1
# (torch.compile), HP (extra options, e.g. "--hp-from tune.json" or "--hp l1.lam=5e-5"),
# PYTHON (python3), DATA (the folder holding cifar10-jpeg.tar.gz or cifar-10-batches-py),
# BNRECAL=1 (then also the table after BatchNorm recalibration, in OUT-bnrecal: the trained
# models evaluated again, no training).
# Writes OUT/oneshot.{csv,md,png}, OUT/runs/METHOD/seedN/ and OUT/gpu.json (device, wall
# time of the training pass, aggregate throughput in training images per second).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/paper-cifar10-gpu}
PY=${PYTHON:-python3}
METHODS=${METHODS:-dense,pilot,l1,spred}
SEEDS=${SEEDS:-1}
RUNS=$(( $(echo "$METHODS" | tr ',' '\n' | grep -c .) * SEEDS ))
PARALLEL=${PARALLEL:-$RUNS}
$PY -c "import torch, sys; torch.cuda.is_available() or sys.exit('no GPU here: gpu_paper.sh is for a machine with one (the cpu and cpu-full presets are for CPUs)')"
mkdir -p "$OUT"
oneshot() {  # the paper preset's runs; extra options, then the output folder, last
  # shellcheck disable=SC2086
  $PY -m mirrorprune oneshot --dataset cifar10 --model resnet20 --preset paper \
    --methods "$METHODS" --seeds "$SEEDS" --parallel "$PARALLEL" --resume --quiet \
    ${EPOCHS:+--epochs "$EPOCHS"} ${DATA:+--data-dir "$DATA"} ${HP:-} "$@"
}
t0=$(date +%s.%N)
oneshot ${COMPILE:+--compile} --out "$OUT" | tee "$OUT/stdout.txt"
t1=$(date +%s.%N)
$PY - "$OUT" "$t0" "$t1" "$RUNS" "$PARALLEL" <<'PY'
import json, sys, glob, torch
out, t0, t1, runs, parallel = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), *map(int, sys.argv[4:])
epochs = [sum(1 for _ in open(f)) for f in glob.glob(f"{out}/runs/*/seed*/log.jsonl")]
train = json.load(open(f"{out}/config.json"))["train_size"]
p = torch.cuda.get_device_properties(0)
info = {"device": torch.cuda.get_device_name(0), "memory_gib": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__, "runs": runs, "parallel": parallel,
        "wall_seconds": round(t1 - t0, 1), "epochs_trained_this_call_at_most": sum(epochs),
        "images_per_second_aggregate": round(sum(epochs) * train / (t1 - t0)),
        "note": "wall time of this invocation (data loading, training, evaluation every "
                "epoch, one-shot sweeps); throughput counts every epoch in the logs, so it is "
                "exact only for a call that trained every run from scratch"}
json.dump(info, open(f"{out}/gpu.json", "w"), indent=1)
print(json.dumps(info))
PY
if [ -n "${BNRECAL:-}" ]; then
  bash benchmarks/recal_copy.sh "$OUT" && mkdir -p "$OUT-bnrecal"
  oneshot --bn-recalibrate --out "$OUT-bnrecal" | tee "$OUT-bnrecal/stdout.txt"
fi
