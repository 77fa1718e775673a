"""Compare self-supervised methods under one budget on the bundled CIFAR-10 subset; write one Markdown report.

For each method x seed: ``ssl-lightning fit --config configs/<method>_bundled.yaml`` for ``--epochs`` epochs
(the same number for every method, so every method sees the same number of images) with
``--seed_everything <seed>`` and the evaluation monitors off (``benchmarks/compare_fit.yaml``), timed; then
``ssl-lightning eval`` on its last checkpoint (weighted kNN, linear probe, fine-tuning on a label fraction, and
the t-SNE plot). ``<output>/report.md`` holds one row per method with ``mean ± sample std`` over the seeds and
the t-SNE images side by side (copied under ``<output>/tsne/``, so the folder can be copied as a whole, e.g. to
``docs/compare/``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compare.py --methods simclr byol mae --seeds 0 1 --epochs 16 \
        --output runs/compare

Both commands run in subprocesses with this process's environment (``OMP_NUM_THREADS`` as given). Each run
keeps its logs and checkpoint under ``<output>/<method>/seed<seed>/``. ``--max_steps 3 --linear_epochs 1
--finetune_epochs 1`` smoke-tests the whole pipeline (its numbers mean nothing).

Time it on a quiet machine: with as many threads as cores, other busy processes slow each step many times
over (23 SimCLR steps: 115 s with OMP_NUM_THREADS=2 against 16 s with 1, at load ~4 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ssl_lightning.eval.command import percent
from ssl_lightning.eval.comparison import Column, Run, aggregate, image_row, markdown_table

ROOT = Path(__file__).resolve().parents[1]
FIT_OVERRIDES = ROOT / "benchmarks" / "compare_fit.yaml"
KNN_K = 200


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "byol", "mae"],
                        help="names of configs/<name>_bundled.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=16, help="pretraining epochs, the same for every method")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop pretraining after this many steps (smoke test)")
    parser.add_argument("--linear_epochs", type=int, default=100, help="epochs of the linear probe")
    parser.add_argument("--finetune_epochs", type=int, default=30, help="epochs of fine-tuning")
    parser.add_argument("--finetune_fraction", type=float, default=0.1,
                        help="fraction of the training labels fine-tuned on (balanced per class; 1 for all)")
    parser.add_argument("--output", type=Path, default=Path("runs/compare"))
    parser.add_argument("--configs", type=Path, default=ROOT / "configs", help="folder of the *_bundled.yaml configs")
    return parser.parse_args(argv)


def run_logged(command: list[str], cwd: Path, log: Path) -> float:
    """Run ``command`` in ``cwd`` with its output in ``log``; return its wall time (seconds). On failure,
    raise naming the log and quoting its last lines."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"exit code {code} of {' '.join(command)}\n(see {log}):\n{tail}")
    return seconds


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ssl_lightning.cli", *args]


def fit_command(config: Path, seed: int, args: argparse.Namespace) -> list[str]:
    command = cli("fit", "--config", str(config), "--config", str(FIT_OVERRIDES), "--seed_everything", str(seed),
                  "--trainer.max_epochs", str(args.epochs))
    if args.max_steps is not None:
        command += ["--trainer.max_steps", str(args.max_steps)]
    return command


def newest_checkpoint(run_dir: Path, since: float) -> Path:
    """The ``last*.ckpt`` that the fit in ``run_dir`` wrote after ``since`` (base.yaml's loggers: ``runs/...``)."""
    found = [p for p in run_dir.glob("runs/**/checkpoints/last*.ckpt") if p.stat().st_mtime >= since]
    if not found:
        raise FileNotFoundError(f"no last*.ckpt written under {run_dir}/runs by this fit (base.yaml's ModelCheckpoint)")
    return max(found, key=lambda p: p.stat().st_mtime)


def pretrain(method: str, seed: int, run_dir: Path, args: argparse.Namespace) -> tuple[float, Path]:
    """Fit ``configs/<method>_bundled.yaml`` in ``run_dir``; return the wall time and the last checkpoint."""
    config = (args.configs / f"{method}_bundled.yaml").resolve()
    if not config.is_file():
        raise FileNotFoundError(f"no config {config} for method {method!r}")
    since = time.time()
    seconds = run_logged(fit_command(config, seed, args), run_dir, run_dir / "fit.log")
    return seconds, newest_checkpoint(run_dir, since)


def eval_command(checkpoint: Path, seed: int, out_dir: Path, args: argparse.Namespace) -> list[str]:
    return cli("eval", "--config", str(ROOT / "configs/eval/bundled.yaml"), "--checkpoint", str(checkpoint),
               "--output_dir", str(out_dir), "--cache_dir", str(args.output.resolve() / "cache"),
               "--seed", str(seed), "--protocols", '["knn", "linear", "finetune"]', "--knn.k", f"[{KNN_K}]",
               "--linear.epochs", str(args.linear_epochs), "--label_fractions", f"[{args.finetune_fraction}]",
               "--finetune.epochs", str(args.finetune_epochs), "--plots", "true")


