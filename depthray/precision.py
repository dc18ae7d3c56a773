"""What `model.device: auto` runs on: the loaders and config.Config.settings read it, so
manifests and the config hash describe the run that happened. (What `dtype: auto` runs as
is a fact of the model kind: depthray/models/kinds.py.) No torch at import: the config
imports it.
"""

from __future__ import annotations


def device_type(device: str, where: str | None = None) -> str:
    """"cpu" | "cuda": `device` (auto | cpu | cuda | cuda:N) on a node of kind `where`
    (None: the kind `device` names, else "cpu")."""
    return device.split(":")[0] if device != "auto" else (where or "cpu")


def resolve_device(device: str = "auto"):
    """The torch device `device` loads on here (auto: CUDA when there is one)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
