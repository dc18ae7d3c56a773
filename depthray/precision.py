"""What `model.dtype: auto` and `model.device: auto` run as, per model kind: the one table the
engines load with and the config records (config.Config.settings, so manifests and the
config hash describe the run that happened). No torch here: the config imports it.
"""

from __future__ import annotations

# model.kind -> dtype `auto` runs on CUDA (float32 on the CPU for every kind).
# Marigold is trained in bfloat16 and it halves memory; the transformers backend runs
# float16, the half precision transformers' depth models are published and run in.
AUTO_CUDA_DTYPE = {"marigold": "bfloat16", "marigold-e2e": "bfloat16", "transformers": "float16"}


def resolve_dtype(kind: str, dtype: str, device_type: str) -> str:
    """The dtype name a model of `kind` runs in for `dtype` on a device of `device_type`."""
    if dtype != "auto":
        return dtype
    if device_type != "cuda":
        return "float32"
    try:
        return AUTO_CUDA_DTYPE[kind]
    except KeyError:
        raise ValueError(f"model.kind {kind!r} has no dtype for `auto` on CUDA") from None


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
