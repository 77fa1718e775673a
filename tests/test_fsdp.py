"""FSDP2 (``ssl_lightning.sharding`` through Lightning's ``ModelParallelStrategy``): DINO, iBOT and MAE on 2 CPU processes
(gloo) against one process on the full batch, exact resume from a sharded run's checkpoint, that checkpoint loaded
unsharded and exported to timm with ``strict=True``, activation checkpointing, and ``ssl-lightning fit`` with the
sharded strategy. One subprocess launch (``python -m tests.fsdp_script``) runs every sharded training while this
process trains the one-process references (``tests/fsdp_script.py`` says how the views are fixed).

What the comparisons check, beyond the learning rate scaled by per-device batch x world size: the gradients of
the sharded parameters reduce-scattered across ranks (student), DINO's per-parameter clipping on sharded
gradients (full norms), the EMA teacher updated shard by shard, DINO's center averaged over the ranks, MAE's
encoder and decoder blocks sharded, the per-rank masks; for iBOT also the token API (``embed``/``encode`` with the
root gathered by ``training_step``), the mask token, both heads and both centers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_lightning import sharding
from tests.fsdp_script import SMOKE, WORLD_SIZE, build, fixed_views, train

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"rtol": 1e-4, "atol": 5e-5}  # float32 sums in another order (as tests/test_methods_ddp.py)
MOVED = {"dino": ("backbone.", "head.", "teacher_backbone.", "teacher_head.", "center"),
         "ibot": ("backbone.", "head.", "patch_head.", "mask_token", "teacher_backbone.", "teacher_head.",
                  "teacher_patch_head.", "center", "patch_center"),
         "mae": ("backbone.", "decoder.")}
METHODS = ("dino", "ibot", "mae")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def reference(name: str, steps: int, root_dir: Path) -> dict[str, Any]:
    """``steps`` optimizer steps of ``name`` on one process on the full batches."""
    model = build(name, reference=True)
    losses = train(model, 1, fixed_views(name)[:steps], root_dir / f"{name}_reference_{steps}")
    return {"state": state(model), "losses": losses}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sharded runs (full state dicts gathered from the shards), the references and the initial states."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.fsdp_script", str(out)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:  # the references train while the sharded processes start
            results: dict[str, Any] = {f"{name}_reference": reference(name, 2, out) for name in METHODS}
            results["dino_reference_1"] = reference("dino", 1, out)
            results.update({f"{name}_initial": state(build(name)) for name in METHODS})
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, (out / "log.txt").read_text()[-4000:]
    for name in ("dino", "dino_resumed", "dino_ac", "ibot", "mae", *(f"smoke_{m}" for m in SMOKE)):
        results[name] = torch.load(out / f"{name}.pt", weights_only=True)
    results["out"] = out
    return results


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert actual.keys() == expected.keys()
    close = torch.equal if exact else lambda a, b: torch.allclose(a.double(), b.double(), **TOLERANCE)
    wrong = [key for key in expected if not close(actual[key], expected[key])]
    worst = {key: float((actual[key].double() - expected[key].double()).abs().max()) for key in wrong[:5]}
    assert not wrong, f"{len(wrong)} of {len(expected)} tensors differ, e.g. {worst}"


@pytest.mark.parametrize("name", METHODS)
def test_two_sharded_processes_give_one_process_on_the_full_batch(runs: dict[str, Any], name: str) -> None:
    sharded, expected, initial = runs[name], runs[f"{name}_reference"], runs[f"{name}_initial"]
    for prefix in MOVED[name]:  # the student, the teacher and the center moved: a comparison that can fail
        moved = max(float((expected["state"][k] - initial[k]).abs().max()) for k in initial if k.startswith(prefix))
        assert moved > 100 * TOLERANCE["atol"], f"{prefix}* did not move in 2 steps: nothing to compare"
    assert len(sharded["losses"]) == 2
    assert torch.allclose(torch.tensor(sharded["losses"]), torch.tensor(expected["losses"]), **TOLERANCE)
    assert_states_equal(sharded["state"], expected["state"])


@pytest.mark.parametrize("name", list(SMOKE))
def test_every_other_vit_method_takes_a_sharded_step(runs: dict[str, Any], name: str) -> None:
    """DINOv2, I-JEPA, SimMIM, MSN, AIM and LeJEPA (ViT): sharded by ``configure_model``, one step on 2 processes
    with a finite loss (their losses' cross-rank statistics are checked against one process in their own tests)."""
    result = runs[f"smoke_{name}"]
    assert result["sharded"] is True
    assert len(result["losses"]) == 1 and torch.isfinite(torch.tensor(result["losses"])).all()


def test_activation_checkpointing_gives_the_same_steps(runs: dict[str, Any]) -> None:
    assert runs["dino_ac"]["losses"] == runs["dino"]["losses"]
    assert_states_equal(runs["dino_ac"]["state"], runs["dino"]["state"], exact=True)


def test_sharded_checkpoint_resumes_exactly(runs: dict[str, Any]) -> None:
    """Resumed from the checkpoint of step 1 under the same strategy, step 2 is the uninterrupted run's."""
    assert runs["dino_resumed"]["losses"] == runs["dino"]["losses"][1:]
    assert_states_equal(runs["dino_resumed"]["state"], runs["dino"]["state"], exact=True)


def test_sharded_checkpoint_loads_unsharded_and_exports_to_timm(runs: dict[str, Any], tmp_path: Path) -> None:
    """The sharded run's checkpoint of step 1 holds the unsharded weights of step 1; the sharded CLI run's
    ``last.ckpt`` goes through ``ssl-lightning eval``'s loader and ``export`` (timm, ``strict=True``)."""
    from ssl_lightning.eval.checkpoint import load_method
    from ssl_lightning.eval.export import export_checkpoint, load_exported_model
    from ssl_lightning.methods.dino import DINO

    step_1 = DINO.load_from_checkpoint(runs["out"] / "dino_ckpt" / "epoch=0.ckpt", map_location="cpu", weights_only=True)
    assert_states_equal(state(step_1), runs["dino_reference_1"]["state"])
    checkpoint = cli_checkpoint(runs)
    method = load_method(checkpoint)  # weights_only=True
    assert not sharding.is_sharded(method)
    exported = load_exported_model(export_checkpoint(checkpoint, tmp_path / "export"))  # strict=True
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), method(images), rtol=1e-5, atol=1e-5)


