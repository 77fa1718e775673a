#!/usr/bin/env bash
# The peers of benchmarks/peers.py, each in its own virtual environment at the repository root (never in ours:
# stable-pretraining registers a Lightning callbacks_factory entry point that adds its callbacks to every
# Lightning run in the environment it is installed in). Versions: the `bench` extra in pyproject.toml.
# Usage: bash benchmarks/peers/setup_envs.sh   (PYTHON=... to pick the interpreter; reruns only install)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
TORCH=(torch==2.14.1 torchvision==0.29.1)

make_env() {
    local env=$1
    shift
    [ -x "$env/bin/python" ] || "$PYTHON" -m venv "$env"
    "$env/bin/pip" install --quiet "${TORCH[@]}" "$@"
    echo "$env: $("$env/bin/python" -c 'import torch; print("torch", torch.__version__)') + $*"
}

make_env .venv-lightly lightly==1.6.0
make_env .venv-spt stable-pretraining==0.1.8
