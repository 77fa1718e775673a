"""Load the method of a checkpoint written by ``ssl-lightning fit``, whatever the method."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch

from ssl_lightning.methods import SSLMethod


def method_class_path(path: str | Path, weights_only: bool = True) -> str:
    """The ``_class_path`` LightningCLI stores in a checkpoint's hyper-parameters (e.g.
    ``ssl_lightning.methods.SimCLR``). Raises FileNotFoundError / ValueError naming ``path``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    path = Path(path)
    try:  # mmap: the weights are not read here, only the pickled dictionary around them
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except pickle.UnpicklingError as err:
        if weights_only and "Weights only load failed" in str(err):
            raise ValueError(
                f"{path} holds objects that weights_only loading refuses; if you trust the file, load it with "
                f"--unsafe_load (weights_only=False). Details: {str(err).splitlines()[0]}"
            ) from err
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if not isinstance(class_path, str):
        raise ValueError(
            f"{path} has no hyper_parameters['_class_path']: it was not written by `ssl-lightning fit` "
            "(LightningCLI stores the method's class there), so its method is unknown"
        )
    return class_path


def load_method(path: str | Path, weights_only: bool = True) -> SSLMethod:
    """The image method (any ``SSLMethod``) saved in a checkpoint of ``ssl-lightning fit``, on the CPU, in
    eval mode. ``weights_only=False`` allows arbitrary pickled objects: only for files you trust."""
    class_path = method_class_path(path, weights_only)
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: cannot import the method class {class_path!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise ValueError(
            f"{path} holds a {class_path}, not an image method (SSLMethod): evaluation extracts image features, "
            "so text models such as MaskedLanguageModel are not supported"
        )
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only).eval()
