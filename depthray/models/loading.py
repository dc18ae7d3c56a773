"""`load_model(spec)`: the YAML `model:` section in, a depth model out.

A checkpoint path may be a local folder, a Hugging Face hub id (downloaded once into the
usual hub cache), or any fsspec URL such as ``s3://bucket/models/marigold`` (copied once
per machine into a local cache, atomically, so concurrent workers never see half a copy).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from depthray.config import ModelConfig, model_config
from depthray.models.base import DepthModel

log = logging.getLogger(__name__)

_COMPLETE = ".depthray-complete"


def default_cache_dir() -> Path:
    """$DEPTHRAY_CACHE, else ~/.cache/depthray: remote checkpoints, built tiny models."""
    root = os.environ.get("DEPTHRAY_CACHE") or os.path.join(Path.home(), ".cache", "depthray")
    return Path(root)


def _is_url(path: str) -> bool:
    return "://" in path


def _variant_patterns(variant: str | None) -> tuple[list[str] | None, list[str]]:
    """Hub download filters: only the weight files of the requested variant."""
    others = [v for v in ("fp16", "bf16") if v != variant]
    ignore = [f"*.{v}.safetensors" for v in others] + ["*.bin", "*.ckpt", "*.onnx", "*.msgpack"]
    return None, ignore


def fetch_remote_checkpoint(url: str, cache_dir: str | os.PathLike | None = None,
                            storage_options: Mapping[str, Any] | None = None) -> Path:
    """Copy a checkpoint folder from an fsspec URL into the local cache (once) and return it."""
    import fsspec
    from filelock import FileLock

    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    target = cache / f"{Path(url.rstrip('/')).name}-{digest}"
    if (target / _COMPLETE).exists():
        return target
    # One download per machine even with many workers starting at once.
    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE).exists():
            return target
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"), **dict(storage_options or {}))
        if not fs.exists(root):
            raise FileNotFoundError(f"model.path {url!r}: nothing at that URL")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
        try:
            log.info("copying checkpoint %s to %s", url, target)
            for remote in fs.find(root):
                rel = remote[len(root.rstrip("/")) + 1 :]
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(local))
            (tmp / _COMPLETE).write_text(url + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(path: str, cache_dir: str | None = None, variant: str | None = None,
                       storage_options: Mapping[str, Any] | None = None) -> Path:
    """Local folder for `path`: itself, a cached copy of a URL, or a hub snapshot."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if os.path.isdir(path):
        return Path(path)
    if _is_url(path):
        return fetch_remote_checkpoint(path, cache_dir, storage_options)
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model.path {path!r}: no such folder (and not a hub id org/name)")
    # A hub id such as prs-eth/marigold-depth-v1-1.
    from huggingface_hub import snapshot_download

    allow, ignore = _variant_patterns(variant)
    try:
        return Path(snapshot_download(repo_id=path, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise FileNotFoundError(
            f"model.path {path!r}: not a local folder, and the hub download failed "
            f"({type(e).__name__}: {e}). Offline? Point model.path at a local or s3:// copy."
        ) from e


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
    or fsspec URL); ``{"factory": "pkg.mod:fn", "options": {...}}`` calls any importable
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
    if cfg.kind == "marigold":
        from depthray.models.marigold import MarigoldDepthModel

        folder = resolve_checkpoint(cfg.path, cfg.cache_dir, cfg.variant, storage_options)
        return MarigoldDepthModel.from_pretrained(
            folder,
            dtype=cfg.dtype,
            variant=cfg.variant,
            device=cfg.device,
            processing_resolution=cfg.processing_resolution,
            vae_decoder=cfg.vae_decoder,
            compile=cfg.compile,
            name=cfg.path,
        )
    raise ValueError(f"model.kind {cfg.kind!r} is unknown: use 'marigold', or set model.factory")
