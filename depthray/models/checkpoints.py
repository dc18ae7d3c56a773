"""Where a checkpoint lives and what it says about itself, without building a model.

A checkpoint path may be a local folder, a Hugging Face hub id (downloaded once into the
usual hub cache), or any fsspec URL such as ``s3://bucket/models/marigold`` (copied once
per machine into a local cache, atomically, so concurrent workers never see half a copy).
`checkpoint_defaults` reads the defaults a checkpoint registers in `model_index.json`
(processing resolution, denoising steps): the engine and `depthray plan` both use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Marigold's defaults when a checkpoint registers none (marigold-depth-v1-1: 768 px, 1 step
# of trailing DDIM; LCM checkpoints register their own).
DEFAULT_PROCESSING_RESOLUTION = 768
DEFAULT_DENOISING_STEPS = 1


@dataclass(frozen=True)
class CheckpointDefaults:
    processing_resolution: int
    denoising_steps: int
    source: str  # where they came from: the model_index.json path, or "Marigold defaults"


def checkpoint_defaults(folder: str | os.PathLike | None) -> CheckpointDefaults:
    """The defaults a diffusers-layout checkpoint registers in model_index.json; Marigold's
    own where the folder is unknown (a URL or hub id not fetched yet) or registers none."""
    index_file = Path(folder) / "model_index.json" if folder is not None else None
    index: dict[str, Any] = {}
    source = "Marigold defaults"
    if index_file is not None and index_file.is_file():
        index = json.loads(index_file.read_text())
        source = str(index_file)
    return CheckpointDefaults(
        processing_resolution=int(index.get("default_processing_resolution") or DEFAULT_PROCESSING_RESOLUTION),
        denoising_steps=int(index.get("default_denoising_steps") or DEFAULT_DENOISING_STEPS),
        source=source,
    )


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
