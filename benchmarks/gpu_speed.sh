#!/usr/bin/env bash
# Issue 13's GPU checks in one run (about 10 minutes on one H200): the step table (SimCLR, BYOL, MoCo v2; eager and
# the whole step compiled, the compiled-backbone variant left out for time; img/s and MFU), the device JPEG decode against per-sample workers, then SimCLR's 200 CIFAR-10 epochs.
# Run from the repository root; CIFAR10 is the folder holding CIFAR-10's train.tar.gz and test.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR10=${CIFAR10:-../shared/data/cifar10}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=. python3 benchmarks/gpu_step_table.py --variants eager step 2>&1 | grep -E "^(NVIDIA|[a-z_0-9]+ +\||method)"
if [ -f benchmarks/jpeg_decode.py ]; then PYTHONPATH=. python3 benchmarks/jpeg_decode.py --device cuda 2>&1 | tail -4; fi
PYTHONPATH=. python3 benchmarks/cifar10_200ep.py --data "$CIFAR10" 2>&1 | tail -1
