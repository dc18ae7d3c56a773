"""Images in, fused depth out: views x ensemble members through a depth model (no Ray here).

The steps for a batch of images:
 1. convert each image to float RGB [3,H,W] in [0,1];
 2. plan its views: the global view (at the model's `view_size` when it has one, made with
    its `resize_view`), plus levels of overlapping tiles when tiling applies
    (depthray.tiling.plan_tiles);
 3. level by level, run every (view, member) pair through the model, batched across images;
    a view's members are ensembled (align, fuse, uncertainty) as soon as they are all in,
    then dropped, so memory holds a few views' members, never all of them;
 4. tiles are aligned to the level below and blended into the level's running sums (the
    joint fusions hold a level's tiles and solve their scales and shifts together at its end,
    depthray/tiling_joint.py);
 5. the finest level is brought back to the image size and normalised to [0,1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthray import augment
from depthray.config import InferenceConfig, inference_config
from depthray.ensemble import ensemble_depth
from depthray.models.base import DepthModel, step_arguments
from depthray.resize import resize
from depthray.tiling import (
    Tile,
    TileBlender,
    TilePlan,
    align_tile,
    fuse_frequencies,
    plan_tiles,
    tile_weights,
)
from depthray.tiling_budget import background, detail_map, level_quotas, select_tiles, tile_scores
from depthray.tiling_joint import solve_level, uses_joint


class NonFiniteDepth(ValueError):
    """The model returned NaN or infinite values (e.g. a float16 VAE that overflowed): the
    image gets no label rather than a wrong one."""


@dataclass
class DepthResult:
    depth: np.ndarray  # float32 [H,W] in [0,1], 0 = near, at the input image size
    uncertainty: np.ndarray  # float32 [H,W] >= 0, same units as depth
    num_views: int  # global view + tiles
    ensemble_size: int
    model_evaluations: int  # views x members (each runs the model's denoising steps)
    # what `depth` holds: "depth" (0 = near) or "disparity" (relative inverse depth, 1 = near),
    # as the model declares it (`output_space`; Marigold: depth)
    output_space: str = "depth"
    members: str = "seeds"  # how ensemble members differ: "seeds" | "augmentations" (deterministic models)


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
    # Convert straight into one [3,H,W] float32 buffer: a 12 MP photo is 144 MB as float32,
    # and numpy's astype / divide / transpose would each allocate another copy.
    if arr.dtype == np.uint8:
        divisor = 255.0
    elif arr.dtype == np.uint16:
        divisor = 65535.0
        arr = arr.astype(np.int32)  # torch's uint16 support is partial; int32 copies cleanly
    elif np.issubdtype(arr.dtype, np.floating):
        divisor = None
        if not np.isfinite(arr).all():
            raise ValueError("float image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"float images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}] "
                "(divide 8-bit data by 255)"
            )
    elif arr.dtype == np.bool_:
        divisor = 1.0
        arr = arr.astype(np.uint8)
    else:
        raise ValueError(f"unsupported image dtype {arr.dtype}: use uint8, uint16 or float in [0,1]")
    out = torch.empty((3, arr.shape[0], arr.shape[1]), dtype=torch.float32)  # [3,H,W]
    out.copy_(torch.from_numpy(arr).permute(2, 0, 1))
    if divisor is None:
        return out.clamp_(0.0, 1.0)
    return out.div_(divisor)


def member_seed(base: int, view_index: int, member: int) -> int:
    """Seed of one ensemble member of one view: distinct per member and per view."""
    return (base * 1_000_003 + view_index * 7_919 + member) % (2**63)


@dataclass
class _View:
    image_index: int
    view_index: int  # 0 = the global view, 1.. = tiles in plan order (picks the seeds)
    tile: Tile | None  # None for the global view
    size: tuple[int, int]  # what the model sees


class _ImageJob:
    """One image on its way through the levels: pixels, plan, reference and running sums."""

    def __init__(self, index: int, image: torch.Tensor, plan: TilePlan, device: torch.device,
                 hooks: ViewHooks | None = None):
        self.index = index
        self.image = image  # [3,H,W], on the CPU: what the model is given
        self.plan = plan
        self.device = device  # where the fused maps live (see _fusion_device)
        self.hooks = hooks or ViewHooks()
        if self.hooks.resize_view is not None:  # the model's own resampling, once, from the full image
            self.global_pixels = self.hooks.resize_view(image[None], plan.global_size)[0]  # [3,h,w]
        else:
            self.global_pixels = resize(image, plan.global_size, antialias=True)  # [3,h,w]
        self.reference: torch.Tensor | None = None  # [h,w] fused depth of the last finished level
        self.uncertainty: torch.Tensor | None = None  # [h,w]
        self.level = -1  # -1 = global view, k = plan.levels[k]
        self.level_pixels: torch.Tensor | None = None  # [3,Hk,Wk] image at the level's size
        self.blender: TileBlender | None = None
        self.held: list[tuple[Tile, torch.Tensor, torch.Tensor]] = []  # a joint fusion's tiles
        self._first_tile_index = 1
        self.quotas = level_quotas(plan, plan.budget)  # tiles each level may run (tiling.budget)
        self.skipped = 0  # tiles the budget left out so far

    def global_view(self) -> _View:
        return _View(self.index, 0, None, self.plan.global_size)

    def start_level(self, k: int) -> list[_View]:
        """Resize the image for level k and return the level's tile views."""
        level = self.plan.levels[k]
        self.level = k
        # Antialiased resize: a tile must not see aliasing the full image would not show.
        self.level_pixels = resize(self.image, level.size, antialias=True)  # [3,Hk,Wk]
        self.blender = TileBlender(level.size, self.device)
        first = self._first_tile_index  # seeds follow plan order, skipped tiles or not
        self._first_tile_index += len(level.tiles)
        tiles, keep = level.tiles, range(len(level.tiles))
        if self.quotas[k] < len(tiles) or self.plan.detail_threshold > 0:
            assert self.reference is not None and self.uncertainty is not None
            scores = tile_scores(detail_map(self.reference), level)
            keep = select_tiles(scores, self.quotas[k], self.plan.detail_threshold)
            for i in sorted(set(range(len(tiles))) - set(keep)):  # the level below, feathered
                depth, unc = background(self.reference, self.uncertainty, tiles[i], level.size)
                self.blender.add(tiles[i], depth, unc, tile_weights(tiles[i], level, self.device))
            self.skipped += len(tiles) - len(keep)
        return [_View(self.index, first + i, tiles[i], (tiles[i].height, tiles[i].width)) for i in keep]

    @property
    def num_views(self) -> int:
        """Views this image runs: the plan's, less the tiles the budget skipped so far."""
        return self.plan.num_views - self.skipped

    def pixels(self, view: _View) -> torch.Tensor:
        if view.tile is None:
            return self.global_pixels  # [3,h,w]
        assert self.level_pixels is not None
        return self.level_pixels[(slice(None),) + view.tile.box]  # [3,th,tw], a view, no copy

    def add(self, view: _View, depth: torch.Tensor, uncertainty: torch.Tensor) -> None:
        """Fold one ensembled view in: the global view becomes the reference, a tile is
        aligned to the reference and blended."""
        if view.tile is None:
            self.reference, self.uncertainty = depth, uncertainty
            return
        assert self.blender is not None and self.reference is not None
        level = self.plan.levels[self.level]
        if uses_joint(self.plan.fusion):  # held until the level ends (depthray/tiling_joint.py)
            self.held.append((view.tile, depth, uncertainty))
            return
        scale, shift = align_tile(depth, view.tile, level.size, self.reference)
        weights = tile_weights(view.tile, level, self.device)
        self.blender.add(view.tile, depth * scale + shift, uncertainty * scale, weights)

    def finish_level(self) -> None:
        assert self.blender is not None and self.reference is not None
        if self.held:
            level = self.plan.levels[self.level]
            tiles = [t for t, _, _ in self.held]
            affines = solve_level([d for _, d, _ in self.held], tiles, level, self.reference)
            for (tile, depth, unc), (scale, shift) in zip(self.held, affines):
                self.blender.add(tile, depth * scale + shift, unc * scale, tile_weights(tile, level, self.device))
            self.held = []
        fused, uncertainty = self.blender.result()  # [Hk,Wk] x2
        fused = fuse_frequencies(fused, self.reference, self.plan, self.level)
        self.reference, self.uncertainty = fused, uncertainty
        self.level_pixels = self.blender = None

    def result(self, cfg: InferenceConfig, output_space: str = "depth", members: str = "seeds") -> DepthResult:
        assert self.reference is not None and self.uncertainty is not None
        full = tuple(self.image.shape[1:])
        if self.hooks.resize_label is not None:  # as the model's upstream post-processing resamples
            depth, unc = self.hooks.resize_label(torch.stack([self.reference, self.uncertainty]), full)  # [H,W] x2
        else:
            shrink = self.reference.shape[0] > full[0]
            depth = resize(self.reference[None], full, antialias=shrink)[0]  # [H,W]
            unc = resize(self.uncertainty[None], full, antialias=shrink)[0]  # [H,W]
        self.reference = self.uncertainty = None  # in-place below may reuse their memory
        # One NaN in one member spreads through alignment and normalisation to the whole map
        # and would be written as 0 (= near): never a label.
        bad = int((~torch.isfinite(depth)).sum()) + int((~torch.isfinite(unc)).sum())
        if bad:
            raise NonFiniteDepth(f"the model returned non-finite values: {bad} of {2 * depth.numel()} "
                                 f"depth/uncertainty pixels of a {full[1]}x{full[0]} image are NaN or infinite")
        if self.plan.tiled:
            # Aligned tiles may step slightly outside the global view's [0,1] (a thin pole the
            # global view missed): renormalise rather than clip the detail away.
            lo, hi = depth.min(), depth.max()
            rng = (hi - lo).clamp_min(1e-6)
            depth = depth.sub_(lo).div_(rng)
            unc = unc.div_(rng)
        return DepthResult(
            depth=depth.clamp_(0.0, 1.0).cpu().numpy(),
            uncertainty=unc.clamp_min_(0.0).cpu().numpy(),
            num_views=self.num_views,
            ensemble_size=cfg.ensemble_size,
            model_evaluations=self.num_views * cfg.ensemble_size,
            output_space=output_space,
            members=members,
        )


