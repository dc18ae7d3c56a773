"""A transformers metric depth model as the reference of pipelines/metric_depth.py
(`metric.reference_model`; docs/metric.md): its depth in metres at the image's size, per
image, as transformers' depth-estimation pipeline computes it.

Unlike models/hf_depth.py (labels: min-max normalised views, tiles, ensembles), the map
here keeps its unit, so it is made by upstream's own code wherever it runs: the
checkpoint's image processor on the image, the network, and the processor's
`post_process_depth_estimation(outputs, [(height, width)])`, called as the pipeline calls
it (for ZoeDepth that size is the source size, whose padding it crops off). Where
transformers' Depth Pro processor cannot load (it needs torchvision), `DepthProSteps`
takes its place: the same float operations (rescale and normalise, resize without
antialiasing; W/f scaling, resize, 1 / clamp), tested against the authors' inference.
Only metric families load (models/hf_families.py: `metric_reference_family`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from depthray.models.hf_families import metric_reference_family
from depthray.models.kinds import TRANSFORMERS
from depthray.precision import resolve_device

log = logging.getLogger(__name__)

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in preprocessor_config.json -> torch modes


class DepthProSteps:
    """Depth Pro's image processor and post-processing (transformers' DepthProImageProcessor,
    which imports torchvision) as plain torch: x * rescale_factor, (x - mean) / std, then
    the resize to `size` without antialiasing; after the network, inverse depth x W / f
    (f from the predicted field of view), resized to the image, depth = 1 / clamp(1e-4, 1e4)."""

    def __init__(self, pre: dict):
        if pre.get("resample", 2) not in _RESAMPLE:
            raise ValueError(f"Depth Pro processor: resample {pre.get('resample')!r} not supported "
                             f"(one of {sorted(_RESAMPLE)})")
        self.mode = _RESAMPLE[pre.get("resample", 2)]
        self.size = (pre["size"]["height"], pre["size"]["width"]) if pre.get("do_resize", True) else None
        self.rescale = pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0
        norm = pre.get("do_normalize", True)
        self.mean = torch.tensor(pre.get("image_mean", [0.5] * 3) if norm else [0.0] * 3).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", [0.5] * 3) if norm else [1.0] * 3).view(1, 3, 1, 1)

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        x = torch.from_numpy(np.array(images, np.uint8)).permute(2, 0, 1)[None].float()
        x = (x * self.rescale - self.mean) / self.std
        if self.size is not None:
            x = F.interpolate(x, self.size, mode=self.mode, align_corners=False, antialias=False)
        return {"pixel_values": x}

    def post_process_depth_estimation(self, outputs, target_sizes) -> list[dict]:
        if outputs.field_of_view is None:
            raise ValueError("Depth Pro gave no field of view: its depth cannot be made metric")
        results = []
        for depth, fov, (h, w) in zip(outputs.predicted_depth, outputs.field_of_view, target_sizes):
            depth = depth * w / (0.5 * w / torch.tan(0.5 * torch.deg2rad(fov)))
            depth = F.interpolate(depth[None, None], (h, w), mode=self.mode, align_corners=False)[0, 0]
            results.append({"predicted_depth": 1.0 / torch.clamp(depth, min=1e-4, max=1e4)})
        return results


def _processor(folder: Path, family: str):
    """The checkpoint's image processor as AutoImageProcessor loads it (the PIL backend where
    torchvision is missing), or DepthProSteps where Depth Pro's cannot load."""
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    if family == "ZoeDepth" and not is_torchvision_available():
        raise ImportError(f"{folder}: ZoeDepth's post-processing in transformers needs torchvision (pip install "
                          "torchvision matching torch)")
    try:
        return AutoImageProcessor.from_pretrained(folder)
    except ImportError:
        if family != "Depth Pro":
            raise
        log.info("%s: transformers' Depth Pro processor needs torchvision; using its steps in torch", folder)
        return DepthProSteps(json.loads((folder / "preprocessor_config.json").read_text()))


class MetricReference:
    """A metric depth checkpoint: `__call__(image)` is its depth in metres at the image size."""

    def __init__(self, net: torch.nn.Module, processor, family: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, name: str = "reference"):
        self.device, self.dtype = torch.device(device), dtype
        self.net = net.to(self.device, dtype).eval()
        self.processor, self.family, self.name = processor, family, name

    @classmethod
    def from_pretrained(cls, folder, *, dtype: str = "auto", device: str = "auto",
                        name: str | None = None) -> "MetricReference":
        import transformers
        from transformers import AutoConfig, AutoModelForDepthEstimation

        transformers.utils.logging.disable_progress_bar()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; not a transformers checkpoint")
        family = metric_reference_family(AutoConfig.from_pretrained(folder))
        dev = resolve_device(device)
        torch_dtype = TRANSFORMERS.torch_dtype(dtype, dev.type)
        processor = _processor(folder, family)  # first: what it cannot run is said before the weights load
        net = AutoModelForDepthEstimation.from_pretrained(folder, dtype=torch_dtype)
        model = cls(net, processor, family, str(dev), torch_dtype, name or str(folder))
        log.info("loaded metric reference %s (%s) on %s", model.name, family, dev)
        return model

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 [H,W,3] -> float32 [H,W] depth in metres (what the model says: NaN, 0
        or negative values are left for the aligner to drop and count)."""
        from PIL import Image

        h, w = image.shape[:2]
        inputs = self.processor(images=Image.fromarray(image), return_tensors="pt")
        out = self.net(pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        # post-processing in float32 (half-precision outputs would be resized and inverted in half)
        out = SimpleNamespace(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()})
        depth = self.processor.post_process_depth_estimation(out, [(h, w)])[0]["predicted_depth"]
        depth = depth.float().cpu().numpy().reshape(depth.shape[-2:])
        if depth.shape != (h, w):
            raise ValueError(f"{self.name}: reference map is {depth.shape[1]}x{depth.shape[0]}, the image {w}x{h}")
        return depth


def load_reference(path: str, dtype: str = "auto", device: str = "auto", storage=None) -> MetricReference:
    """`metric.reference_model` (local folder, hub id or URL) on `device`."""
    from depthray.io.fs import storage_options
    from depthray.models.checkpoints import resolve_checkpoint

    options = storage_options(path, storage) if storage is not None else None
    folder = resolve_checkpoint(path, None, None, options)
    return MetricReference.from_pretrained(folder, dtype=dtype, device=device, name=path)
