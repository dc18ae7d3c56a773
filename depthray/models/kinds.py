"""Everything depthray knows about a model kind, in one place.

The config (the `model.kind` choices, what `dtype: auto` records), the pre-run checks (how
a local checkpoint is recognised, which step counts it can run), `depthray plan` (processing
resolution and steps without loading) and the loader (which engine builds it) all ask the
`ModelKind` here; nothing re-derives a kind's facts. Adding a kind is its engine module, a
`ModelKind` value and its line in `KINDS`.

No torch at import: the config imports this module.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# A `model:` section (depthray.config.ModelConfig). Not imported: the config imports this
# module, and a kind needs only its fields.
ModelConfig = Any

# A Hugging Face hub id: `org/name` (any kind's checkpoint may be one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


TORCH_DTYPES = ("float32", "float16", "bfloat16")  # what model.dtype and metric.reference_dtype may name


@dataclass(frozen=True)
class ModelKind:
    name: str
    engine: str  # "module:Class" whose from_pretrained(folder, ...) builds it (imported when loading)
    # What `dtype: auto` runs as on CUDA (float32 on the CPU for every kind): the engines load
    # with it and Config.settings records it, so manifests and the config hash describe the run.
    auto_cuda_dtype: str
    marker: str  # the file a local checkpoint folder of this kind holds (its layout's index)
    layout: str  # the layout's name, for messages
    variants: bool  # whether `model.variant` (fp16 weight files) applies when fetching
    # Denoising steps: "any" (the checkpoint registers a default, a run may ask for others),
    # "one" (defined for exactly one step), "none" (one forward pass, no steps argument).
    steps: str
    # (processing resolution, steps, source) for `depthray plan`, without loading the model.
    plan_settings: Callable[["ModelKind", ModelConfig, int | None, int | None], tuple[int, int, str]]

    def dtype(self, dtype: str, device_type: str) -> str:
        """The dtype name this kind runs in for `dtype` on a device of `device_type`."""
        if dtype != "auto":
            return dtype
        return self.auto_cuda_dtype if device_type == "cuda" else "float32"

    def torch_dtype(self, dtype: str, device_type: str):
        """The torch dtype this kind loads its weights in (`dtype` as `self.dtype` reads it)."""
        import torch

        name = self.dtype(dtype, device_type)
        if name not in TORCH_DTYPES:
            raise ValueError(f"dtype {name!r}: one of {', '.join(TORCH_DTYPES)} (or auto)")
        return getattr(torch, name)

    def step_problem(self, steps: int | None, path: str) -> str | None:
        """Why `inference.num_inference_steps: steps` cannot run on this kind (None: it can)."""
        if steps is None:
            return None
        if self.steps == "none":
            return (f"inference.num_inference_steps: {steps}, but a {self.name} model runs one forward "
                    "pass and has no denoising steps; leave it null")
        if self.steps == "one" and steps != 1:
            return (f"inference.num_inference_steps: {steps}, but {path!r} is an end-to-end fine-tuned "
                    "checkpoint, defined for exactly one step; use 1 or null")
        return None

    def folder_problem(self, path: str, folder: str) -> str | None:
        """Why the local folder `folder` is not a checkpoint of this kind (None: it is)."""
        if os.path.isfile(os.path.join(folder, self.marker)):
            return None
        return (f"model.path {path!r}: a folder without {self.marker}, not a {self.name} checkpoint "
                "(make one with `depthray make-tiny-model`, or use a hub id)")

    def load(self, folder: str, m: ModelConfig):
        """The engine built from a fetched checkpoint folder and the `model:` section."""
        import importlib

        module, _, attr = self.engine.partition(":")
        return getattr(importlib.import_module(module), attr).from_model_config(folder, m)


def local_folder(path: str) -> str | None:
    """The local folder a `model.path` names, or None (a URL or a hub id)."""
    path = path[len("file://"):] if path.startswith("file://") else path
    if "://" in path:
        return None
    local = os.path.expanduser(path)
    return local if os.path.isdir(local) else None


# --------------------------------------------------------------- plan settings per kind


def _checkpoint_settings(kind: ModelKind, m: ModelConfig, res: int | None, steps: int | None):
    """Marigold layouts: the defaults model_index.json registers (the engine reads the same)."""
    from depthray.models.checkpoints import checkpoint_defaults

    found = checkpoint_defaults(local_folder(m.path))
    if kind.steps == "one":
        steps = 1
    return int(res or found.processing_resolution), int(steps or found.denoising_steps), f"config + {found.source}"


def _processor_settings(kind: ModelKind, m: ModelConfig, res: int | None, steps: int | None):
    """transformers: one forward at the input size its preprocessor_config.json registers."""
    rule = transformers_view_rule(m, res)
    if rule is not None:
        return rule.side, 1, f"config + {Path(local_folder(m.path) or m.path) / 'preprocessor_config.json'}"
    if res is None:
        raise ValueError(f"model.path {m.path!r}: no local preprocessor_config.json; "
                         "set model.processing_resolution for a transformers model's plan")
    return int(res), 1, "config"


def transformers_view_rule(m: ModelConfig, processing_resolution: int | None = None):
    """The view rule (models/hf_sizes.py) of a local transformers checkpoint, read from its
    config.json and preprocessor_config.json as the model reads them at load; None when the
    checkpoint is not a local folder."""
    from types import SimpleNamespace

    from depthray.models.hf_families import family_of
    from depthray.models.hf_sizes import view_rule

    folder = local_folder(m.path)
    if folder is None or not all(os.path.isfile(os.path.join(folder, n)) for n in ("config.json", "preprocessor_config.json")):
        return None
    config = json.loads(Path(folder, "config.json").read_text())
    family_of(SimpleNamespace(**config), m.options.get("output_space"))  # a refused family fails here too
    pre = json.loads(Path(folder, "preprocessor_config.json").read_text())
    return view_rule(config.get("model_type", ""), pre, processing_resolution or m.processing_resolution)


# ------------------------------------------------------------------------------ the kinds

MARIGOLD = ModelKind(
    name="marigold", engine="depthray.models.marigold:MarigoldDepthModel",
    # Marigold is trained in bfloat16 and it halves memory.
    auto_cuda_dtype="bfloat16", marker="model_index.json", layout="diffusers", variants=True, steps="any",
    plan_settings=_checkpoint_settings)
MARIGOLD_E2E = ModelKind(
    name="marigold-e2e", engine="depthray.models.marigold_e2e:MarigoldE2EModel",
    auto_cuda_dtype="bfloat16", marker="model_index.json", layout="diffusers", variants=True, steps="one",
    plan_settings=_checkpoint_settings)
TRANSFORMERS = ModelKind(
    name="transformers", engine="depthray.models.hf_depth:TransformersDepthModel",
    # float16: the half precision transformers' depth models are published and run in.
    auto_cuda_dtype="float16", marker="config.json", layout="transformers", variants=False, steps="none",
    plan_settings=_processor_settings)

KINDS: dict[str, ModelKind] = {k.name: k for k in (MARIGOLD, MARIGOLD_E2E, TRANSFORMERS)}


def kind_of(m: ModelConfig, folder: str | None = None) -> ModelKind:
    """The kind a `model:` section runs as: `model.kind`, except that a `marigold` checkpoint
    that is end-to-end fine-tuned (its published name, or `end_to_end` in its model_index.json;
    `folder`: where it was fetched, else the local path) runs as `marigold-e2e`."""
    try:
        kind = KINDS[m.kind]
    except KeyError:
        raise ValueError(f"model.kind {m.kind!r} is unknown: use one of {', '.join(KINDS)}, "
                         "or set model.factory") from None
    if kind is MARIGOLD and is_end_to_end(m.path, folder or local_folder(m.path)):
        return MARIGOLD_E2E
    return kind


# The published end-to-end checkpoints: GonzaloMG/marigold-e2e-ft-depth, ...-normals, and copies.
_E2E_NAME = re.compile(r"e2e[-_]?ft", re.IGNORECASE)


def is_end_to_end(path: str, folder: str | Path | None = None) -> bool:
    """Whether a checkpoint is an end-to-end fine-tuned one: its name says so (the published
    repositories are named *e2e-ft*), or its model_index.json sets `"end_to_end": true`."""
    if _E2E_NAME.search(str(path)) or (folder is not None and _E2E_NAME.search(Path(folder).name)):
        return True
    index = Path(folder) / "model_index.json" if folder is not None else None
    if index is not None and index.is_file():
        return bool(json.loads(index.read_text()).get("end_to_end", False))
    return False
