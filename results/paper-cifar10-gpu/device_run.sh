#!/bin/bash
# Issue 16 §3 on one GPU, one call: a 2-epoch probe of the 4 runs at once (a smoke test, and the
# epoch time), then benchmarks/gpu_paper.sh with the paper preset (150 epochs if the probe says
# they fit in the time left, else the most that fit), each method at the value it was
# validation-tuned to on cpu-full (results/oneshot-cifar10-full/tune/), then, with the time
# left, the table after BatchNorm recalibration (BNRECAL=1).
# Run as `bash .devrun/device_run.sh` from the repository root, with this file in .devrun/ (git-
# ignored) and .devrun/data/ holding cifar10-jpeg.tar.gz, carried to the device machine. Its
# output there was packed into results.tar.gz ($OUT) and unpacked into this folder.
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MIRRORPRUNE_DATA=$PWD/.devrun/data
export HP="--hp-from results/oneshot-cifar10-full/tune/pilot/tune.json --hp-from results/oneshot-cifar10-full/tune/l1/tune.json --hp-from results/oneshot-cifar10-full/tune/spred/tune.json"
RES=/tmp/res; rm -rf $RES; mkdir -p $RES
finish() { tar czf "$OUT/results.tar.gz" --exclude=checkpoint.pt -C $RES . ; ls -la "$OUT"; }
trap finish EXIT
T0=$(date +%s); BUDGET=${BUDGET:-575}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $RES/device.txt
python3 -c "import torch,sys; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'python', sys.version.split()[0], 'cpus', torch.get_num_threads())" | tee -a $RES/device.txt
cp "$0" $RES/
EPOCHS=2 timeout 150 bash benchmarks/gpu_paper.sh $RES/probe > $RES/probe.log 2>&1 || { echo PROBE FAILED; tail -40 $RES/probe.log; exit 1; }
echo "probe ok $(( $(date +%s) - T0 )) s"; cat $RES/probe/gpu.json
E=$(python3 - $RES/probe "$(left)" <<'PY'
import json, glob, sys
out, left = sys.argv[1], float(sys.argv[2])
g = json.load(open(f"{out}/gpu.json"))
second = max(json.loads(open(f).read().splitlines()[1])["seconds"]
             for f in glob.glob(f"{out}/runs/*/seed*/log.jsonl"))
fixed = g["wall_seconds"] - 2 * second  # start-up, data, sweeps (the first epoch's warm-up)
e = int((left - 20 - fixed) / (second * 1.04))
print(max(1, min(150, e)))
print(f"epoch {second:.2f} s (slowest run, 2nd epoch), fixed {fixed:.0f} s, left {left:.0f} s"
      f" -> {e} epochs", file=sys.stderr)
PY
)
echo "paper run: $E epochs"
if [ "$E" = 150 ]; then unset EPOCHS; else export EPOCHS=$E; fi
BNRECAL=1 timeout $(( $(left) - 8 )) bash benchmarks/gpu_paper.sh $RES/paper-cifar10-gpu > $RES/paper.log 2>&1
echo "paper rc=$? $(( $(date +%s) - T0 )) s"; tail -30 $RES/paper.log
