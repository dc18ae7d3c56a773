"""Images in, fused depth out: views x ensemble members through a depth model (no Ray here).

The steps for a batch of images:
 1. convert each image to float RGB [3,H,W] in [0,1];
 2. plan its views (the global view, plus tiles when tiling is on);
 3. run every (view, member) pair through the model, batched across images;
 4. ensemble the members of each view (align, fuse, uncertainty);
 5. bring each view back to the image and fuse views into one depth map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthray.config import InferenceConfig, inference_config
from depthray.ensemble import ensemble_depth
from depthray.models.base import DepthModel


@dataclass
class DepthResult:
    depth: np.ndarray  # float32 [H,W] in [0,1], 0 = near, at the input image size
    uncertainty: np.ndarray  # float32 [H,W] >= 0, same units as depth
    num_views: int  # global view + tiles
    ensemble_size: int
    model_evaluations: int  # views x members (each runs the model's denoising steps)


def image_to_tensor(image: Any) -> torch.Tensor:
    """numpy HxW / HxWx1 / HxWx3 / HxWx4, uint8 / uint16 / float in [0,1] -> float32 [3,H,W].

    Alpha is dropped (as PIL's convert("RGB") does); gray is repeated to three channels.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image is empty: shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        lo, hi = float(np.nanmin(out)), float(np.nanmax(out))
        if not np.isfinite(out).all():
            raise ValueError("float image contains NaN or infinite values")
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"float images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}] "
                "(divide 8-bit data by 255)"
            )
        out = np.clip(out, 0.0, 1.0)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    else:
        raise ValueError(f"unsupported image dtype {arr.dtype}: use uint8, uint16 or float in [0,1]")
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()


def resize(x: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bilinear resize of [C,H,W] or [N,C,H,W]; a no-op when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x if x.ndim == 4 else x.unsqueeze(0)
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out if x.ndim == 4 else out[0]


def fit_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size with the long side at most `long_side`, aspect kept (never upscales)."""
    scale = min(1.0, long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def member_seed(base: int, view_index: int, member: int) -> int:
    """Seed of one ensemble member of one view: distinct per member and per view."""
    return (base * 1_000_003 + view_index * 7_919 + member) % (2**63)


@dataclass
class _View:
    image_index: int
    view_index: int
    pixels: torch.Tensor  # [3,h,w] what the model sees


def _run_members(
    model: DepthModel, views: Sequence[_View], cfg: InferenceConfig
) -> list[torch.Tensor]:
    """All members of all views through the model, batch_size at a time -> [E,h,w] per view."""
    e = cfg.ensemble_size
    # Same-sized views next to each other so model batches are homogeneous; a view's
    # members stay adjacent so the model can encode the view once.
    order = sorted(range(len(views)), key=lambda i: tuple(views[i].pixels.shape[-2:]))
    requests = [(i, m) for i in order for m in range(e)]
    members: list[list[torch.Tensor | None]] = [[None] * e for _ in views]
    for start in range(0, len(requests), cfg.batch_size):
        chunk = requests[start : start + cfg.batch_size]
        for shape_group in _group_by_shape(chunk, views):
            batch = torch.stack([views[i].pixels for i, _ in shape_group])  # [B,3,h,w]
            seeds = [member_seed(cfg.seed, views[i].view_index, m) for i, m in shape_group]
            out = model(batch, seeds)  # [B,h,w]
            for (i, m), depth in zip(shape_group, out):
                members[i][m] = depth.float().cpu()
    return [torch.stack(ms) for ms in members]  # type: ignore[arg-type]


def _group_by_shape(chunk: list[tuple[int, int]], views: Sequence[_View]):
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, m in chunk:
        groups.setdefault(tuple(views[i].pixels.shape[-2:]), []).append((i, m))
    return groups.values()


def predict_images(
    images: Iterable[Any],
    model: DepthModel,
    config: InferenceConfig | Mapping[str, Any] | None = None,
) -> list[DepthResult]:
    """Predict depth for several images, sharing model batches across them."""
    cfg = inference_config(config)
    res = int(model.processing_resolution)

    # 1. Images -> float RGB tensors.
    tensors = [image_to_tensor(img) for img in images]
    # 2. Views: the global view at the model's resolution.
    views = []
    for idx, t in enumerate(tensors):
        size = fit_long_side(t.shape[1], t.shape[2], res)
        views.append(_View(idx, 0, resize(t, size, antialias=True)))  # [3,h,w]
    # 3. Every member of every view through the model.
    member_maps = _run_members(model, views, cfg)  # V x [E,h,w]
    # 4. + 5. Ensemble per view, back to the image size.
    results = []
    for view, members in zip(views, member_maps):
        fused = ensemble_depth(members.unsqueeze(0), cfg.ensemble_reduction)
        full = tensors[view.image_index].shape[1:]
        depth = resize(fused.depth, tuple(full), antialias=False).clamp(0.0, 1.0)  # [1,H,W]
        unc = resize(fused.uncertainty, tuple(full), antialias=False).clamp_min(0.0)
        results.append(
            DepthResult(
                depth=depth[0].numpy().astype(np.float32),
                uncertainty=unc[0].numpy().astype(np.float32),
                num_views=1,
                ensemble_size=cfg.ensemble_size,
                model_evaluations=cfg.ensemble_size,
            )
        )
    return results


def predict_image(
    image: Any,
    model: DepthModel,
    config: InferenceConfig | Mapping[str, Any] | None = None,
) -> DepthResult:
    """Depth for one image: `.depth` float32 HxW in [0,1] (0 = near), `.uncertainty` >= 0."""
    return predict_images([image], model, config)[0]
