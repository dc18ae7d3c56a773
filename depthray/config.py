"""Typed job configuration: YAML in, validated dataclasses out.

Every section is a dataclass; unknown keys and wrong types are rejected once, up front,
with one message listing every problem, so a typo never reaches a GPU worker.
`--set a.b=c` overrides are parsed as YAML scalars (``--set inference.ensemble_size=3``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from depthray.config_build import build, flatten
from depthray.metric_config import METRIC_ENCODINGS, MetricConfig, validate_metric
from depthray.models.kinds import KINDS, TORCH_DTYPES


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""


@dataclass
class TilingConfig:
    mode: str = "auto"  # auto | on | off
    working_resolution: int = 0  # long side tiles are cut from; 0 = the image's own size
    overlap: float = 0.25  # fraction of a tile shared with its neighbour
    max_tiles: int = 64  # cap per image; working resolution shrinks to respect it
    # auto tiles only when the long side exceeds this multiple of the processing resolution
    auto_threshold: float = 1.5
    # how tiles are fused: pyramid-joint-split | pyramid-joint | pyramid-split | pyramid | align
    # | lowfreq | pyramid-lowfreq (docs/tiling.md)
    fusion: str = "pyramid-joint-split"
    # most views an image may spend, as a fraction of the plan's, in (0, 1] (1.0 = every tile):
    # finest-level tiles run where the level below shows depth detail (edges, thin structures)
    # and are skipped over planes, walls and sky, which keep the coarser estimate. `depthray
    # plan` shows the views it spends; what it costs in quality: docs/tiling.md
    budget: float = 1.0
    # tiles whose area in the level below has less depth detail than this (mean |depth - its
    # 5x5 box mean| / depth range; 0 on a plane) are skipped even within the budget; 0 = none
    detail_threshold: float = 0.0


@dataclass
class InferenceConfig:
    ensemble_size: int = 5
    # median (true median: mean of the two middle members at even sizes; uncertainty = MAD)
    # | mean (uncertainty = unbiased std); docs/ensembling.md
    ensemble_reduction: str = "median"
    seed: int = 0
    num_inference_steps: int | None = None  # None = checkpoint default
    batch_size: int = 8  # views per model call
    tiling: TilingConfig = field(default_factory=TilingConfig)


@dataclass
class ModelConfig:
    kind: str = "marigold"  # marigold | marigold-e2e | transformers (docs/models.md)
    path: str = "prs-eth/marigold-depth-v1-1"  # local dir | hub id | s3:// or any fsspec URL
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    variant: str | None = None  # checkpoint file variant: fp16 | bf16 | None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    processing_resolution: int | None = None  # None = checkpoint default
    cache_dir: str | None = None  # where remote checkpoints are copied (default ~/.cache/depthray)
    vae_decoder: str | None = None  # optional AutoencoderTiny folder/hub id for fast decoding
    compile: bool = False  # torch.compile UNet + VAE: faster steady state, ~1 min compile per actor
    factory: str | None = None  # "pkg.module:callable" returning any depth model
    options: dict = field(default_factory=dict)  # keyword arguments for the factory


@dataclass
class InputConfig:
    url: str = ""  # glob, brace range, list file (.txt) or folder; any fsspec URL
    # auto | webdataset | parquet | arrow | images. arrow: Arrow IPC files, as Hugging Face
    # datasets' save_to_disk writes them (auto: by the .arrow extension; in a folder holding
    # state.json, only the files it lists)
    format: str = "auto"
    # parquet / arrow: the image column, read by its type: encoded image bytes; a {bytes, path}
    # struct (datasets' Image(): the path is read when the bytes are null); or a string, the
    # path or URL of the image file
    image_column: str = "image"
    # parquet / arrow: what relative image paths resolve against (a folder path or URL);
    # None = the folder of the file that holds them. Absolute paths are local files; URLs
    # (s3://, https://, ...) are read with the storage settings.
    image_root: str | None = None
    # parquet / arrow: column with the sample key; None = "key" when the file has one, else
    # the image's path (no extension), else "{shard}/{row}" (unique across the dataset).
    # A column named here that the first file lacks stops the job before it starts.
    key_column: str | None = None
    # webdataset: which member is the image, as extensions in priority order. A multi-part
    # extension ("seg.png") matches only an entry spelled that way, never "png". None = jpg,
    # jpeg, png, webp, tif, tiff, bmp, gif, ppm, pgm, pnm, and a sample holding more than
    # one of them is an error row (ambiguous_image).
    image_member: list | None = None
    images_per_shard: int = 1000  # image folders: a folder is cut into sorted shards of this many
    keep_columns: list = field(default_factory=list)  # parquet / arrow: input columns copied to every output row
    max_pixels: int = 64_000_000  # larger images are rejected as errors (decompression bombs)
    min_side: int = 8  # smaller images are rejected as errors


@dataclass
class OutputConfig:
    url: str = ""
    format: str = "parquet"  # parquet | webdataset | delta (a Delta Lake table: one transaction per shard)
    include_image: bool = False  # webdataset: pass the input image through as {key}.{ext}, upright
    overwrite: bool = False  # relabel every shard (one at a time; old parts go when new ones commit)
    # One configuration per output (_jobs/config.json): true also accepts runs that differ only
    # in model.device / model.dtype as they resolve (CPU float32 labels beside GPU bfloat16 ones).
    allow_mixed_devices: bool = False
    # Most rows in one part file (a shard is written as parts). The write stage gathers this
    # many rows before it writes, so it is also how far commits lag the model: 128 rows are
    # ~120 MB of 640x480 labels, and a few seconds of a GPU pool's output (docs/scale.md).
    rows_per_part: int = 128
    # A run's lease on the output (_jobs/lease.json) without heartbeat for this long is
    # taken for a dead run's and taken over; a live one makes a second run stop at once.
    lease_timeout_s: float = 300.0


@dataclass
class ComputeConfig:
    # Who runs the stage chain: "ray" (tasks and an actor pool, one machine or a cluster) or
    # "local" (this process, one model, no Ray to start: small jobs, debugging, CI). Both
    # commit shards through the same ledger, manifests and lease.
    executor: str = "ray"
    address: str | None = None  # Ray address; None = start or join a local Ray
    num_actors: int | None = None  # fixed actor pool size; None = autoscaling min_actors..max_actors
    min_actors: int = 1  # autoscaling pool: actors kept even when idle
    max_actors: int | None = None  # autoscaling pool: most actors; None = as many as the cluster can reach
    num_gpus_per_actor: float | None = None  # None = 1 when GPUs exist, else 0
    num_cpus_per_actor: float = 1.0
    images_per_batch: int = 4  # images handed to an inference actor at once
    read_parallelism: int | None = None  # concurrent shard readers; None = Ray decides
    # A model call running longer than this is taken for a hang (a wedged GPU, a deadlocked
    # plug-in): the actor ends its process, Ray restarts it, and an image that hangs again on
    # its own becomes an error. None = 1800 s on GPU actors, off on CPU; 0 = off.
    batch_timeout_s: float | None = None
    # Start Ray's dashboard with a local Ray (joining a cluster keeps the cluster's own). Off:
    # its processes take a core for seconds while Ray starts (a local start took 9 s instead
    # of 19 s on a 2-core machine) and a one-machine job rarely needs it.
    dashboard: bool = False


@dataclass
class StorageConfig:
    endpoint_url: str | None = None  # custom S3 endpoint (MinIO, moto); also AWS_ENDPOINT_URL
    region: str | None = None
    anon: bool = False
    retries: int = 5
    timeout_s: float | None = None  # S3 connect/read timeout per request (None = botocore's 60 s)


@dataclass
class QualityConfig:
    max_uncertainty_mean: float | None = None  # images above are marked low confidence
    min_valid_fraction: float | None = None
    # a pixel counts as valid when its uncertainty is at most this (depth units, [0,1] range)
    max_pixel_uncertainty: float | None = None
    # `depthray run` exits 4 when this run's error rows are at least this fraction of the
    # images it took (errors are still committed). 1.0: only when every image failed.
    max_error_fraction: float = 1.0


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    # The labelling task: a module of the project's pipelines/ folder by name ("depth": read,
    # decode, infer, encode, write), or a path to a .py file declaring stages(cfg, run_id,
    # device_kind) as pipelines/depth.py does (copy it to declare another task).
    pipeline: str = "depth"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self, device_kind: str | None = None) -> dict[str, Any]:
        """What determines the depth values, flat (`model.dtype`, `inference.ensemble_size`, ...).

        `dtype: auto` and `device: auto` are given as what the model's kind runs them as on
        the kind of device it runs on (`device_kind`: "cpu" | "cuda"; None = the kind
        model.device names, else "cpu"; depthray/models/kinds.py): a CPU float32 run and a GPU
        half-precision run give different depths.
        """
        from depthray.models.kinds import MARIGOLD
        from depthray.precision import device_type

        model = dataclasses.asdict(self.model)
        model["device"] = device_type(model["device"], device_kind)
        # A factory is not handed model.dtype and picks its own; its rows keep the Marigold
        # row's reading of `auto`, as before (what it runs is the factory's to say).
        kind = KINDS[model["kind"]] if model["factory"] is None else MARIGOLD
        model["dtype"] = kind.dtype(model["dtype"], model["device"])
        inference = dataclasses.asdict(self.inference)
        tiling = inference["tiling"]
        if tiling["budget"] == 1.0 and tiling["detail_threshold"] == 0.0:  # skips no tile: the
            del tiling["budget"], tiling["detail_threshold"]  # hash of outputs made before the budget
        settings = {"labels": LABELS_VERSION, "model": model, "inference": inference}
        if self.pipeline != "depth":  # another task makes other labels; depth's hash stays as it was
            settings["pipeline"] = self.pipeline
            metric = self.metric.task_settings(model["device"])  # what metric labels are aligned to, how
            if metric is not None:
                settings["metric"] = metric
        return flatten(settings)

    def hash(self, device_kind: str | None = None) -> str:
        """Short hash of `settings(device_kind)`: stored with every row and manifest, so two
        configurations never mix unnoticed in one output."""
        payload = json.dumps(self.settings(device_kind), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# How depthray turns a model's output into a label, for the same settings. Bumped when a fix
# changes labels without a setting changing, so an output labelled before is refused rather
# than resumed into a mix (`labels: 1 -> 2`, relabel with output.overwrite). 2: transformers
# families as upstream's processors and post-processing (Depth Pro stored as disparity, was
# inverted), e2e-ft as its authors run it, the global view sized as diffusers sizes it.
LABELS_VERSION = 2


# How tiles are fused (depthray/tiling.py implements each; listed once, here).
FUSIONS = ("align", "lowfreq", "pyramid", "pyramid-lowfreq", "pyramid-split", "pyramid-joint",
           "pyramid-joint-split")

_CHOICES = {
    "inference.ensemble_reduction": ("median", "mean"),
    "inference.tiling.mode": ("auto", "on", "off"),
    "inference.tiling.fusion": FUSIONS,
    "model.dtype": ("auto", *TORCH_DTYPES),
    "model.kind": lambda: tuple(KINDS),  # read when validating: a kind registers once, in models/kinds.py
    "input.format": ("auto", "webdataset", "parquet", "arrow", "images"),
    "output.format": ("parquet", "webdataset", "delta"),
    "compute.executor": ("ray", "local"),
    "metric.encoding": METRIC_ENCODINGS,
}


# YAML 1.1 reads bare on/off as booleans; `tiling: {mode: off}` means the word.
_BOOL_WORDS = {"inference.tiling.mode": {True: "on", False: "off"}}


def _validate(cfg: Config, errors: list[str], require_io: bool) -> None:
    flat = flatten(cfg.to_dict())
    for key, allowed in _CHOICES.items():
        allowed = allowed() if callable(allowed) else allowed
        if flat[key] not in allowed:
            errors.append(f"{key}: must be one of {', '.join(allowed)}, got {flat[key]!r}")
    if not cfg.pipeline.strip():
        errors.append("pipeline: must name a pipeline (depth, or a path to a .py file)")
    inf = cfg.inference
    if inf.ensemble_size < 1:
        errors.append(f"inference.ensemble_size: must be >= 1, got {inf.ensemble_size}")
    if inf.batch_size < 1:
        errors.append(f"inference.batch_size: must be >= 1, got {inf.batch_size}")
    if inf.num_inference_steps is not None and inf.num_inference_steps < 1:
        errors.append("inference.num_inference_steps: must be >= 1 or null")
    if not 0.0 <= inf.tiling.overlap < 0.9:
        errors.append(f"inference.tiling.overlap: must be in [0, 0.9), got {inf.tiling.overlap}")
    if inf.tiling.working_resolution < 0:
        errors.append("inference.tiling.working_resolution: must be >= 0 (0 = native size)")
    if inf.tiling.max_tiles < 1:
        errors.append("inference.tiling.max_tiles: must be >= 1")
    if not 0.0 < inf.tiling.budget <= 1.0:
        errors.append(f"inference.tiling.budget: must be in (0, 1], got {inf.tiling.budget}")
    if not inf.tiling.detail_threshold >= 0.0:
        errors.append(f"inference.tiling.detail_threshold: must be >= 0, got {inf.tiling.detail_threshold}")
    if cfg.model.processing_resolution is not None and cfg.model.processing_resolution < 8:
        errors.append("model.processing_resolution: must be >= 8 or null")
    if cfg.model.factory is not None and ":" not in cfg.model.factory:
        errors.append(f"model.factory: expected 'package.module:callable', got {cfg.model.factory!r}")
    if cfg.compute.min_actors < 1 or (cfg.compute.max_actors is not None and cfg.compute.max_actors < cfg.compute.min_actors):
        errors.append("compute.min_actors/max_actors: need 1 <= min_actors <= max_actors")
    if cfg.model.factory is None and cfg.model.kind == "transformers":
        extra = sorted(set(cfg.model.options) - {"output_space"})
        if extra:
            errors.append(f"model.options: kind transformers takes only output_space, got {', '.join(extra)}")
        if cfg.model.options.get("output_space", "depth") not in ("depth", "disparity"):
            errors.append("model.options.output_space: must be depth or disparity, got "
                          f"{cfg.model.options['output_space']!r}")
    if cfg.model.factory is None and cfg.model.kind != "transformers" and cfg.model.options:
        errors.append(f"model.options: only read for model.factory and kind transformers, not kind {cfg.model.kind}")
    if cfg.compute.batch_timeout_s is not None and cfg.compute.batch_timeout_s < 0:
        errors.append("compute.batch_timeout_s: must be >= 0 (0 = off) or null (auto)")
    if not 0.0 < cfg.quality.max_error_fraction <= 1.0:
        errors.append("quality.max_error_fraction: must be in (0, 1] (1 = fail only when every image failed)")
    if cfg.output.rows_per_part < 1:
        errors.append("output.rows_per_part: must be >= 1")
    if cfg.output.lease_timeout_s <= 0:
        errors.append("output.lease_timeout_s: must be > 0 (seconds without heartbeat before a lease is taken over)")
    _validate_input(cfg.input, errors)
    validate_metric(cfg.metric, cfg.pipeline, errors)
    if require_io:
        if not cfg.input.url:
            errors.append("input.url: required (a glob, brace range, list file or folder)")
        if not cfg.output.url:
            errors.append("output.url: required")


def _validate_input(inp: InputConfig, errors: list[str]) -> None:
    if isinstance(inp.image_member, str):
        inp.image_member = [inp.image_member]
    for name in ("image_member", "keep_columns"):
        value = getattr(inp, name)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            errors.append(f"input.{name}: expected a list of names, got {value!r}")
    if isinstance(inp.image_member, list):
        inp.image_member = [v.lower().lstrip(".") for v in inp.image_member]
        if not inp.image_member:
            errors.append("input.image_member: give at least one extension (e.g. [jpg, png]) or leave it out")
    if inp.image_root is not None and not inp.image_root.strip():
        errors.append("input.image_root: a folder path or URL, or null (the folder of each input file)")
    if inp.images_per_shard < 1:
        errors.append("input.images_per_shard: must be >= 1")


def model_kinds() -> tuple[str, ...]:
    """The `model.kind` values depthray knows (one list: validation, checks and docs use it)."""
    return tuple(KINDS)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=c`` strings to a nested dict; values are parsed as YAML scalars."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. inference.ensemble_size=3")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any] | None, *, require_io: bool = False) -> Config:
    """Build and validate a Config; raises ConfigError listing every problem."""
    errors: list[str] = []
    cfg = build(Config, dict(data or {}), "", errors, _BOOL_WORDS)
    if not errors:
        _validate(cfg, errors, require_io)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, require_io: bool = True
) -> Config:
    """Read a YAML file (or nothing), apply ``--set`` overrides, validate."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    return config_from_dict(data, require_io=require_io)


def inference_config(value: InferenceConfig | Mapping[str, Any] | None) -> InferenceConfig:
    """Accept the `inference:` section as an object, a plain dict, or None (defaults)."""
    if value is None:
        return InferenceConfig()
    if isinstance(value, InferenceConfig):
        return value
    return config_from_dict({"inference": dict(value)}).inference


def model_config(value: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Accept the `model:` section as an object or a plain dict."""
    if isinstance(value, ModelConfig):
        return value
    return config_from_dict({"model": dict(value)}).model
