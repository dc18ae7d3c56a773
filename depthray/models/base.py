"""The depth model interface every engine, test double and plug-in implements."""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DepthModel(Protocol):
    """Any object with these two members is a depthray depth model.

    ``__call__`` takes views float32 ``[N,3,h,w]`` in [0,1] (h, w at most about
    ``processing_resolution``, or what ``view_size`` gives) and one seed per view, and returns float32 ``[N,h,w]`` in
    [0,1]: one affine-invariant ensemble member per view, deterministic for a given seed.
    Callers ensemble by repeating a view with different seeds; a good implementation
    notices the repeats and encodes each distinct view once.

    Optional: ``predict_views(views, index, seeds)`` with ``views`` [U,3,h,w] distinct and
    member n = views[index[n]]: the same members, left on the model's device. predict.py
    uses it when present, so a view crosses to the device once however many members it
    has, and members are ensembled and fused where they were made.

    Optional, together: ``view_size(height, width) -> (h, w)`` and ``resize_view(pixels
    [N,3,H,W], (h, w)) -> [N,3,h,w]``, for a model whose network input size follows a rule
    on the size of what it is given (a transformers image processor's). predict.py then
    makes the global view of an HxW image at ``view_size(H, W)`` with ``resize_view`` (one
    resample from the full image, with the model's kernel) instead of the long side at
    ``processing_resolution``; tiles are handed over as cut, and the model applies its rule to
    each. A view at the size the rule gives for it goes to the network unresized, so the rule
    must map its own output to itself. `depthray plan` must compute the same size without
    loading the model (plan.py).

    Optional: ``resize_label(maps [N,h,w], (H, W)) -> [N,H,W]``: how a finished label (and
    its uncertainty) is brought back to the image size, for a model whose upstream
    post-processing has its own kernel; without it, bilinear, antialiased when shrinking.

    Optional: a ``num_inference_steps`` keyword on both calls, for models with denoising
    steps (see `step_arguments`); without it, `inference.num_inference_steps` must be null.
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


def step_arguments(model: DepthModel, steps: int | None) -> dict[str, int]:
    """Keyword arguments that ask `model` for `steps` denoising steps (None = its default).

    Steps are a per-call setting, as in diffusers' pipelines: a model that has them takes
    ``num_inference_steps=`` in ``__call__`` (and ``predict_views``). Models without steps
    (plug-ins, test doubles) cannot honour a value and say so, instead of ignoring it.
    """
    if steps is None:
        return {}
    params = inspect.signature(model.__call__).parameters
    if "num_inference_steps" not in params and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"inference.num_inference_steps={steps} but {type(model).__name__} takes no "
            "num_inference_steps argument; leave it null for this model"
        )
    return {"num_inference_steps": int(steps)}
