"""Shared benchmark helpers: models, images, interleaved timing, memory sampling.

Timings on a shared machine are noisy, so contenders are always run interleaved
(A, B, A, B, ...) after a warm-up call each, and compared by their medians.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- models
def model_dir(model: str) -> Path:
    """`tiny` | `sd2-random` | a checkpoint folder -> a local diffusers-layout folder."""
    from depthray.models.tiny import build_tiny_marigold, default_tiny_model_dir, ensure_tiny_model

    if model == "tiny":
        return ensure_tiny_model()
    if model == "sd2-random":
        out = default_tiny_model_dir().parent / "sd2-random-marigold"
        if not (out / "model_index.json").exists():
            build_tiny_marigold(out, preset="sd2")
        return out
    path = Path(model)
    if not (path / "model_index.json").exists():
        raise SystemExit(f"--model {model!r}: not tiny, sd2-random, or a folder with model_index.json")
    return path


def tiny_decoder_dir(model: str) -> Path:
    """A random-weight AutoencoderTiny (TAESD widths for sd2-random / real checkpoints)."""
    from depthray.models.tiny import build_tiny_vae_decoder, default_tiny_model_dir

    preset = "tiny" if model == "tiny" else "sd2"
    out = default_tiny_model_dir().parent / f"taesd-random-{preset}"
    if not (out / "config.json").exists():
        build_tiny_vae_decoder(out, preset=preset)
    return out


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a benchmark's child process, with this repository first on
    PYTHONPATH and whatever was there kept (a GPU bundle's site, benchmarks/gpu_run.sh)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def gpu_hours_per_million(images_per_s: float) -> float:
    return 1e6 / images_per_s / 3600


def scene_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """n synthetic RGB uint8 scenes [H,W,3] (depthray.samples)."""
    from depthray.samples import make_scene

    return [make_scene(height, width, seed=seed + i)[0] for i in range(n)]


# ------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleave(contenders: dict[str, Callable[[], Any]], rounds: int, device: str = "cpu",
               warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender: `warmup` untimed calls each, then `rounds`
    rounds of one call each, in turn (A, B, A, B, ...)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: list[float]) -> str:
    """'median [min-max]' in seconds, for the table."""
    return f"{median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------- memory
def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of a process and all its descendants (shared pages split)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakMemory:
    """Samples tree_pss_bytes(pid) in a thread; `.peak` is the largest sample."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.5):
        self.pid = pid or os.getpid()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss_bytes(self.pid))
