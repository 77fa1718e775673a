#!/usr/bin/env bash
# Run bundled-data configs one after another and print each one's kNN summary line, wall time and load.
# Usage: benchmarks/bundled_runs.sh simclr moco_v2 ...   (names of configs/<name>_bundled.yaml)
# Set OMP_NUM_THREADS=1 to time a run on one core.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${OUT_DIR:-runs/bundled}")
for name in "$@"; do
  mkdir -p "$out/$name"
  start=$(date +%s)
  (cd "$out/$name" && ssl-lightning fit --config "$root/configs/${name}_bundled.yaml" > run.log 2>&1)
  echo "$name: $(tail -n 1 "$out/$name/run.log") wall=$(( $(date +%s) - start ))s load=$(cut -d' ' -f1 /proc/loadavg)"
done
