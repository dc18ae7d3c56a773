"""The depth model interface every engine, test double and plug-in implements."""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DepthModel(Protocol):
    """Any object with these two members is a depthray depth model.

    ``__call__`` takes views float32 ``[N,3,h,w]`` in [0,1] (h, w at most about
    ``processing_resolution``) and one seed per view, and returns float32 ``[N,h,w]`` in
    [0,1]: one affine-invariant ensemble member per view, deterministic for a given seed.
    Callers ensemble by repeating a view with different seeds; a good implementation
    notices the repeats and encodes each distinct view once.

    Optional: ``predict_views(views, index, seeds)`` with ``views`` [U,3,h,w] distinct and
    member n = views[index[n]]: the same members, left on the model's device. predict.py
    uses it when present, so a view crosses to the device once however many members it
    has, and members are ensembled and fused where they were made.
    """

    processing_resolution: int

    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor: ...


def check_view_tensor(views: torch.Tensor) -> None:
    """Views must be [N,3,h,w]; the message says what was passed."""
    if not isinstance(views, torch.Tensor) or views.ndim != 4 or views.shape[1] != 3:
        shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
        raise ValueError(f"views must be a float tensor [N,3,h,w], got {shape}")


def check_views(views: torch.Tensor, seeds: list[int]) -> None:
    """Validate a model call's arguments once, with messages that say what was passed."""
    check_view_tensor(views)
    if len(seeds) != views.shape[0]:
        raise ValueError(f"need one seed per view: {views.shape[0]} views, {len(seeds)} seeds")


@contextlib.contextmanager
def denoising_steps(model: DepthModel, steps: int | None):
    """Temporarily run `model` with `steps` denoising steps (None = the model's default).

    Steps are an inference setting, not part of the call interface; models that have no
    `num_inference_steps` attribute (plug-ins, test doubles) cannot honour it and say so.
    """
    if steps is None:
        yield model
        return
    if not hasattr(model, "num_inference_steps"):
        raise ValueError(
            f"inference.num_inference_steps={steps} but {type(model).__name__} has no "
            "num_inference_steps attribute; leave it null for this model"
        )
    before = model.num_inference_steps
    model.num_inference_steps = steps
    try:
        yield model
    finally:
        model.num_inference_steps = before
