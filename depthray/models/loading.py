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
from depthray.models.kinds import kind_of

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
    kind = kind_of(cfg)  # raises for an unknown kind, naming the known ones
    folder = resolve_checkpoint(cfg.path, cfg.cache_dir, cfg.variant if kind.variants else None, storage_options)
    kind = kind_of(cfg, folder)  # a fetched checkpoint may say it is end-to-end
    if kind.name != cfg.kind:
        log.info("%s is an end-to-end fine-tuned checkpoint: running it single-step, zero noise "
                 "(model.kind %s)", cfg.path, kind.name)
    return kind.load(folder, cfg)
