"""``ssl-lightning --help``: the commands, methods and datamodules, answered without importing torch."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def exported_names(package: str) -> list[str]:
    """``__all__`` of ``ssl_lightning/<package>/__init__.py``, read from its source (no import)."""
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return [name for name in ast.literal_eval(node.value) if not name.startswith("SSL")]
    return []


def usage() -> str:
    methods = ", ".join(exported_names("methods"))
    data = ", ".join(exported_names("datamodules"))
    return f"""usage: ssl-lightning COMMAND [options]

Self-supervised learning methods as PyTorch Lightning modules.

commands:
  fit        pretrain a method: ssl-lightning fit --config configs/simclr_bundled.yaml
  validate   run the validation loop of a checkpoint (--ckpt_path)
  test       run the test loop of a checkpoint (--ckpt_path)
  predict    extract the features of a checkpoint (--ckpt_path)
  eval       evaluate a checkpoint: kNN, linear probe, fine-tuning, plots (ssl-lightning eval --help)
  export     write a checkpoint's backbone as a plain torchvision/timm state dict (ssl-lightning export --help)
  prepare    write an image folder as LitData chunks for StreamingImages (ssl-lightning prepare --help)

methods (--model, or model.class_path in a config):
  {methods}
datamodules (--data):
  {data}

Each run writes everything (config, checkpoints, CSV/TensorBoard/W&B logs) under runs/<config>/<run>;
`fit ... --ckpt_path last` resumes the newest run of that config. Errors are one line; set
SSL_LIGHTNING_DEBUG=1 (or pass --debug) for the full traceback. `ssl-lightning fit --help` lists every option.
"""
