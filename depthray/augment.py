"""Test-time augmentations for deterministic models (no seed to vary: end-to-end Marigold,
transformers models), so their ensembles still hold different members and an uncertainty.

Member m of a view sees augmentation m: 0 is the view itself, then horizontal flips and
zoom-outs (the view shrunk by a factor and placed at an anchor inside a frame of the view's
size padded by edge replication, which also shifts it). Every augmentation keeps the
view's size, so batches stay homogeneous, and is undone exactly in coverage: the member is
cropped back to where the view was placed, resized to the view's size and flipped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    flip: bool = False
    scale: float = 1.0  # <= 1: the view is shrunk by it inside its own frame
    anchor: tuple[float, float] = (0.5, 0.5)  # where it sits: (0,0) top-left, (1,1) bottom-right


_CYCLE = (
    Augmentation(),
    Augmentation(flip=True),
    Augmentation(scale=0.875, anchor=(0.0, 0.0)),
    Augmentation(flip=True, scale=0.875, anchor=(1.0, 1.0)),
    Augmentation(scale=0.75),
    Augmentation(flip=True, scale=0.75, anchor=(0.0, 1.0)),
    Augmentation(scale=0.875, anchor=(1.0, 0.0)),
    Augmentation(flip=True, scale=0.9375),
)


def augmentation(member: int) -> Augmentation:
    """Member m's augmentation: a fixed cycle (member 0 = identity), then smaller zooms."""
    base = _CYCLE[member % len(_CYCLE)]
    rounds = member // len(_CYCLE)
    if rounds == 0:
        return base
    return Augmentation(base.flip, max(0.5, base.scale * (1.0 - 0.06 * rounds)), base.anchor)


def _box(aug: Augmentation, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the shrunk view inside its [h,w] frame."""
    sh, sw = max(1, round(h * aug.scale)), max(1, round(w * aug.scale))
    return round((h - sh) * aug.anchor[0]), round((w - sw) * aug.anchor[1]), sh, sw


def apply(views: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """[N,3,h,w] -> the augmented views, same shape."""
    x = views.flip(-1) if aug.flip else views
    if aug.scale >= 1.0:
        return x
    h, w = x.shape[-2:]
    top, left, sh, sw = _box(aug, h, w)
    small = F.interpolate(x, (sh, sw), mode="bilinear", align_corners=False, antialias=True)
    return F.pad(small, (left, w - sw - left, top, h - sh - top), mode="replicate")


def undo(members: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """[N,h,w] predictions of augmented views -> aligned with the original view."""
    if aug.scale < 1.0:
        h, w = members.shape[-2:]
        top, left, sh, sw = _box(aug, h, w)
        crop = members[:, top : top + sh, left : left + sw]
        members = F.interpolate(crop[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]
    return members.flip(-1) if aug.flip else members
