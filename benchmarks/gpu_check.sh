#!/usr/bin/env bash
# GPU checks in a few minutes: run from the repository root on a machine with a CUDA GPU
# (its own PyTorch + Lightning; the package is used from the source tree).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=. python3 benchmarks/gpu_check.py 2>&1 | grep -v -E "^(Seed set|GPU available|TPU available|LOCAL_RANK|💡|\s*$)"
# the ViT methods (issue 12): a short bf16-mixed fit of each ImageNet recipe (img/s, peak memory), then the
# masked methods' step memory next to a full-image step of the same ViT
PYTHONPATH=. python3 benchmarks/vit_methods_gpu_check.py 2>&1 | grep -E "^(NVIDIA|[a-z0-9]+: )"
PYTHONPATH=. python3 benchmarks/masked_memory.py --imagenet 2>&1 | grep -E "^(NVIDIA|[a-z0-9]+ \(|[a-z0-9]+: )"
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/test_views.py tests/test_nt_xent.py 2>&1 | tail -2
