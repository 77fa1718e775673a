"""Our SimCLR / BYOL / MoCo v2 training step against lightly's and stable-pretraining's (issue 13, item 7).

Every side trains the same network (CIFAR ResNet-18 at ``--widths``, channels-last, from ``cifar_resnet18``'s
layout) on the same two random 32x32 views at the same batch size, with its library's heads, loss, optimizer
(LARS for SimCLR and BYOL, SGD for MoCo v2) and EMA / queue update; no augmentation, no Trainer: the step only.
Each side runs in a worker process in its own environment (``benchmarks/peers/step_<side>.py``: ours in this
one, the peers in ``.venv-lightly`` and ``.venv-spt`` made by ``benchmarks/peers/setup_envs.sh``), one at a time.
For each configuration the sides take turns for ``--rounds`` rounds (the first side rotating), so load drifts
hit all alike; the table gives each side's median images per second (one image = two views) and our ratios.

Goal (issue 13): never slower than a peer on the CPU (ratio >= 1), at least 1.5x both on the GPU.
Usage: ``python benchmarks/peers.py [--device cuda] [--precision {32,tf32,bf16-mixed}] [--rounds 3] [--steps 10]``;
on CUDA every side runs with cuDNN's autotuner on.
Run it alone: two PyTorch processes on two cores slow each other down several times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "benchmarks" / "peers"
PREFIX = "RESULT "  # benchmarks/peers/common.py's answer line
SIDES = {"ours": ROOT / ".venv", "lightly": ROOT / ".venv-lightly", "stable-pretraining": ROOT / ".venv-spt"}
SCRIPTS = {"ours": "step_ours.py", "lightly": "step_lightly.py", "stable-pretraining": "step_spt.py"}
BATCH = {16: 256, 64: 128}  # the CPU's default batch per width; --batch sets one for all
GOAL = {"cpu": 1.0, "cuda": 1.5}
# our variants and the peers' step each is timed against (the peers' SimCLR calls the backbone once per view)
PEER_METHOD = {"simclr_separate": "simclr"}


class Worker:
    """One side's ``step_<side>.py`` in its own interpreter, answering one timing request at a time."""

    def __init__(self, side: str, python: Path) -> None:
        self.log: IO[str] = tempfile.NamedTemporaryFile("w+", prefix=f"peers-{side}-", suffix=".log", delete=False)
        self.process = subprocess.Popen([str(python), str(WORKERS / SCRIPTS[side])], cwd=WORKERS, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def measure(self, request: dict) -> dict:
        """The worker's answer: ``img_per_s`` and ``threads``, or ``error``."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"error": "worker exited"}
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        return {"error": "worker exited"}

    def close(self, failed: bool) -> None:
        """Stop the worker; its log (stderr) is kept only when a request failed."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()
        if not failed and self.process.returncode == 0:
            os.unlink(self.log.name)


def start_workers(sides: list[str]) -> dict[str, Optional[Worker]]:
    """A worker per side; ``None`` (reported as missing) for a side whose environment is not there."""
    workers: dict[str, Optional[Worker]] = {}
    for side in sides:
        python = Path(sys.executable) if side == "ours" else SIDES[side] / "bin" / "python"
        if python.exists():
            workers[side] = Worker(side, python)
        else:
            print(f"{side}: {SIDES[side].name} missing: run benchmarks/peers/setup_envs.sh first")
            workers[side] = None
    return workers


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")


def describe(cell: Optional[float], error: Optional[str]) -> str:
    return f"{cell:10.1f}" if cell is not None else f"{(error or 'missing')[:10]:>10}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["simclr", "simclr_separate", "byol", "moco_v2"],
                        choices=["simclr", "simclr_separate", "byol", "moco_v2"],
                        help="simclr_separate: our SimCLR with view_batch_norm: separate (one backbone call per view)")
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--batch", type=int, help=f"batch size for every width (default per width: {BATCH})")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32", choices=["32", "tf32", "bf16-mixed"],
                        help="tf32: float32 with TF32 matrix products (GPU); bf16-mixed: bf16 autocast")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    args = parser.parse_args()
    hardware = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    print(f"{hardware}; torch {torch.__version__}; {args.device}, precision {args.precision}; {args.rounds} rounds "
          f"of {args.steps} steps (+{args.warmup} warm-up); load average {os.getloadavg()[0]:.2f}")
    workers = start_workers(args.sides)
    rows, threads, failed = [], set(), set()
    try:
        for method in args.methods:
            for width in args.widths:
                batch = args.batch or BATCH.get(width, 128)
                request = {"method": method, "width": width, "batch": batch, "steps": args.steps,
                           "warmup": args.warmup, "device": args.device, "precision": args.precision}
                speeds: dict[str, list[float]] = {side: [] for side in args.sides}
                errors: dict[str, str] = {}
                for round_index in range(args.rounds):
                    shift = round_index % len(args.sides)
                    for side in args.sides[shift:] + args.sides[:shift]:
                        worker = workers[side]
                        if worker is None or side in errors:
                            continue
                        answer = worker.measure({**request, "method": method if side == "ours"
                                                 else PEER_METHOD.get(method, method)})
                        if "error" in answer:
                            errors[side] = answer["error"]
                            failed.add(side)
                            print(f"{side} {method} width {width}: {answer['error']} (log: {worker.log.name})")
                        else:
                            speeds[side].append(answer["img_per_s"])
                            threads.add(answer["threads"])
                medians = {side: statistics.median(v) if v else None for side, v in speeds.items()}
                rows.append((method, width, batch, medians, errors))
    finally:
        for side, worker in workers.items():
            if worker is not None:
                worker.close(side in failed)
    print_table(rows, args.sides, GOAL[args.device])
    print(f"threads per worker {sorted(threads)}; load average now {os.getloadavg()[0]:.2f}")


def print_table(rows: list, sides: list[str], goal: float) -> None:
    """Images per second (median over rounds) per side, and ours / each peer (``<`` marks a ratio under the goal)."""
    peers = [side for side in sides if side != "ours"]
    print(f"{'method':15} {'width':>5} {'batch':>5} " + " ".join(f"{side[:10]:>10}" for side in sides)
          + "".join(f"  {'ours/' + side[:10]:>15} " for side in peers))
    for method, width, batch, medians, errors in rows:
        cells = " ".join(describe(medians[side], errors.get(side)) for side in sides)
        ratios = ""
        for side in peers:
            ours, theirs = medians.get("ours"), medians[side]
            ratio = ours / theirs if ours and theirs else None
            ratios += f"  {ratio:15.2f}{'<' if ratio < goal else ' '}" if ratio else f"  {'-':>15} "
        print(f"{method:15} {width:5d} {batch:5d} {cells}{ratios}")
    print(f"goal: ours / peer >= {goal} ('<' marks a miss)")


if __name__ == "__main__":
    main()
