"""Fully sharded data parallelism for the ViT methods (FSDP2, ``torch.distributed.fsdp.fully_shard``; Zhao et al.
2023, "PyTorch FSDP"), applied in ``SSLMethod.configure_model`` under Lightning's ``ModelParallelStrategy``.

The plan, one place for every method:

- every transformer block (an item of a ``blocks`` ``nn.ModuleList``/``nn.Sequential``: timm's ViTs, MAE's
  encoder and decoder, any predictor built the same way) of every submodule, student and EMA teacher alike, is
  one FSDP unit: its parameters are gathered for its own forward and backward only;
- the method itself is the root unit, holding the rest (patch embeddings, tokens, norms, heads); its entry
  points (``training_step``, ``forward``, ... see ``entry_points``) gather it, the backward frees it.

Every parameter is then a ``DTensor`` sharded on dim 0 across the data-parallel ranks, the same split for a
student parameter and its teacher copy, so the EMA (``callbacks.momentum``) lerps the local shards. Buffers
(DINO's center, fixed positions) are not sharded: they are replicated and kept equal by the methods' all-reduces.

Activation checkpointing (Chen et al. 2016) recomputes each block's activations in the backward
(``torch.distributed._composable.checkpoint``: no wrapper, parameter names unchanged), with or without sharding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import nn

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

# what runs the networks from outside: Lightning's step hooks, forward (kNN monitor, eval) and MAE's reconstruct
# (its image logger); each gathers the root unit (a nested call, e.g. forward inside training_step, is harmless)
ENTRY_POINTS = ("forward", "training_step", "validation_step", "test_step", "predict_step", "reconstruct")


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks inside ``module``: the items of every ``nn.ModuleList`` / ``nn.Sequential`` named
    ``blocks`` (timm's ``VisionTransformer.blocks``, ``MaskedViTEncoder.blocks``, ``MAEDecoder.blocks``), in order."""
    blocks: list[nn.Module] = []
    for name, child in module.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(child, (nn.ModuleList, nn.Sequential)):
            blocks += [block for block in child if not any(block is b for b in blocks)]
    return blocks


def entry_points(module: nn.Module) -> list[str]:
    """The methods of ``module`` that run its networks from outside another one: ``ENTRY_POINTS`` and the names
    in its ``sharded_entry_points`` attribute (a method whose callback calls another of its methods). Helpers
    called only from inside them (DINO's ``teacher``) need no entry: the root is already gathered. A callback
    must not call a submodule directly (``pl_module.backbone(x)``): its root-level weights would be shards."""
    extra = tuple(getattr(module, "sharded_entry_points", ()))
    return [name for name in dict.fromkeys(ENTRY_POINTS + extra) if callable(getattr(module, name, None))]


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def apply_activation_checkpointing(module: nn.Module) -> int:
    """Checkpoint every transformer block of ``module`` (once: a block already checkpointed is skipped).
    Returns the number of blocks checkpointed."""
    from torch.distributed._composable import checkpoint
    from torch.distributed._composable.contract import _get_registry

    count = 0
    for block in transformer_blocks(module):
        if "checkpoint" not in (_get_registry(block) or {}):
            checkpoint(block)
            count += 1
    return count


def shard(module: nn.Module, mesh: "DeviceMesh", reshard_after_forward: Optional[bool] = None) -> None:
    """``fully_shard`` every transformer block of ``module``, then ``module`` itself as the root, whose entry
    points (``entry_points``) gather it. ``mesh``: a 1-D data-parallel mesh (``ModelParallelStrategy``'s
    ``device_mesh["data_parallel"]``). A module already sharded is left as it is (Lightning calls
    ``configure_model`` again for ``validate``/``test`` after ``fit``)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if is_sharded(module):
        return
    if mesh.ndim != 1:
        raise ValueError(f"shard: expected a 1-D data-parallel mesh, got {mesh.ndim} dimensions {mesh.mesh_dim_names}")
    kwargs = {} if reshard_after_forward is None else {"reshard_after_forward": reshard_after_forward}
    for block in transformer_blocks(module):
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(module, mesh=mesh)
    for name in entry_points(module):
        if name != "forward":
            register_fsdp_forward_method(module, name)


def data_parallel_mesh(mesh: "DeviceMesh") -> "DeviceMesh":
    """The 1-D data-parallel mesh of ``ModelParallelStrategy``'s ``(data_parallel, tensor_parallel)`` mesh; a clear
    error when ranks are left to tensor parallelism (Lightning's default ``tensor_parallel_size="auto"``)."""
    if mesh.ndim == 1:
        return mesh
    names = tuple(mesh.mesh_dim_names or ())
    if names != ("data_parallel", "tensor_parallel"):
        raise ValueError(f"expected ModelParallelStrategy's (data_parallel, tensor_parallel) device mesh, got {names}")
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"ModelParallelStrategy: tensor_parallel_size={mesh['tensor_parallel'].size()}, but the methods shard "
            f"with FSDP only; set data_parallel_size to the number of processes ({mesh.size()}) and tensor_parallel_size: 1"
        )
    return mesh["data_parallel"]


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit in ``module`` (a forward without backward, e.g. validation,
    leaves the root gathered); ``module.parameters()`` are then the persistent local shards. No-op unsharded."""
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def sharding_of(tensor: "torch.Tensor") -> tuple:
    """How ``tensor`` is split: ``(mesh, placements, local shape)`` of a ``DTensor``, ``()`` for a plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return (tensor.device_mesh, tuple(tensor.placements), tuple(tensor.to_local().shape))
    return ()


def local_shards(tensors: list["torch.Tensor"]) -> list["torch.Tensor"]:
    """Each tensor's local shard (itself when it is not a ``DTensor``): a view, so in-place updates reach the
    tensor. A rank's shard may be empty (a parameter with fewer rows than ranks, e.g. a class token)."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
