"""Test-double depth models for fault scenarios (loaded through `model.factory`).

They follow the model interface (depthray.models.base.DepthModel) and are cheap, so the
scenarios spend their time on the faults, not on inference.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


class FaultyModel:
    """Depth = mean colour of each view; optional faults:

    - `sleep_s`: seconds per call (lets a test kill a job mid-way);
    - `die_once_marker` + `die_on_call`: the N-th call of the first process to get there
      kills its process (os._exit, like a segfault or the OOM killer) and leaves the marker,
      so the restarted actor's retry of the batch succeeds;
    - `oom_above`: calls with more views than this raise torch.OutOfMemoryError;
    - `die_if_white`: any all-white view kills the process, every time (a poison image);
    - `hang_if_white`: any all-white view blocks the call for an hour (a hung GPU call);
    - `nan_if_black`: an all-black view gets a 4x4 NaN patch (a float16 VAE that overflowed);
    - `wait_for_glob` + `wait_on_call`: that call (and later ones) first waits, up to 60 s,
      until a file matches the glob (a test that needs something to happen before a call).
    """

    def __init__(self, processing_resolution: int = 32, sleep_s: float = 0.0,
                 die_once_marker: str | None = None, die_on_call: int = 1,
                 oom_above: int | None = None, calls_log: str | None = None, die_if_white: bool = False,
                 hang_if_white: bool = False, device: str = "cpu", nan_if_black: bool = False,
                 wait_for_glob: str | None = None, wait_on_call: int = 1):
        torch.set_num_threads(1)
        self.processing_resolution = processing_resolution
        self.sleep_s = sleep_s
        self.die_once_marker = die_once_marker
        self.die_on_call = die_on_call
        self.oom_above = oom_above
        self.calls_log = calls_log
        self.die_if_white = die_if_white
        self.hang_if_white = hang_if_white
        self.nan_if_black = nan_if_black
        self.device = torch.device(device)  # reported only: the double computes on the CPU
        self.wait_for_glob, self.wait_on_call = wait_for_glob, wait_on_call
        self.calls = 0

    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        self.calls += 1
        if self.wait_for_glob and self.calls >= self.wait_on_call:
            import glob

            deadline = time.monotonic() + 60
            while not glob.glob(self.wait_for_glob) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.calls_log:
            with open(self.calls_log, "a") as f:
                f.write(f"{os.getpid()} {views.shape[0]} {_node_id()} {time.time():.3f}\n")
        if self.die_once_marker and self.calls >= self.die_on_call:
            marker = Path(self.die_once_marker)
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        white = bool((views.flatten(1).amin(dim=1) > 0.99).any())
        if self.die_if_white and white:
            os._exit(1)
        if self.hang_if_white and white:
            time.sleep(3600)
        if self.oom_above is not None and views.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (test double: {views.shape[0]} views > {self.oom_above})")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        depth = views.mean(dim=1)  # [N,h,w]
        depth = (depth - depth.amin(dim=(1, 2), keepdim=True)).clamp(0, 1)
        if self.nan_if_black:
            black = views.flatten(1).amax(dim=1) < 0.01  # [N]
            depth[black, :4, :4] = float("nan")
        return depth


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except Exception:
        return "-"


def make(**options) -> FaultyModel:
    return FaultyModel(**options)


class LogDepthImageModel:
    """Test double for metric labels (tests/test_metric_pipeline.py): its input image holds
    the scene's true depth as gray level = log depth over [near, far] (8 bits: the side channel
    the test packs), and its relative output is that depth times a fixed smooth error (two
    plane waves, ~`amp` in log depth), min-max normalised per view: metric depth up to an
    affine map the job does not know, plus an error no alignment can remove. `output_space`
    "disparity": the inverse depth, normalised the same way."""

    def __init__(self, processing_resolution: int = 128, near: float = 0.5, far: float = 200.0,
                 amp: float = 0.05, output_space: str = "depth"):
        torch.set_num_threads(1)
        self.processing_resolution = processing_resolution
        self.near, self.far, self.amp = near, far, amp
        self.output_space = output_space

    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        import math

        n, _, h, w = views.shape
        gray = views.double().mean(dim=1)  # [N,h,w]
        depth = torch.exp(math.log(self.near) + gray * math.log(self.far / self.near))
        y, x = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                              torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
        eps = 0.8 * torch.cos(2 * math.pi * (0.8 * x + 0.5 * y) + 0.3) + 0.6 * torch.cos(2 * math.pi * (1.1 * y - 0.6 * x) + 1.0)
        v = depth * torch.exp(self.amp * eps)
        v = v if self.output_space == "depth" else 1.0 / v
        lo, hi = v.amin(dim=(1, 2), keepdim=True), v.amax(dim=(1, 2), keepdim=True)
        return ((v - lo) / (hi - lo)).float()


def make_log_depth(**options) -> LogDepthImageModel:
    return LogDepthImageModel(**options)
