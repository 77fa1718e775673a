"""What ``fit --ckpt_path`` may resume: the checkpoint's method, backbone and settings against the config.

Lightning's CLI silently re-applies a checkpoint's hyper-parameters over the command line (so a BYOL
checkpoint under a SimCLR config trains BYOL, and ``--model.init_args.*`` given with ``--ckpt_path`` is
dropped). Here a resume is refused with one line naming what differs; settings outside the method (training
length, loggers, callbacks) are the command line's and apply.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from jsonargparse import Namespace


class ResumeError(ValueError):
    """The checkpoint cannot be resumed under this configuration."""


def canonical(value: Any) -> Any:
    """A plain, comparable form of a config or hyper-parameter value (Namespaces and dataclasses as dicts,
    tuples as lists, integral floats kept as floats)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def init_defaults(class_path: str) -> dict[str, Any]:
    """The default of every ``__init__`` argument of the class at ``class_path`` and its bases ({} if it cannot
    be imported): a setting added after a checkpoint was written is absent from it and resumes at its default."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            for arg, parameter in inspect.signature(init).parameters.items():
                if parameter.default is not inspect.Parameter.empty:
                    defaults[arg] = canonical(parameter.default)
    return defaults


def short_class(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def differences(saved: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: checkpoint X, given Y`` for every leaf that differs (keys missing on one side included)."""
    lines = []
    for key in sorted(set(saved) | set(given)):
        old, new = saved.get(key, "<absent>"), given.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += differences(old, new, f"{prefix}{key}.")
        elif old != new and new is not None:  # None: unset in the config (e.g. MLM's vocab_size, set from the data)
            lines.append(f"{prefix}{key}: checkpoint {old!r}, given {new!r}")
    return lines


def check_resume(ckpt_path: str, checkpoint: dict[str, Any], model: Namespace, datamodule_class: str | None) -> None:
    """Raise ``ResumeError`` unless ``checkpoint`` was written by the method, backbone and settings of ``model``
    (the config's ``model`` section: ``class_path`` and ``init_args``) and the datamodule class named."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "_class_path" not in hparams:
        raise ResumeError(f"{ckpt_path} was not written by `ssl-lightning fit` (no method class in its hyper-parameters)")
    saved_class, given_class = short_class(hparams["_class_path"]), short_class(model.get("class_path"))
    if saved_class != given_class:
        raise ResumeError(f"{ckpt_path} is a {saved_class} checkpoint; the config trains {given_class}")
    init_args = model.get("init_args") or Namespace()
    saved, given = canonical(hparams), canonical(init_args)
    for key in ("backbone", "backbone_kwargs"):
        if key in saved and saved.get(key) != given.get(key):
            raise ResumeError(
                f"{ckpt_path} has backbone {hparams.get('backbone')!r} {hparams.get('backbone_kwargs') or {}}; the config "
                f"has {init_args.get('backbone')!r} {init_args.get('backbone_kwargs') or {}}"
            )
    defaults = init_defaults(str(hparams["_class_path"]))
    given = {k: v for k, v in given.items() if k in saved or k not in defaults or v != defaults[k]}
    changed = differences(saved, given)
    if changed:
        raise ResumeError(
            f"resuming {ckpt_path} cannot change the method's settings; these differ from the checkpoint: "
            + "; ".join(changed)
            + " (start a new run to change them)"
        )
    if datamodule_class is not None:
        states = [key for key in checkpoint if key[:1].isupper() and isinstance(checkpoint[key], dict)]
        if states and datamodule_class not in states:
            raise ResumeError(f"{ckpt_path} was trained on {states[0]}; the config names {datamodule_class}")