def _stream_members(
    model: DepthModel,
    views: Sequence[_View],
    pixels: Callable[[_View], torch.Tensor],
    cfg: InferenceConfig,
) -> Iterator[tuple[_View, torch.Tensor]]:
    """Every member of every view through the model, batch_size requests per call.

    Yields (view, members [E,h,w]) as soon as a view's members are all in, so only the
    views of the current batch are ever held.
    """
    e = cfg.ensemble_size
    # Same-sized views next to each other so model batches are homogeneous; a view's
    # members stay adjacent so the model can encode the view once and finish it early.
    order = sorted(range(len(views)), key=lambda i: views[i].size)
    requests = [(i, m) for i in order for m in range(e)]
    pending: dict[int, list[torch.Tensor | None]] = {}
    distinct_views = hasattr(model, "predict_views")
    steps = step_arguments(model, cfg.num_inference_steps)  # {} = the model's default
    augmented = uses_augmentations(model, cfg)
    for start in range(0, len(requests), cfg.batch_size):
        chunk = requests[start : start + cfg.batch_size]
        for group in _group_by_shape(chunk, views):
            seeds = [member_seed(cfg.seed, views[i].view_index, m) for i, m in group]
            if augmented:  # member m = the view under augmentation m, undone on the way out
                augs = [augment.augmentation(m) for _, m in group]
                batch = torch.stack([augment.apply(pixels(views[i])[None], a)[0] for (i, _), a in zip(group, augs)])
                out = model(batch, seeds, **steps)  # [B,h,w]
                out = torch.cat([augment.undo(o[None].float(), a) for o, a in zip(out, augs)])
            elif distinct_views:  # each view once; members stay on the model's device
                order = list(dict.fromkeys(i for i, _ in group))
                where = {i: u for u, i in enumerate(order)}
                batch = torch.stack([pixels(views[i]) for i in order])  # [U,3,h,w]
                out = model.predict_views(batch, [where[i] for i, _ in group], seeds, **steps)  # [B,h,w]
            else:  # the plain interface: one view per member
                out = model(torch.stack([pixels(views[i]) for i, _ in group]), seeds, **steps)  # [B,h,w]
            for (i, m), depth in zip(group, out):
                pending.setdefault(i, [None] * e)[m] = depth.float()
        for i in [i for i, ms in pending.items() if all(m is not None for m in ms)]:
            yield views[i], torch.stack(pending.pop(i))  # type: ignore[arg-type]  # [E,h,w]


