"""Per transformers model type: what the network's `predicted_depth` holds, what upstream's
`post_process_depth_estimation` makes of it, and what depthray stores. One row per family,
each held by a conformance test (tests/conformance/test_transformers.py; docs/models.md has
the table). Orientation comes from this table only, never from a guess downstream: depth is
stored with 0 = near, disparity with 1 = near (docs/models.md "Output space").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OUTPUT_SPACES = ("depth", "disparity")


@dataclass(frozen=True)
class Family:
    name: str
    raw: str  # what the head's `predicted_depth` holds
    upstream: str  # what the processor's post-processing returns
    output_space: str  # what depthray stores: "depth" (0 = near) | "disparity" (1 = near)
    # raw -> output_space: "same" (min-max normalised as it is) | "inverse-fov" (Depth Pro:
    # clamp(raw * 2 tan(fov / 2), 1e-4, 1e4), the inverse depth upstream's post-processing
    # resamples and then inverts; depthray keeps it inverse, docs/models.md says why)
    conversion: str
    # how upstream resizes the raw map to the image: "bicubic" (DPT, no antialias) | "bilinear"
    output_resample: str
    test: str  # the test that holds the row (tests/conformance/test_transformers.py)
    tested: bool = True


FAMILIES = {
    ("depth_anything", "relative"): Family(
        "Depth Anything (relative)", "relative inverse depth", "the raw map, bicubic-resized to the image",
        "disparity", "same", "bicubic", "test_family_matches_the_transformers_pipeline[depth_anything-*]"),
    ("depth_anything", "metric"): Family(
        "Depth Anything (metric)", "metric depth (sigmoid x max_depth)", "the raw map, bicubic-resized to the image",
        "depth", "same", "bicubic", "test_family_matches_the_transformers_pipeline[depth_anything_metric-*]"),
    ("dpt", None): Family(
        "DPT / MiDaS", "relative inverse depth", "the raw map, bicubic-resized to the image",
        "disparity", "same", "bicubic", "test_family_matches_the_transformers_pipeline[dpt-*]"),
    ("depth_pro", None): Family(
        "Depth Pro", "canonical inverse depth (x W/f = metric inverse depth)",
        "depth = 1 / clamp(raw x W/f, 1e-4, 1e4), the inverse depth bilinear-resized to the image first",
        "disparity", "inverse-fov", "bilinear", "test_depth_pro_matches_the_authors_inference[*]"),
}

# Families depthray recognises and will not run, with the reason (raised at load).
REFUSED = {
    "zoedepth": "ZoeDepth's processor pads each image by reflection (by an amount set by the image's own "
                "size) and its post-processing crops the padding off again (and may average a flipped "
                "pass); depthray's views do not reproduce that, and upstream's post-processing needs "
                "torchvision, so there is no reference to test against here",
    "glpn": "GLPN's processor runs the network at the image's own size (rounded down to multiples of 32), "
            "with no target size; depthray's views are at a processing resolution with tiles, which is "
            "not what upstream does and is not tested",
}


def untested_family(output_space: str) -> Family:
    """A model type not in the table, run as its owner declared (model.options.output_space):
    the raw map min-max normalised in that space, DPT-style preprocessing. Untested."""
    return Family("declared", "unknown", "unknown", output_space, "same", "bicubic", "", tested=False)


def family_of(config: Any, declared: str | None = None) -> Family:
    """The row for a checkpoint's config (`model_type`, `depth_estimation_type`).

    `declared` (model.options.output_space) may confirm a known family's space but never
    contradict it: storing a relative inverse depth as depth would invert every label.
    An unknown model type needs it; a refused one is an error whatever it says.
    """
    if declared is not None and declared not in OUTPUT_SPACES:
        raise ValueError(f"model.options.output_space must be one of {OUTPUT_SPACES}, got {declared!r}")
    model_type = getattr(config, "model_type", "")
    if model_type in REFUSED:
        raise ValueError(f"transformers model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    # "relative" is DepthAnythingConfig's default, what a config.json without the key loads as
    estimation = getattr(config, "depth_estimation_type", "relative") if model_type == "depth_anything" else None
    if model_type == "depth_anything" and estimation not in ("relative", "metric"):
        raise ValueError(f"depth_anything checkpoint with depth_estimation_type {estimation!r}: "
                         "expected 'relative' or 'metric'")
    family = FAMILIES.get((model_type, estimation))
    if family is None:
        if declared is None:
            raise ValueError(
                f"transformers model_type {model_type!r}: depthray does not know whether it predicts "
                "depth or disparity; set model.options.output_space to 'depth' or 'disparity'")
        return untested_family(declared)
    if declared is not None and declared != family.output_space:
        raise ValueError(
            f"model.options.output_space {declared!r} contradicts model_type {model_type!r}: its network "
            f"predicts {family.raw} and upstream's post-processing returns {family.upstream}, which "
            f"depthray stores as {family.output_space}")
    return family


# Families whose post-processed output is depth in metres: what pipelines/metric_depth.py may
# align labels to (metric.reference_model; models/hf_metric.py runs them). A relative family
# is refused there: aligned to relative depth, a label would read as metres and be wrong.
METRIC_REFERENCES = {
    ("depth_anything", "metric"): "Depth Anything (metric)",
    ("zoedepth", None): "ZoeDepth",
    ("depth_pro", None): "Depth Pro",
}


def metric_reference_family(config: Any) -> str:
    """The metric family of a checkpoint's config (an object or config.json's dict), or a
    ValueError saying why its output is not depth in metres."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    model_type = get("model_type", "")
    estimation = get("depth_estimation_type", "relative") if model_type == "depth_anything" else None
    name = METRIC_REFERENCES.get((model_type, estimation))
    if name is None:
        what = f"depth_anything with depth_estimation_type {estimation!r}" if estimation else repr(model_type)
        raise ValueError(f"{what} is not a metric depth model: its output has no unit, and labels aligned "
                         f"to it would not be metres (metric references: {', '.join(METRIC_REFERENCES.values())})")
    if model_type == "depth_pro" and not get("use_fov_model", False):
        raise ValueError("a Depth Pro checkpoint without its field-of-view head (use_fov_model false): "
                         "transformers' post-processing then leaves its depth unscaled, not metres")
    return name
