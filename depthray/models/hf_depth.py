"""transformers depth models (`model: {kind: transformers, path: ...}`): any checkpoint
`AutoModelForDepthEstimation` loads (Depth Anything V2, DPT, Depth Pro, ...) behind the
depthray model interface (models/base.py).

What a checkpoint predicts is declared, never guessed downstream: `output_space` is
"disparity" (relative inverse depth: Depth Anything relative, DPT/MiDaS) or "depth"
(metric depth: Depth Pro, ZoeDepth, Depth Anything metric). Members are min-max normalised
to [0,1] in that space (disparity: 1 = near; depth: 0 = near), so ensembling and tile
alignment (affine fits) stay inside one space, and every output row says which it holds.

Preprocessing follows the checkpoint's `preprocessor_config.json` (mean/std, size,
keep_aspect_ratio, ensure_multiple_of) in torch, batched, so views of many images share a
call. The models are deterministic (seeds are ignored); predict.py ensembles them over
test-time augmentations instead (depthray/augment.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from depthray.models.base import check_views

log = logging.getLogger(__name__)

OUTPUT_SPACES = ("depth", "disparity")
# model_type -> what its depth head predicts, where the checkpoint does not say it itself.
_METRIC_TYPES = {"depth_pro": "depth", "zoedepth": "depth", "glpn": "depth"}
_RELATIVE_TYPES = {"depth_anything": "disparity", "dpt": "disparity"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def checkpoint_output_space(config: Any, declared: str | None = None) -> str:
    """What a transformers depth checkpoint predicts: `declared` (model.options.output_space)
    if given, else the checkpoint's own declaration (`depth_estimation_type`), else its
    model_type's known head; an unknown model is an error, not a guess."""
    if declared is not None:
        if declared not in OUTPUT_SPACES:
            raise ValueError(f"model.options.output_space must be one of {OUTPUT_SPACES}, got {declared!r}")
        return declared
    kind = getattr(config, "depth_estimation_type", None)
    if kind == "metric":
        return "depth"
    model_type = getattr(config, "model_type", "")
    if kind == "relative" or model_type in _RELATIVE_TYPES:
        return _RELATIVE_TYPES.get(model_type, "disparity")
    if model_type in _METRIC_TYPES:
        return _METRIC_TYPES[model_type]
    raise ValueError(
        f"transformers model_type {model_type!r}: depthray does not know whether it predicts "
        "depth or disparity; set model.options.output_space to 'depth' or 'disparity'")


class TransformersDepthModel:
    """An `AutoModelForDepthEstimation` with the depthray model interface."""

    deterministic = True  # members of one view are identical: ensemble over augmentations

    def __init__(self, net: torch.nn.Module, preprocessor: dict, *, output_space: str,
                 processing_resolution: int | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str = "transformers"):
        if output_space not in OUTPUT_SPACES:
            raise ValueError(f"output_space must be one of {OUTPUT_SPACES}, got {output_space!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = net.to(self.device, dtype).eval()
        self.output_space = output_space
        self.name = name
        size = preprocessor.get("size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        side = int(size.get("shortest_edge") or max(size.get("height", 0), size.get("width", 0)) or 518)
        self.fixed_size: tuple[int, int] | None = None
        if preprocessor.get("do_resize", True) and not preprocessor.get("keep_aspect_ratio", False) \
                and "height" in size and "width" in size:
            # e.g. Depth Pro, plain DPT: the network wants exactly this size (aspect ignored).
            self.fixed_size = (int(size["height"]), int(size["width"]))
        self.processing_resolution = int(processing_resolution or side)
        self.multiple = int(preprocessor.get("ensure_multiple_of") or preprocessor.get("size_divisor") or 1)
        mean = preprocessor.get("image_mean", [0.5, 0.5, 0.5]) if preprocessor.get("do_normalize", True) else [0.0] * 3
        std = preprocessor.get("image_std", [0.5, 0.5, 0.5]) if preprocessor.get("do_normalize", True) else [1.0] * 3
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

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
        space = checkpoint_output_space(config, output_space)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        torch_dtype = (torch.float16 if dev.type == "cuda" else torch.float32) if dtype == "auto" else _DTYPES[dtype]
        net = AutoModelForDepthEstimation.from_pretrained(folder, dtype=torch_dtype)
        model = cls(net, json.loads(pre_file.read_text()), output_space=space,
                    processing_resolution=processing_resolution, device=str(dev), dtype=torch_dtype,
                    name=name or str(folder))
        log.info("loaded %s (%s, predicts %s) on %s", model.name, config.model_type, space, dev)
        return model

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """The network's input size for an [h,w] view: fixed, or long side at the processing
        resolution with both sides multiples of the checkpoint's `ensure_multiple_of`."""
        if self.fixed_size is not None:
            return self.fixed_size
        res, m = self.processing_resolution, self.multiple
        nh, nw = h * res / max(h, w), w * res / max(h, w)
        return max(m, int(round(nh / m)) * m), max(m, int(round(nw / m)) * m)

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """[N,3,h,w] in [0,1] -> [N,h,w] in [0,1] (CPU) in `output_space`; seeds unused."""
        check_views(views, seeds)
        n, _, h, w = views.shape
        if n == 0:
            return torch.zeros((0, h, w))
        x = views.float().to(self.device)
        size = self.input_size(h, w)
        shrink = size[0] < h or size[1] < w
        x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=shrink)
        x = (x - self.mean.to(self.device)) / self.std.to(self.device)
        pred = self.net(pixel_values=x.to(self.dtype)).predicted_depth.float()  # [N,H',W']
        if pred.ndim == 4:
            pred = pred[:, 0]
        pred = F.interpolate(pred[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]  # [N,h,w]
        if not torch.isfinite(pred).all():
            return pred.cpu()  # predict.py turns non-finite members into an error, never a label
        flat = pred.reshape(n, -1)
        lo, hi = flat.min(1).values.view(n, 1, 1), flat.max(1).values.view(n, 1, 1)
        return ((pred - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0).cpu()


def build_tiny_depth_anything(out_dir: str | os.PathLike, seed: int = 0, size: int = 56) -> Path:
    """A random-weight Depth Anything checkpoint in transformers' published layout
    (config.json, model.safetensors, preprocessor_config.json), built offline."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=size, reshape_hidden_states=False,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
                                 depth_estimation_type="relative")
    out = Path(out_dir)
    DepthAnythingForDepthEstimation(config).save_pretrained(out)
    preprocessor = {"image_processor_type": "DPTImageProcessor", "do_resize": True, "keep_aspect_ratio": True,
                    "ensure_multiple_of": 14, "size": {"height": size, "width": size}, "resample": 3,
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_pad": False}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out
