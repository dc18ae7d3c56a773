"""Marigold's one text input, the empty prompt's CLIP embedding, computed once per checkpoint.

Marigold conditions its UNet on the embedding of "" and nothing else, so every actor that
loaded the CLIP text encoder (340M parameters in SD2, transformers imported for it) did so
to compute the same [1, 2, 1024] tensor. It is computed the first time a checkpoint is
loaded on a machine and kept under the cache folder ($DEPTHRAY_CACHE, else
~/.cache/depthray), keyed by the text encoder's and tokenizer's files (name, size, mtime)
and the weights variant: a later actor start reads 8 kB instead of importing transformers
and loading the encoder. A changed encoder file is a new key; a cache that cannot be
written is skipped, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _key(folder: Path, variant: str | None) -> str:
    files = []
    for sub in ("text_encoder", "tokenizer"):
        for p in sorted((folder / sub).rglob("*")):
            if p.is_file():
                st = p.stat()
                files.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    payload = json.dumps({"folder": str(folder.resolve()), "variant": variant, "files": files})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cache_path(folder: str | Path, variant: str | None = None) -> Path:
    from depthray.models.checkpoints import default_cache_dir

    return default_cache_dir() / "empty_prompt" / f"{_key(Path(folder), variant)}.pt"


def compute(folder: str | Path, variant: str | None = None) -> torch.Tensor:
    """The embedding as diffusers' Marigold pipeline makes it: CLIP over the tokenized ""."""
    import transformers
    from transformers import CLIPTextModel, CLIPTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", variant=variant)
    ids = tokenizer("", padding="do_not_pad", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0].float()  # [1, 2, D]


def empty_prompt_embedding(folder: str | Path, variant: str | None = None) -> torch.Tensor:
    """The cached embedding, computed (and cached) if this machine has none for the checkpoint."""
    path = cache_path(folder, variant)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        pass
    except Exception as e:  # a damaged cache file: compute again, and replace it
        log.warning("ignoring the cached empty-prompt embedding %s: %s", path, e)
    empty = compute(folder, variant)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(empty, f)
        os.replace(tmp, path)  # actors starting together each write whole files; one wins
    except OSError as e:
        log.debug("could not cache the empty-prompt embedding at %s: %s", path, e)
    return empty
