"""Read checkpoints written by ``ssl-lightning fit``: one clear line for anything else, and the method inside.

``load_checkpoint_safely`` only needs torch (the fit CLI checks ``--ckpt_path`` with it too). Its errors
name the file and what is wrong and never advise turning safe loading off: torch's own message for a
refused class suggests ``weights_only=False``, which runs arbitrary code from an untrusted file.
"""

from __future__ import annotations

import importlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from ssl_lightning.methods import SSLMethod

_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
DISTRIBUTED_METADATA = "meta.pt"  # Lightning's file of everything but the shards in a distributed checkpoint folder


def _foreign(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is not a Lightning checkpoint: {what}")


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def load_checkpoint_safely(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The dictionary of a Lightning checkpoint, read with ``torch.load(weights_only=True)`` (tensors memory-mapped,
    on the CPU). ``weights_only=False`` (arbitrary pickles) is for files you trust, given explicitly.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming ``path`` for a file that is not a
    ``torch.save`` archive, holds a class safe loading does not allow, or is not a dict with a ``state_dict``.
    """
    path = Path(path)
    if path.is_dir() and (path / DISTRIBUTED_METADATA).is_file():
        raise ValueError(
            f"{path} is a distributed checkpoint folder (ModelParallelStrategy(save_distributed_checkpoint=True)), whose "
            "index torch reads with plain pickle; train with save_distributed_checkpoint: false for a single-file "
            "checkpoint, or convert a folder you trust with ssl_lightning.eval.checkpoint.consolidate_checkpoint"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            start = handle.read(16)
        raise _foreign(path, f"not a torch.save archive (it begins with {start!r})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused:
            raise ValueError(f"{path} holds class {refused.group(1)} that safe loading does not allow "
                             "(a Lightning checkpoint of ssl-lightning holds only tensors and plain values)") from None
        raise _foreign(path, "its pickled contents cannot be read safely") from None
    except Exception as err:  # a damaged or foreign zip archive: torch raises RuntimeError, KeyError, EOFError...
        detail = _first_line(err)
        detail = detail if "weights_only" not in detail else type(err).__name__
        raise _foreign(path, f"a damaged or foreign archive ({detail})") from None
    if not isinstance(checkpoint, dict):
        raise _foreign(path, f"it holds a {type(checkpoint).__name__}, not a dict with a 'state_dict'")
    if not isinstance(checkpoint.get("state_dict"), dict):
        keys = ", ".join(map(repr, list(checkpoint)[:6])) or "none"
        raise _foreign(path, f"a dict without a 'state_dict' (keys: {keys})")
    return checkpoint


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """A single-file checkpoint (weights unsharded, no optimizer states: for ``eval`` and ``export``, not for resuming)
    from a distributed checkpoint folder of ``ModelParallelStrategy(save_distributed_checkpoint=True)``. Only for
    folders you trust: torch's ``dcp_to_torch_save`` reads the folder's ``.metadata`` with plain pickle."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder, output = Path(folder), Path(output)
    if not (folder / DISTRIBUTED_METADATA).is_file():
        raise ValueError(f"{folder} is not a distributed checkpoint folder (no {DISTRIBUTED_METADATA})")
    checkpoint = torch.load(folder / DISTRIBUTED_METADATA, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "shards.pt")
        checkpoint["state_dict"] = torch.load(Path(tmp) / "shards.pt", map_location="cpu", weights_only=True)["state_dict"]
    checkpoint.pop("optimizer_states", None)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    return output


def _method_class(checkpoint: dict[str, Any], path: str | Path) -> type[SSLMethod]:
    """The image method class named by a checkpoint's ``hyper_parameters['_class_path']`` (LightningCLI's)."""
    hparams = checkpoint.get("hyper_parameters", {})
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if not isinstance(class_path, str):
        raise ValueError(
            f"{path} has no hyper_parameters['_class_path']: it was not written by `ssl-lightning fit` "
            "(LightningCLI stores the method's class there), so its method is unknown"
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: cannot import the method class {class_path!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise ValueError(
            f"{path} holds a {class_path}, not an image method (SSLMethod): evaluation extracts image features, "
            "so text models such as MaskedLanguageModel are not supported"
        )
    return cls


def load_method(path: str | Path, weights_only: bool = True) -> SSLMethod:
    """The image method (any ``SSLMethod``) saved in a checkpoint of ``ssl-lightning fit``, on the CPU, in
    eval mode. ``weights_only=False`` allows arbitrary pickled objects: only for files you trust."""
    cls = _method_class(load_checkpoint_safely(path, weights_only), path)
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only).eval()
    except (RuntimeError, TypeError, KeyError) as err:  # weights or hyper-parameters of another architecture
        raise ValueError(f"{path}: its weights or hyper-parameters do not fit {cls.__name__} ({_first_line(err)})") from None


def untrained_method(path: str | Path, seed: int, weights_only: bool = True) -> SSLMethod:
    """The checkpoint's method class built from its saved hyper-parameters, as Lightning's ``load_from_checkpoint``
    builds it, with the untrained weights that ``torch.manual_seed(seed)`` draws; on the CPU, in eval mode.

    The baseline of a random network of the same architecture (e.g. a table's "random init" row)."""
    checkpoint = load_checkpoint_safely(path, weights_only)
    cls = _method_class(checkpoint, path)
    hparams = dict(checkpoint["hyper_parameters"])
    instantiator = hparams.pop("_instantiator", None)
    torch.manual_seed(seed)
    try:
        if instantiator == "lightning.pytorch.cli.instantiate_module":  # what LightningCLI's checkpoints name
            from lightning.pytorch.cli import instantiate_module

            method = instantiate_module(cls, hparams)
        else:
            method = cls(**{k: v for k, v in hparams.items() if k != "_class_path"})
    except Exception as err:  # jsonargparse and the constructors raise many kinds
        raise ValueError(f"{path}: cannot build {cls.__name__} from its hyper-parameters ({_first_line(err)})") from None
    return method.eval()


def training_normalization(checkpoint: dict[str, Any]) -> Optional[dict[str, list[float]]]:
    """``{"mean", "std"}`` of the images the checkpoint was trained on (``SSLDataModule`` saves them in its
    ``datamodule_hyper_parameters``), or None for a checkpoint that does not record them."""
    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(hparams, dict) or not all(isinstance(hparams.get(k), (list, tuple)) for k in ("mean", "std")):
        return None
    return {"mean": [float(v) for v in hparams["mean"]], "std": [float(v) for v in hparams["std"]]}
