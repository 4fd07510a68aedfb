#!/bin/bash
# Issue 16 §3 on one GPU: smoke, a 2-epoch probe of the 4 runs at once (throughput), then the
# paper preset (150 epochs if the probe says it fits the time left, else the most that fits),
# then the train_speed rows on the GPU if time remains.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/.devrun/code/src PYTHONUNBUFFERED=1 MIRRORPRUNE_DATA=$PWD/.devrun/data
RES=/tmp/res; rm -rf $RES /tmp/smoke; mkdir -p $RES
finish() { tar czf $OUT/results.tar.gz --exclude=checkpoint.pt -C $RES . ; ls -la $OUT; }
trap finish EXIT
T0=$(date +%s); BUDGET=${BUDGET:-540}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $RES/device.txt
python3 -c "import torch,sys,PIL; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'python', sys.version.split()[0], 'cpus', torch.get_num_threads())" | tee -a $RES/device.txt
timeout 90 python3 -m mirrorprune oneshot --dataset digits --methods dense,pilot --seeds 1 --epochs 1 --precision bf16 --channels-last --parallel 2 --out /tmp/smoke --quiet > $RES/smoke.log 2>&1 || { echo SMOKE FAILED; tail -30 $RES/smoke.log; exit 1; }
echo "smoke ok $(( $(date +%s) - T0 )) s"
EPOCHS=2 timeout 150 bash .devrun/code/benchmarks/gpu_paper.sh $RES/probe > $RES/probe.log 2>&1 || { echo PROBE FAILED; tail -30 $RES/probe.log; exit 1; }
echo "probe ok $(( $(date +%s) - T0 )) s"; cat $RES/probe/gpu.json
E=$(python3 - $RES/probe $(left) <<'PY'
import json, glob, sys
out, left = sys.argv[1], float(sys.argv[2])
g = json.load(open(f"{out}/gpu.json"))
second = max(json.loads(open(f).read().splitlines()[1])["seconds"] for f in glob.glob(f"{out}/runs/*/seed0/log.jsonl"))
fixed = g["wall_seconds"] - 2 * second  # start-up, data, sweeps (first epoch's warm-up counted here)
e = int((left - 25 - fixed) / (second * 1.05))
print(max(1, min(150, e)))
print(f"epoch {second:.2f} s (slowest run, 2nd epoch), fixed {fixed:.0f} s, left {left:.0f} s -> {e} epochs", file=sys.stderr)
PY
)
echo "paper run: $E epochs"
if [ "$E" = 150 ]; then unset EPOCHS; else export EPOCHS=$E; fi
timeout $(( $(left) - 10 )) bash .devrun/code/benchmarks/gpu_paper.sh $RES/paper-cifar10-gpu > $RES/paper.log 2>&1
echo "paper rc=$? $(( $(date +%s) - T0 )) s"; tail -16 $RES/paper.log
if [ $(left) -gt 45 ]; then
  timeout $(( $(left) - 5 )) python3 .devrun/code/benchmarks/train_speed.py --device cuda --rounds 7 --steps 5 --out $RES/train_speed > $RES/train_speed.log 2>&1
  echo "train_speed rc=$? $(( $(date +%s) - T0 )) s"; cat $RES/train_speed.log
fi
