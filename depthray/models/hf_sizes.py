"""The network input size and resampling of a transformers depth checkpoint, as its image
processor computes them from `preprocessor_config.json` (pure: no torch, so `depthray plan`
reads the same rule the model runs with).

Two rules cover the families depthray runs (docs/models.md):

- DPT's (`DPTImageProcessor`: Depth Anything, DPT/MiDaS): per side scale = target / input;
  with `keep_aspect_ratio` the scale closest to 1 is used for both sides; each side is then
  rounded to a multiple of `ensure_multiple_of`. It depends on the size of the image it is
  given, so a view must be resized once, from its source region, never from a view already
  resized by another rule (640x480 at 518 -> 518x686, not the long side at 518).
- Depth Pro's (`DepthProImageProcessor`): always the configured height x width.

Resampling follows the processor too: the PIL processors resize uint8 images with PIL's
filters, which widen with the shrink factor (torch's `antialias=True` computes the same
kernels); Depth Pro's processor resizes float tensors with torch, without antialiasing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# PIL's resampling constants as preprocessor_config.json stores them.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}

# The processor classes whose preprocessing each rule reproduces; a checkpoint naming another
# class is refused rather than run with preprocessing nobody checked.
DPT_PROCESSORS = ("DPTImageProcessor", "DPTImageProcessorFast", "DPTImageProcessorPil", "DPTFeatureExtractor")
DEPTH_PRO_PROCESSORS = ("DepthProImageProcessor", "DepthProImageProcessorFast")


@dataclass(frozen=True)
class ViewRule:
    """How a checkpoint's processor turns an HxW image into the network's input."""

    height: int  # target size
    width: int
    keep_aspect_ratio: bool  # DPT: one scale, the one closest to 1, for both sides
    multiple: int  # sides rounded to multiples of this
    resample: str  # "bilinear" | "bicubic"
    antialias: bool  # PIL's filters widen when shrinking; Depth Pro's torch resize does not

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The network input size for an image (or tile) of height x width."""
        sh, sw = self.height / height, self.width / width
        if self.keep_aspect_ratio:
            if abs(1 - sw) < abs(1 - sh):
                sh = sw
            else:
                sw = sh
        return self._constrain(sh * height), self._constrain(sw * width)

    def _constrain(self, value: float) -> int:
        # The processor rounds to the nearest multiple and would return 0 for a side under
        # half a multiple (an image over ~74:1 at 518/14); depthray keeps one multiple there.
        return max(self.multiple, int(round(value / self.multiple)) * self.multiple)

    @property
    def side(self) -> int:
        """The long side of the target: depthray's processing resolution (tile size)."""
        return max(self.height, self.width)


def _target(size: Any, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return default
    if isinstance(size, int):
        return size, size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"preprocessor_config.json size {size!r}: expected height and width "
                     "(shortest_edge resizing is not what this model's processor does)")


def view_rule(model_type: str, pre: Mapping[str, Any], processing_resolution: int | None = None) -> ViewRule:
    """The rule of `model_type`'s processor configured by `pre` (preprocessor_config.json).

    `processing_resolution` replaces the configured target (height = width = it), as a
    `size=` passed to the processor would; it must be a multiple of `ensure_multiple_of`,
    or the rule would not give back the size it made (`ViewRule.size` of its own output).
    """
    kind = pre.get("image_processor_type") or pre.get("feature_extractor_type")
    if model_type == "depth_pro":
        expected, default, resample, antialias = DEPTH_PRO_PROCESSORS, (1536, 1536), 2, False
        keep, multiple = False, 1
    else:
        expected, default, resample, antialias = DPT_PROCESSORS, (384, 384), 3, True
        keep, multiple = bool(pre.get("keep_aspect_ratio", False)), int(pre.get("ensure_multiple_of") or 1)
        if pre.get("do_pad") and pre.get("size_divisor"):
            raise ValueError("preprocessor_config.json pads to multiples of size_divisor (do_pad): upstream's "
                             "output then covers the padding; depthray does not reproduce that")
    if kind is not None and kind not in expected:
        raise ValueError(f"preprocessor_config.json names {kind!r}; for model_type {model_type!r} depthray "
                         f"reproduces only {', '.join(expected)}")
    if not pre.get("do_resize", True):
        raise ValueError("preprocessor_config.json has do_resize false: the network would see each image at "
                         "its own size, which depthray's views do not reproduce")
    resample = pre.get("resample", resample)
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"preprocessor_config.json resample {resample!r}: depthray reproduces bilinear (2) "
                         "and bicubic (3)")
    height, width = _target(pre.get("size"), default)
    if processing_resolution is not None:
        res = int(processing_resolution)
        if res % multiple:
            raise ValueError(f"model.processing_resolution {res} must be a multiple of the checkpoint's "
                             f"ensure_multiple_of ({multiple})")
        height = width = res
    if height % multiple or width % multiple:
        raise ValueError(f"preprocessor_config.json size {height}x{width} is not a multiple of "
                         f"ensure_multiple_of ({multiple})")
    return ViewRule(height, width, keep, multiple, _PIL_RESAMPLE[resample], antialias)


def pixel_scale(pre: Mapping[str, Any]) -> float:
    """What views in [0,1] are multiplied by to be what the processor feeds after rescaling:
    1 for the usual rescale by 1/255 of uint8 pixels, 255 when rescaling is off."""
    if not pre.get("do_rescale", True):
        return 255.0
    return float(pre.get("rescale_factor", 1 / 255)) * 255.0
