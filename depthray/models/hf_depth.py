"""transformers depth models (`model: {kind: transformers, path: ...}`): Depth Anything
(relative and metric), DPT/MiDaS and Depth Pro checkpoints `AutoModelForDepthEstimation`
loads, behind the depthray model interface (models/base.py).

Each family's row (models/hf_families.py) says what its network predicts, what upstream's
post-processing makes of it and what depthray stores; members are min-max normalised to
[0,1] in that space (depth: 0 = near; disparity: 1 = near), so ensembling and tile alignment
(affine fits) stay inside one space, and every output row says which it holds.

Views are made as the checkpoint's image processor makes its input (models/hf_sizes.py):
`view_size` is the network input size its rule gives for a region, `resize_view` its
resampling, so predict.py resizes each image once, straight to that size. Normalisation and
the resize of tiles run in torch on the model's device, batched, so views of many images
share a call. The models are deterministic (seeds are ignored); predict.py ensembles them
over test-time augmentations instead (depthray/augment.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from depthray.models.base import check_views
from depthray.models.hf_families import OUTPUT_SPACES, Family, family_of
from depthray.models.hf_sizes import ViewRule, pixel_scale, view_rule
from depthray.models.hf_tiny import build_tiny_depth_anything  # noqa: F401  (its home before hf_tiny)
from depthray.models.kinds import TRANSFORMERS
from depthray.precision import resolve_device

log = logging.getLogger(__name__)

_DEFAULT_NORMALISATION = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # DPT's and Depth Pro's processor defaults


def checkpoint_output_space(config, declared: str | None = None) -> str:
    """What a transformers depth checkpoint's labels hold ("depth" | "disparity"), from its
    family's row; `declared` (model.options.output_space) is needed for an unknown model
    type and may not contradict a known one (models/hf_families.py)."""
    return family_of(config, declared).output_space


class TransformersDepthModel:
    """An `AutoModelForDepthEstimation` with the depthray model interface."""

    deterministic = True  # members of one view are identical: ensemble over augmentations
    kind = TRANSFORMERS  # its facts (dtype `auto`, no steps, checkpoint marker): models/kinds.py

    def __init__(self, net: torch.nn.Module, preprocessor: dict, *, family: Family, model_type: str,
                 processing_resolution: int | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str = "transformers"):
        if family.output_space not in OUTPUT_SPACES:
            raise ValueError(f"output_space must be one of {OUTPUT_SPACES}, got {family.output_space!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = net.to(self.device, dtype).eval()
        self.family = family
        self.output_space = family.output_space
        self.name = name
        self.rule: ViewRule = view_rule(model_type, preprocessor, processing_resolution)
        self.processing_resolution = self.rule.side
        mean, std = _DEFAULT_NORMALISATION
        if preprocessor.get("do_normalize", True):
            mean, std = preprocessor.get("image_mean", mean), preprocessor.get("image_std", std)
        else:
            mean, std = [0.0] * 3, [1.0] * 3
        scale = pixel_scale(preprocessor)
        # x_net = (view * scale - mean) / std, folded into one multiply-add on the device
        self._gain = (scale / torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1).to(self.device)
        self._bias = (-torch.tensor(mean, dtype=torch.float32) / torch.tensor(std)).view(1, 3, 1, 1).to(self.device)

    @classmethod
    def from_model_config(cls, folder: str | os.PathLike, m) -> "TransformersDepthModel":
        """Built from the `model:` section's settings this engine takes (models/kinds.py loads it)."""
        return cls.from_pretrained(folder, dtype=m.dtype, device=m.device, processing_resolution=m.processing_resolution,
                                   output_space=m.options.get("output_space"), name=m.path)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: str = "auto", device: str = "auto",
                        processing_resolution: int | None = None, output_space: str | None = None,
                        name: str | None = None) -> "TransformersDepthModel":
        import transformers
        from transformers import AutoConfig, AutoModelForDepthEstimation

        transformers.utils.logging.disable_progress_bar()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; not a transformers checkpoint")
        pre_file = folder / "preprocessor_config.json"
        if not pre_file.is_file():
            raise FileNotFoundError(f"{folder}: no preprocessor_config.json; its mean/std and input "
                                    "size are unknown, and guessing them would give wrong labels")
        config = AutoConfig.from_pretrained(folder)
        family = family_of(config, output_space)
        if not family.tested:
            log.warning("%s: model_type %r is not in depthray's table of transformers families; running it as "
                        "declared (%s), with DPT-style preprocessing; untested", folder, config.model_type,
                        family.output_space)
        dev = resolve_device(device)
        torch_dtype = cls.kind.torch_dtype(dtype, dev.type)
        net = AutoModelForDepthEstimation.from_pretrained(folder, dtype=torch_dtype)
        model = cls(net, json.loads(pre_file.read_text()), family=family, model_type=config.model_type,
                    processing_resolution=processing_resolution, device=str(dev), dtype=torch_dtype,
                    name=name or str(folder))
        log.info("loaded %s (%s, stores %s) on %s", model.name, family.name, family.output_space, dev)
        return model

    # ------------------------------------------------------------------ views
    def view_size(self, height: int, width: int) -> tuple[int, int]:
        """The network input size the checkpoint's processor gives an image (or tile) of
        height x width; a view already at it goes to the network unresized."""
        return self.rule.size(height, width)

    def resize_view(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[N,3,H,W] in [0,1] -> [N,3,h,w], resampled as the processor resamples."""
        if tuple(pixels.shape[-2:]) == tuple(size):
            return pixels
        out = F.interpolate(pixels, size, mode=self.rule.resample, align_corners=False,
                            antialias=self.rule.antialias)
        # PIL writes uint8: bicubic overshoot past black and white is clipped there
        return out.clamp_(0.0, 1.0) if self.rule.antialias else out

    def resize_label(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[N,h,w] finished labels -> [N,H,W] at the image size, as upstream's post-processing
        resamples its output (the family's kernel, no antialiasing)."""
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        return F.interpolate(maps[:, None], size, mode=self.family.output_resample, align_corners=False)[:, 0]

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """[N,3,h,w] in [0,1] -> [N,h,w] in [0,1] (CPU) in `output_space`; seeds unused."""
        check_views(views, seeds)
        n, _, h, w = views.shape
        if n == 0:
            return torch.zeros((0, h, w))
        x = self.resize_view(views.float().to(self.device), self.view_size(h, w))
        out = self.net(pixel_values=(x * self._gain + self._bias).to(self.dtype))
        values = self._to_output_space(out, (h, w))  # [N,h,w]
        if not torch.isfinite(values).all():
            return values.cpu()  # predict.py turns non-finite members into an error, never a label
        flat = values.reshape(n, -1)
        lo, hi = flat.min(1).values.view(n, 1, 1), flat.max(1).values.view(n, 1, 1)
        return ((values - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0).cpu()

    def _to_output_space(self, out, size: tuple[int, int]) -> torch.Tensor:
        """The network's raw map -> the family's output space at the view size [N,h,w], in the
        order upstream's post-processing takes (scale by W/f, resize, clamp)."""
        raw = out.predicted_depth.float()
        if raw.ndim == 4:
            raw = raw[:, 0]
        if self.family.conversion == "inverse-fov":
            fov = getattr(out, "field_of_view", None)
            if fov is not None:  # W / f = 2 tan(fov / 2): canonical -> metric inverse depth
                raw = raw * (2 * torch.tan(torch.deg2rad(fov.float()) / 2)).view(-1, 1, 1)
        if tuple(raw.shape[-2:]) != tuple(size):
            raw = F.interpolate(raw[:, None], size, mode=self.family.output_resample, align_corners=False)[:, 0]
        if self.family.conversion == "inverse-fov":
            return raw.clamp(1e-4, 1e4)
        return raw
