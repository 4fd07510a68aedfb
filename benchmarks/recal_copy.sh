#!/usr/bin/env bash
# Copy the trained runs of an experiment folder OUT (oneshot's OUT/runs/METHOD/seedN, targets'
# OUT/targetT/runs/METHOD/seedN) into OUT-bnrecal, where the same command with
# --bn-recalibrate evaluates them again after re-estimating BatchNorm statistics, without
# training: each run's trained model (final.pt; a checkpoint from before final.pt was written),
# config and logs. A run copied already, or whose recalibrated results are there (sweep.json),
# is left alone; a run kept without its model is not copied (the command trains it again
# there, with the same seed). FIRST_SEED=K copies seeds K and above only: those the
# recalibrated pass evaluates (--first-seed K), no unused copies.
#
#   bash benchmarks/recal_copy.sh OUT [FIRST_SEED]
set -euo pipefail
OUT=${1:?usage: recal_copy.sh OUT [FIRST_SEED]}
FIRST=${2:-0}
shopt -s nullglob
for d in "$OUT"/runs/*/seed* "$OUT"/target*/runs/*/seed*; do
  [ "${d##*/seed}" -ge "$FIRST" ] || continue
  dst="$OUT-bnrecal/${d#"$OUT"/}"
  for f in final.pt checkpoint.pt sweep.json; do [ -f "$dst/$f" ] && continue 2; done
  for f in final.pt checkpoint.pt; do
    if [ -f "$d/$f" ]; then
      mkdir -p "$dst" && cp "$d/$f" "$d"/config.json "$d"/log.* "$dst/"
      break
    fi
  done
done
