"""`depthray plan --measure`: seconds per image as `depthray predict` spends them, timed here.

Timing one model batch and multiplying by views x members x steps (what plan did before)
came out 3.5x low: it left out everything around the model (decoding, resizing the image
per tile level, ensembling, tile alignment and blending, PNG encoding, the preview), the
global view's own batch, part-filled batches at level ends, and square tiles, which hold
a third more pixels than the 4:3 batch it timed. So an image is measured in two parts:

 1. everything but the model: the image goes through predict's own path
    (depthray/predict_command.py `predict_files`) with a stand-in model that answers each call
    at once (cheap maps from the pixels, on the model's device) and records its shape;
 2. the model: each distinct recorded call (view size, distinct views, members, views the
    engine had already encoded) runs on the real model, timed after a warm-up; the image's
    model time is the sum over its calls (a dozen distinct calls stand for hundreds).

What is left out: loading the model, and the first call's warm-up (paid once per process).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthray.models.latent_cache import LatentCache

# A recorded model call: (kind, h, w, member -> view index, per view: already encoded,
# keyword arguments). kind "views" = predict_views, "call" = the plain interface.
Call = tuple[str, int, int, tuple[int, ...], tuple[bool, ...], tuple]


@dataclass
class ImageTiming:
    model_seconds: float  # the model calls an image makes, timed on the real model
    other_seconds: float  # predict's path around the model: decode, fusion, encode, preview
    model_calls: int

    @property
    def seconds(self) -> float:
        return self.model_seconds + self.other_seconds


# The engine's own view fingerprint: the views it would encode once are the ones counted once here.
_key = LatentCache.key


class CallRecorder:
    """Stands in for `model` while predict's path runs: answers every call at once with each
    view's first channel (a map with structure, so alignment and blending do real work) and
    counts the calls by shape."""

    def __init__(self, model: Any):
        self.processing_resolution = model.processing_resolution
        for name in ("device", "output_space", "deterministic", "default_num_inference_steps",
                     "view_size", "resize_view", "resize_label"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        if hasattr(model, "predict_views"):
            self.predict_views = self._predict_views  # predict.py takes the same path as with the model
        self.calls: Counter = Counter()
        self._encoded: set = set()  # views the engine has seen (its latent cache reuses them)

    def _record(self, kind: str, distinct: torch.Tensor, index: list[int], kwargs: dict) -> None:
        keys = [_key(v) for v in distinct]
        seen = tuple(k in self._encoded for k in keys)
        self._encoded.update(keys)
        h, w = distinct.shape[-2:]
        self.calls[(kind, int(h), int(w), tuple(index), seen, tuple(sorted(kwargs.items())))] += 1

    def _predict_views(self, views: torch.Tensor, index: list[int], seeds: list[int], **kwargs) -> torch.Tensor:
        self._record("views", views, list(index), kwargs)
        device = torch.device(getattr(self, "device", "cpu"))
        return views[list(index), 0].to(device)  # [N,h,w]

    def __call__(self, views: torch.Tensor, seeds: list[int], **kwargs) -> torch.Tensor:
        keys = [_key(v) for v in views]
        first = list(dict.fromkeys(keys))
        self._record("call", views[[keys.index(k) for k in first]], [first.index(k) for k in keys], kwargs)
        return views[:, 0].clone()  # [N,h,w]


def _run_call(model: Any, call: Call, views: torch.Tensor, index: list[int]) -> None:
    kind, kwargs = call[0], dict(call[5])
    seeds = list(range(len(index)))
    if kind == "views":
        model.predict_views(views, index, seeds, **kwargs)
    else:
        model(views[index], seeds, **kwargs)


def _sync(model: Any) -> None:
    if getattr(getattr(model, "device", None), "type", "cpu") == "cuda":
        torch.cuda.synchronize()


def time_call(model: Any, call: Call, seed: int = 0) -> float:
    """Seconds one recorded call takes on `model`: fresh views of its size; the views it
    found already encoded are encoded first (untimed), as the earlier call had done."""
    _, h, w, index, seen, _ = call
    views = torch.rand(len(seen), 3, h, w, generator=torch.Generator().manual_seed(seed))  # [U,3,h,w]
    clear = getattr(model, "clear_cache", None)
    if clear:
        clear()
    old = [u for u, s in enumerate(seen) if s]
    if old:
        _run_call(model, call, views[old], list(range(len(old))))
    _sync(model)
    t0 = time.perf_counter()
    _run_call(model, call, views, list(index))
    _sync(model)
    return time.perf_counter() - t0


def synthetic_image(height: int, width: int, path: Path) -> Path:
    """A photo-like JPEG of the given size (smooth shading plus grain, so it decodes and
    compresses like a photo rather than like noise or a flat colour)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    # float32 throughout: a 6000x4000 plan stays under 0.5 GB
    shade = (np.sin(np.arange(width, dtype=np.float32) / max(width, 1) * 7)[None, :]
             * np.cos(np.arange(height, dtype=np.float32) / max(height, 1) * 5)[:, None])  # [H,W]
    img = rng.standard_normal((height, width, 3), dtype=np.float32)
    img *= 12
    img += (128 + 60 * shade)[..., None]
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def measure_image(cfg, model: Any, path: str | Path, repeats: int | None = None) -> ImageTiming:
    """Seconds `depthray predict` spends on the image at `path` with `cfg`, model loaded."""
    from depthray.predict_command import predict_files
    from depthray.plan import image_sizes

    h, w = image_sizes([path])[0]
    # Small images: best of two, so one scheduler hiccup on a shared machine does not count.
    repeats = repeats or (2 if h * w <= 4_000_000 else 1)
    other, recorder = float("inf"), None
    with tempfile.TemporaryDirectory(prefix="depthray-measure-") as out:
        for _ in range(repeats):
            recorder = CallRecorder(model)
            t0 = time.perf_counter()
            if predict_files([str(path)], cfg, out, model=recorder):
                raise ValueError(f"{path}: predict could not read it; nothing to measure")
            other = min(other, time.perf_counter() - t0)
    assert recorder is not None
    calls = recorder.calls
    if calls:
        time_call(model, next(iter(calls)), seed=1)  # warm-up: kernels, allocator, lazy init
    # Each distinct call timed thrice (the median: one hiccup on a shared machine does not
    # count) when that costs less than the image's own calls, else once.
    tries = 3 if 3 * len(calls) <= sum(calls.values()) else 1
    model_s = sum(n * statistics.median(time_call(model, call, seed=t) for t in range(tries))
                  for call, n in calls.items())
    return ImageTiming(model_seconds=model_s, other_seconds=other, model_calls=sum(calls.values()))


def measure_sizes(cfg, sizes: list[tuple[int, int]], files: dict[tuple[int, int], str] | None = None
                  ) -> dict[tuple[int, int], ImageTiming]:
    """ImageTiming per (height, width): measured on a file of that size when `files` has
    one (the user's own image), else on a synthetic photo of that size."""
    from depthray.io.fs import storage_options
    from depthray.models.loading import load_model

    model = load_model(cfg.model, storage_options(cfg.model.path, cfg.storage))
    out = {}
    with tempfile.TemporaryDirectory(prefix="depthray-measure-") as tmp:
        for h, w in sorted(set(sizes)):
            path = (files or {}).get((h, w)) or synthetic_image(h, w, Path(tmp) / f"{w}x{h}.jpg")
            out[(h, w)] = measure_image(cfg, model, path)
    return out
