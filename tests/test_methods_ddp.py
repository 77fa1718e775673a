"""SimCLR, MoCo v2 (shuffle-BN) and DINO (multi-crop): 2 optimizer steps of Lightning DDP on 2 CPU processes
give the weights, target networks and buffers (BatchNorm statistics, MoCo's queue and pointer, DINO's center)
of one process trained on the full batch with the same views, to float tolerance.

One subprocess (``python -m tests.ddp_methods``) trains the three methods under DDP while this process trains
the one-process references (``tests/ddp_methods.py`` says how the views are fixed and why the references of the
BatchNorm networks simulate each rank's BatchNorm groups). What each comparison checks, beyond the optimizer and
the learning rate scaled by per-device batch x world size:
- SimCLR: NT-Xent's negatives gathered from both ranks *with* gradient (``gather_with_grad``).
- MoCo v2: the keys of both ranks in the queue, in rank order; shuffle-BN's keys each back with its own sample
  and normalized with the rows the shared permutation gives its rank; the EMA key encoder.
- DINO: the teacher's center averaged over both ranks; the per-parameter clipping of the averaged gradient;
  the EMA teacher; local and global crops.
Rank 1's state is compared too, except its BatchNorm running statistics (its own by design: DDP broadcasts
rank 0's at the next forward)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_methods import METHODS, STEPS, GLOBAL_BATCH, WORLD_SIZE, build, state, train_one_process

ROOT = Path(__file__).resolve().parents[1]
# what must have moved away from its initial value after 2 steps (a comparison of things that never moved
# would pass whatever the gradients were)
MOVED = {
    "simclr": ("backbone.", "projector."),
    "moco_v2": ("backbone.", "projector.", "key_backbone.", "key_projector.", "queue"),
    "dino": ("backbone.", "head.", "teacher_backbone.", "teacher_head.", "center"),
}
TOLERANCE = {"rtol": 1e-4, "atol": 5e-5}  # measured: at most 1.5e-5 apart (float32 sums in another order)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """For each method: the DDP ranks' states, the one-process reference and the initial state."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.ddp_methods", str(out)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:  # the references train while the DDP processes start
            results = {name: {"reference": train_one_process(name), "initial": state(build(name))} for name in METHODS}
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (out / "log.txt").read_text()[-4000:]
    for name in METHODS:
        for rank in range(WORLD_SIZE):
            results[name][f"rank{rank}"] = torch.load(out / f"{name}_rank{rank}.pt", weights_only=True)
    return results


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], keys: list[str]) -> None:
    wrong = [key for key in keys if not torch.allclose(actual[key].double(), expected[key].double(), **TOLERANCE)]
    worst = {key: float((actual[key].double() - expected[key].double()).abs().max()) for key in wrong[:5]}
    assert not wrong, f"{len(wrong)} of {len(keys)} tensors differ from one process, e.g. {worst}"


@pytest.mark.parametrize("name", METHODS)
def test_two_ddp_processes_give_the_state_of_one_process_on_the_full_batch(
    runs: dict[str, dict[str, dict[str, torch.Tensor]]], name: str
) -> None:
    run = runs[name]
    reference, initial = run["reference"], run["initial"]
    assert run["rank0"].keys() == reference.keys()
    for prefix in MOVED[name]:
        keys = [key for key in reference if key.startswith(prefix)]
        moved = max(float((reference[key].double() - initial[key].double()).abs().max()) for key in keys)
        assert moved > 100 * TOLERANCE["atol"], f"{prefix}* did not move in 2 steps: nothing to compare"

    assert_states_equal(run["rank0"], reference, list(reference))
    shared = [key for key in reference if not key.endswith(("running_mean", "running_var"))]
    assert_states_equal(run["rank1"], reference, shared)
    if name == "moco_v2":
        assert int(reference["queue_ptr"]) == STEPS * GLOBAL_BATCH  # the keys of both ranks went in