def evaluate(checkpoint: Path, seed: int, run_dir: Path, args: argparse.Namespace) -> dict:
    """``ssl-lightning eval`` of ``checkpoint`` into ``run_dir/eval``; return its ``metrics.json``."""
    out_dir = run_dir / "eval"
    run_logged(eval_command(checkpoint, seed, out_dir, args), run_dir, run_dir / "eval.log")
    return json.loads((out_dir / "metrics.json").read_text())


def copy_tsne(run: Run, run_dir: Path, output: Path) -> Optional[str]:
    """Copy the run's ``plots/tsne.png`` to ``output/tsne/``; its path relative to ``output`` (None if absent)."""
    source = run_dir / "eval" / "plots" / "tsne.png"
    if not source.is_file():
        return None
    target = output / "tsne" / f"{run.method}_seed{run.seed}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target.relative_to(output).as_posix()


def columns(args: argparse.Namespace) -> list[Column]:
    labels = percent(args.finetune_fraction)
    return [Column("Linear top-1 (%)", "linear"), Column(f"kNN top-1 (%), k={KNN_K}", f"knn/k={KNN_K}"),
            Column(f"Fine-tune top-1 (%), {labels} labels", f"{labels}/finetune")]


def epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def machine_line(start_load: float) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
    return (f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{device}; torch {torch.__version__} with {torch.get_num_threads()} thread(s) "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
            f"1-minute load average {start_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")


def setting_lines(runs: list[Run], args: argparse.Namespace, start_load: float) -> list[str]:
    first = runs[0].metrics
    budget = epochs(args.epochs) + (f", stopped at {args.max_steps} steps (SMOKE TEST: the numbers mean nothing)"
                                        if args.max_steps is not None else "")
    return [
        f"**A CPU-sized budget, not the papers' setting.** Each method's `configs/<name>_bundled.yaml` recipe "
        f"(its own network, batch size and optimizer) pretrained for {budget} on the {first['num_train']:,} "
        f"training images of {first['datamodule']} (every method sees the same images the same number of times), "
        f"evaluated on its {first['num_val']:,} validation images.",
        "",
        f"Seeds: {', '.join(map(str, args.seeds))} (`--seed_everything` of the pretraining and `--seed` of the "
        f"evaluation); each cell is the mean ± sample standard deviation (n - 1) over the seeds.",
        "",
        machine_line(start_load),
    ]


def notes(args: argparse.Namespace) -> list[str]:
    return [
        "- Pretraining: wall time of the `ssl-lightning fit` process (m:ss), start-up (imports, data) included; "
        "the fit's evaluation monitors are off (benchmarks/compare_fit.yaml), the evaluation below comes after.",
        f"- Linear: a linear probe on frozen, standardized backbone features, {epochs(args.linear_epochs)}, learning "
        "rate and weight decay swept on a held-out 10% of the training images (configs/eval/bundled.yaml).",
        f"- kNN: weighted kNN (Wu et al. 2018) on cosine similarity, k={KNN_K}, temperature 0.07, the training "
        "images as the bank.",
        f"- Fine-tune: the whole network with a linear head on a balanced {percent(args.finetune_fraction)} of the "
        f"training labels, {epochs(args.finetune_epochs)} of SimCLR's semi-supervised recipe (crop + flip, SGD with "
        "momentum, lr 0.05 x batch / 256; the eval command's `finetune` defaults), the same recipe for every method "
        "(not MAE's AdamW with layer-wise decay).",
    ]


def write_report(runs: list[Run], images: dict[str, str], args: argparse.Namespace, start_load: float) -> Path:
    """``<output>/report.md``: the setting, the table, its notes and the t-SNE images of the first seed."""
    cols = columns(args)
    lines = ["# Method comparison", "", *setting_lines(runs, args, start_load), "",
             markdown_table(aggregate(runs, cols), cols), *notes(args), "",
             f"## t-SNE of the validation features (seed {args.seeds[0]})", "", image_row(images)]
    path = args.output / "report.md"
    path.write_text("\n".join(lines))
    return path


def run_one(method: str, seed: int, args: argparse.Namespace) -> tuple[Run, Path]:
    """Pretrain and evaluate ``method`` with ``seed``; the run and its folder."""
    run_dir = (args.output / method / f"seed{seed}").resolve()
    print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: pretraining in {run_dir}", flush=True)
    seconds, checkpoint = pretrain(method, seed, run_dir, args)
    print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: pretrained in {seconds:.0f} s; evaluating", flush=True)
    metrics = evaluate(checkpoint, seed, run_dir, args)
    return Run(metrics.get("method", method), seed, seconds, metrics), run_dir


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    start_load, runs, images = os.getloadavg()[0], [], {}
    for method in args.methods:
        for seed in args.seeds:
            run, run_dir = run_one(method, seed, args)
            runs.append(run)
            image = copy_tsne(run, run_dir, args.output)
            if image is not None and seed == args.seeds[0]:
                images[f"{run.method} (seed {seed})"] = image
    (args.output / "runs.json").write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    path = write_report(runs, images, args, start_load)
    print(path.read_text(), f"\nwritten to {path}", sep="", flush=True)


if __name__ == "__main__":
    main()