def uses_augmentations(model: DepthModel, cfg: InferenceConfig) -> bool:
    """Members of a deterministic model (``model.deterministic``: no seed changes its output)
    would all be equal: its ensembles vary test-time augmentations instead (depthray/augment.py)."""
    return bool(getattr(model, "deterministic", False)) and cfg.ensemble_size > 1


def _group_by_shape(chunk: list[tuple[int, int]], views: Sequence[_View]):
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, m in chunk:
        groups.setdefault(views[i].size, []).append((i, m))
    return groups.values()


# progress(views_done, views_total): called once before the first model call (0 done, so a
# caller can warn about the cost before it is paid) and after every finished view.
Progress = Callable[[int, int], None]


def _run_level(model: DepthModel, jobs: Sequence[_ImageJob], views: list[_View], cfg: InferenceConfig,
               tick: Callable[[], None]) -> None:
    """One level's views of several images through the model; each finished view is folded in."""
    for view, members in _stream_members(model, views, lambda v: jobs[v.image_index].pixels(v), cfg):
        fused = ensemble_depth(members.unsqueeze(0), cfg.ensemble_reduction)  # [1,h,w], members' device
        job = jobs[view.image_index]
        job.add(view, fused.depth[0].to(job.device), fused.uncertainty[0].to(job.device))
        tick()