def test_a_distributed_checkpoint_folder_is_refused_by_safe_loading_and_converts(runs: dict[str, Any], tmp_path: Path) -> None:
    from ssl_lightning.eval.checkpoint import consolidate_checkpoint, load_checkpoint_safely
    from ssl_lightning.methods.dino import DINO

    folder = runs["out"] / "dino_folder"
    with pytest.raises(ValueError, match="is a distributed checkpoint folder") as error:
        load_checkpoint_safely(folder)
    assert "\n" not in str(error.value)
    converted = consolidate_checkpoint(folder, tmp_path / "converted.ckpt")
    method = DINO.load_from_checkpoint(converted, map_location="cpu", weights_only=True)
    assert_states_equal(state(method), runs["dino"]["state"], exact=True)


def cli_checkpoint(runs: dict[str, Any]) -> Path:
    last = sorted((runs["out"] / "cli").rglob("last.ckpt"))
    assert len(last) == 1 and last[0].is_file(), f"no single last.ckpt file: {last}"
    return last[0]


def test_fit_through_the_cli_with_the_sharded_strategy(runs: dict[str, Any]) -> None:
    from ssl_lightning.eval.checkpoint import load_checkpoint_safely

    checkpoint = load_checkpoint_safely(cli_checkpoint(runs))
    assert checkpoint["global_step"] == 2
    # the kNN monitor's evaluations finished although rank 0 had 2 query batches and rank 1 one (a forward of a
    # sharded model all-gathers: without the extra forward the ranks' collectives mismatch)
    assert "knn_top1 before=" in (runs["out"] / "log.txt").read_text()
    assert any(key.startswith("teacher_backbone.") for key in checkpoint["state_dict"])


def test_the_plan_shards_every_block_of_student_teacher_and_decoder() -> None:
    assert len(sharding.transformer_blocks(build("dino"))) == 4  # 2 student blocks, 2 teacher blocks
    assert len(sharding.transformer_blocks(build("mae"))) == 3  # 2 encoder blocks, 1 decoder block
    assert len(sharding.transformer_blocks(build("ibot"))) == 4  # 2 student blocks, 2 teacher blocks
    with pytest.raises(ValueError, match="activation_checkpointing=True needs a ViT backbone"):
        from ssl_lightning.methods.dino import DINO

        DINO(backbone="cifar_resnet18", backbone_kwargs={"base_width": 4}, activation_checkpointing=True)


class _Mesh:
    """What ``data_parallel_mesh`` reads of a ``DeviceMesh`` (a real one needs a process group)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes, self.ndim, self.mesh_dim_names = sizes, len(sizes), tuple(sizes)

    def __getitem__(self, name: str) -> "_Mesh":
        return _Mesh({name: self.sizes[name]})

    def size(self) -> int:
        return int(torch.tensor(list(self.sizes.values())).prod())


def test_ranks_left_to_tensor_parallelism_fail_with_one_line() -> None:
    """Lightning's default ``ModelParallelStrategy()`` puts every GPU of a node in the tensor-parallel dimension."""
    mesh = _Mesh({"data_parallel": 2, "tensor_parallel": 1})
    assert sharding.data_parallel_mesh(mesh).sizes == {"data_parallel": 2}
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8, .* data_parallel_size to the number of processes \(8\)"):
        sharding.data_parallel_mesh(_Mesh({"data_parallel": 1, "tensor_parallel": 8}))


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_activation_checkpointing_recomputes_each_block_in_the_backward(activation_checkpointing: bool) -> None:
    """With it on, a block's layers run again during the backward (the recomputation), names unchanged."""
    model = build("mae", activation_checkpointing=activation_checkpointing)
    keys = list(model.state_dict())
    model.configure_model()  # no device mesh: checkpointing only
    assert not sharding.is_sharded(model) and list(model.state_dict()) == keys
    calls, layer = [], model.backbone.blocks[0].mlp.fc1  # the recomputation runs no forward hooks: wrap forward
    forward = layer.forward
    layer.forward = lambda x: (calls.append(1), forward(x))[1]
    images = torch.randn(2, 3, 16, 16)
    loss = model.masked_loss(images, torch.Generator().manual_seed(0))[0]
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == (2 if activation_checkpointing else 1)
