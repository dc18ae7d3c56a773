"""`load_model(spec)`: the YAML `model:` section in, a depth model out.

Where checkpoints come from (local folder, hub id, fsspec URL) is depthray.models.checkpoints;
this module picks the engine or plug-in factory and builds it.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping

from depthray.config import ModelConfig, model_config
from depthray.models.base import DepthModel
from depthray.models.checkpoints import resolve_checkpoint

log = logging.getLogger(__name__)


def _import_factory(ref: str):
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"model.factory {ref!r}: cannot import {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"model.factory {ref!r}: {module_name!r} has no attribute {attr!r}") from None


def load_model(spec: ModelConfig | Mapping[str, Any],
               storage_options: Mapping[str, Any] | None = None) -> DepthModel:
    """Build the depth model described by the YAML `model:` section (dict or ModelConfig).

    ``{"kind": "marigold", "path": ...}`` loads a Marigold checkpoint (local folder, hub id,
    or fsspec URL); ``kind: marigold-e2e`` one of the end-to-end fine-tuned single-step
    checkpoints (zero noise, one UNet call at t=999; recognised by name too);
    ``kind: transformers`` any ``AutoModelForDepthEstimation`` checkpoint; ``{"factory": "pkg.mod:fn", "options": {...}}`` calls any importable
    callable that returns an object with the model interface.
    """
    cfg: ModelConfig = model_config(spec)
    if cfg.factory:
        model = _import_factory(cfg.factory)(**cfg.options)
        if not callable(model) or not hasattr(model, "processing_resolution"):
            raise TypeError(
                f"model.factory {cfg.factory!r} returned {type(model).__name__}, which lacks the "
                "model interface (processing_resolution and __call__(views, seeds))"
            )
        return model
    if cfg.kind == "transformers":
        from depthray.models.hf_depth import TransformersDepthModel

        folder = resolve_checkpoint(cfg.path, cfg.cache_dir, None, storage_options)
        return TransformersDepthModel.from_pretrained(
            folder, dtype=cfg.dtype, device=cfg.device, processing_resolution=cfg.processing_resolution,
            output_space=cfg.options.get("output_space"), name=cfg.path)
    if cfg.kind in ("marigold", "marigold-e2e"):
        from depthray.models.marigold import MarigoldDepthModel
        from depthray.models.marigold_e2e import MarigoldE2EModel, is_end_to_end

        folder = resolve_checkpoint(cfg.path, cfg.cache_dir, cfg.variant, storage_options)
        engine = MarigoldDepthModel
        if cfg.kind == "marigold-e2e" or is_end_to_end(cfg.path, folder):
            if cfg.kind == "marigold":
                log.info("%s is an end-to-end fine-tuned checkpoint: running it single-step, "
                         "zero noise (model.kind marigold-e2e)", cfg.path)
            engine = MarigoldE2EModel
        return engine.from_pretrained(
            folder,
            dtype=cfg.dtype,
            variant=cfg.variant,
            device=cfg.device,
            processing_resolution=cfg.processing_resolution,
            vae_decoder=cfg.vae_decoder,
            compile=cfg.compile,
            name=cfg.path,
        )
    raise ValueError(f"model.kind {cfg.kind!r} is unknown: use 'marigold', 'marigold-e2e', "
                     "'transformers', or set model.factory")