def predict_images(
    images: Iterable[Any],
    model: DepthModel,
    config: InferenceConfig | Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> list[DepthResult]:
    """Predict depth for several images, sharing model batches across them; `progress` hears
    how many of their views are done (see `Progress`)."""
    cfg = inference_config(config)
    step_arguments(model, cfg.num_inference_steps)  # a model without steps fails before any work
    return _predict_images(images, model, cfg, progress)


@dataclass(frozen=True)
class ViewHooks:
    """A model's optional `view_size`, `resize_view` and `resize_label` (models/base.py)."""

    view_size: Callable[[int, int], tuple[int, int]] | None = None
    resize_view: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None
    resize_label: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None


def view_hooks(model: DepthModel) -> ViewHooks:
    """The model's view hooks; without `view_size` its global view is the image with the long
    side at the processing resolution, resized here, and labels are resized back here."""
    hooks = ViewHooks(*(getattr(model, name, None) for name in ("view_size", "resize_view", "resize_label")))
    if (hooks.view_size is None) != (hooks.resize_view is None):
        raise TypeError(f"{type(model).__name__} has only one of view_size and resize_view; they come together")
    return hooks


def _fusion_device(model: DepthModel) -> torch.device:
    """Where members arrive: the model's device when it keeps them there (predict_views),
    else the CPU. Ensembling, tile alignment and blending run there too, so a GPU actor's
    CPU does not sit between its model calls (~1.4 s of CPU per 12 MP tiled image)."""
    if hasattr(model, "predict_views"):
        return torch.device(getattr(model, "device", "cpu"))
    return torch.device("cpu")


def _predict_images(images: Iterable[Any], model: DepthModel, cfg: InferenceConfig,
                    progress: Progress | None = None) -> list[DepthResult]:
    res = int(model.processing_resolution)
    device = _fusion_device(model)
    hooks = view_hooks(model)

    # 1. + 2. Images -> float RGB tensors, each with its plan of views.
    jobs = []
    for idx, img in enumerate(images):
        t = image_to_tensor(img)  # [3,H,W]
        h, w = t.shape[1:]
        plan = plan_tiles(h, w, res, cfg.tiling, global_size=hooks.view_size(h, w) if hooks.view_size else None)
        jobs.append(_ImageJob(idx, t, plan, device, hooks))
    total, done = sum(job.plan.num_views for job in jobs), 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    if progress:
        progress(0, total)
    # 3. Level 0: the global views of every image.
    _run_level(model, jobs, [job.global_view() for job in jobs], cfg, tick)
    # 3. + 4. Tile levels, coarse to fine, each aligned to the level below.
    depth_levels = max((len(job.plan.levels) for job in jobs), default=0)
    for k in range(depth_levels):
        active = [job for job in jobs if k < len(job.plan.levels)]
        views = [v for job in active for v in job.start_level(k)]
        total = sum(job.num_views for job in jobs)  # less what the budget skipped
        _run_level(model, jobs, views, cfg, tick)
        for job in active:
            job.finish_level()
    # 5. Back to the image size.
    space = getattr(model, "output_space", "depth")
    if space not in ("depth", "disparity"):
        raise ValueError(f"{type(model).__name__}.output_space must be 'depth' or 'disparity', got {space!r}")
    members = "augmentations" if uses_augmentations(model, cfg) else "seeds"
    return [job.result(cfg, space, members) for job in jobs]


def predict_image(
    image: Any,
    model: DepthModel,
    config: InferenceConfig | Mapping[str, Any] | None = None,
) -> DepthResult:
    """Depth for one image: `.depth` float32 HxW in [0,1] (0 = near), `.uncertainty` >= 0."""
    return predict_images([image], model, config)[0]
