"""The job's stage chain as a plain value: what runs, in which order, with which settings.

Each stage of the job package is built here from a config (`read_stage`, ..., `write_stage`);
a pipeline (pipelines/depth.py: read -> decode -> infer -> encode -> write) lists them in
order, and `job_stages(cfg)` returns the list of the pipeline the config names. Ray
(depthray/job/ray_graph.py) and the in-process runner (depthray/job/local.py) both execute
that list unchanged, so a benchmark, `depthray predict` and a cluster job cannot drift
apart. Nothing here imports Ray.

Every stage maps an Arrow table of rows to a table of rows (`read` yields several: a shard
streams). `infer` is a class: it is built once per worker (it loads the model) and called
per batch; the rest are plain functions.

How a stage runs (task or actor, memory, batches, blocks) is said by the stage itself, in
its execution hints below; an executor applies them without knowing any stage by name, so
a new stage (another label, another model) states what it needs here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from depthray.config import Config
from depthray.io.codecs import encode_batch
from depthray.io.decode import decode_batch
from depthray.io.metric_labels import align_batch
from depthray.io.metric_reference import align_reference_batch
from depthray.io.sinks import write_batch
from depthray.io.sources import Shard, read_shards
from depthray.job.predictor import DepthPredictor

STAGE_NAMES = ("read", "decode", "infer", "encode", "write")


# What a read or decode task reserves. Decoded pixels take memory; saying so keeps Ray from
# packing too many decode tasks on one node. Read asks the same, so read and decode (equal
# requests) fuse with each other and, unlike the inference actor's request, never fuse into
# it (Ray fuses operators with equal resource requests): that would put CPU decoding on the
# GPU actor's critical path.
DECODED_PIXELS_MEMORY = 256 << 20


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]  # fn(table, **kwargs) -> table | iterator of tables; or a class
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # rows per call; None = whatever block arrives
    stateful: bool = False  # fn is a class: built once per worker with kwargs, then called
    # -- execution hints: what an executor that spreads work (Ray) must know; the local
    #    runner needs none of them (one process, batches of batch_size).
    # Bytes one task needs: the scheduler reserves them, so a node is not given more tasks
    # than its memory holds (and see DECODED_PIXELS_MEMORY on fusion). None: no reservation.
    memory: int | None = None
    # At most this many tasks of the stage at once (compute.read_parallelism: input storage
    # may throttle many concurrent readers). None: the executor decides.
    max_tasks: int | None = None
    # The stage runs on the job's actor pool, whose size and per-actor GPUs and CPUs are the
    # cluster's business (ray_graph.resolve_resources), not the stage's: the costly state
    # (a model) lives once per actor and the pool grows onto new GPU nodes. Needs `stateful`.
    actor_pool: bool = False
    # Cut the rows into blocks of one batch (batch_size rows) before this stage, instead of
    # whole shards: a shard's rows spread over every actor of the pool (the ledger still
    # commits the shard as one unit), and at the tail no actor sits on a shard's worth of
    # queued rows while others idle.
    blocks_of_one_batch: bool = False
    # Where the stage runs without a GPU, call it once per block (with blocks_of_one_batch:
    # one batch of one shard). Otherwise Ray bundles a shard's short last block with the next
    # shard's rows, and which images share a model batch moves depth values by ~1e-5. Ray
    # insists on a batch size for GPU actors; there a batch may span two shards, which the
    # crash bookkeeping allows (rows are named by shard and key).
    one_call_per_block_on_cpu: bool = False

    def __post_init__(self) -> None:
        if self.actor_pool and not self.stateful:
            raise ValueError(f"stage {self.name!r}: an actor pool runs a class (stateful), not a function")
        if self.actor_pool and self.max_tasks:
            raise ValueError(f"stage {self.name!r}: max_tasks limits tasks; the pool's size is compute's")

    def make(self) -> Callable[[Any], Any]:
        """The per-batch callable: the built class, or fn with its settings bound."""
        if self.stateful:
            return self.fn(**self.kwargs)
        return lambda table: self.fn(table, **self.kwargs)


def model_label(cfg: Config) -> str:
    """What the `model` column says: the checkpoint path or the factory."""
    return cfg.model.factory or cfg.model.path


def job_stages(cfg: Config, run_id: str = "", device_kind: str | None = None) -> list[Stage]:
    """The stages of the labelling task `cfg.pipeline` names (pipelines/depth.py by default),
    in order; `device_kind` ("cpu" | "cuda") is where the infer stage runs (it resolves
    `auto` settings in the config hash)."""
    from depthray.job.pipelines import load_pipeline

    return load_pipeline(cfg.pipeline)(cfg, run_id, device_kind)


# The job package's stages, each built from a config: pipelines list them in order.


def read_stage(cfg: Config, sparse: bool = False) -> Stage:
    """Shards -> sample rows (key, encoded image, where it came from). `sparse`: each
    WebDataset sample's `metric.member`, or each Parquet/Arrow row's `metric.column`, goes
    along too (a sample without it: an error row)."""
    kwargs = {"cfg": cfg.input, "storage": cfg.storage}
    if sparse:
        kwargs.update(sparse_member=cfg.metric.member, sparse_column=cfg.metric.column)
    return Stage("read", read_shards, kwargs, batch_size=1,
                 memory=DECODED_PIXELS_MEMORY, max_tasks=cfg.compute.read_parallelism or None)


def decode_stage(cfg: Config) -> Stage:
    """Encoded images -> RGB pixels as displayed (bad images become error rows)."""
    keep_input = cfg.output.format == "webdataset" and cfg.output.include_image
    return Stage("decode", decode_batch, {"cfg": cfg.input, "keep_input": keep_input},
                 memory=DECODED_PIXELS_MEMORY, max_tasks=cfg.compute.read_parallelism or None)


def infer_stage(cfg: Config, run_id: str = "", reference: bool = False) -> Stage:
    """Pixels -> depth and uncertainty maps, on the actor pool (the model loads once per actor).
    `reference`: the actor also runs `metric.reference_model` on each image (`reference_f32`)."""
    kwargs = {"model": cfg.model, "inference": cfg.inference, "storage": cfg.storage,
              "run_id": run_id, "timeout_s": cfg.compute.batch_timeout_s}
    if reference:
        kwargs["reference"] = cfg.metric
    return Stage("infer", DepthPredictor, kwargs,
                 batch_size=cfg.compute.images_per_batch, stateful=True, actor_pool=True,
                 blocks_of_one_batch=True, one_call_per_block_on_cpu=True)


def metric_stage(cfg: Config) -> Stage:
    """Relative maps + the sample's sparse metric depth (or the reference model's map, with
    `metric.reference_model`) -> metric depth PNG and the fit (meta.metric), per image on the
    CPU (~20 ms at 192x256 with ~2500 points); rows that cannot be aligned (member
    unreadable, another size) become error rows."""
    return Stage("metric", align_reference_batch if cfg.metric.reference_model else align_batch, {"cfg": cfg.metric})


def encode_stage(cfg: Config) -> Stage:
    """Maps -> 16-bit PNGs and the quality verdict."""
    return Stage("encode", encode_batch, {"quality": cfg.quality})


def write_stage(cfg: Config, run_id: str = "", device_kind: str | None = None, metric: bool = False) -> Stage:
    """Rows -> staged parts of the output (and `_errors/`), acknowledged to the ledger.
    `metric`: the rows carry metric depth (Parquet parts get a `metric_depth` column)."""
    kwargs = {"cfg": cfg.output, "storage": cfg.storage, "model": model_label(cfg),
              "config_hash": cfg.hash(device_kind), "run_id": run_id}
    if metric:
        kwargs["metric"] = True
    return Stage("write", write_batch, kwargs, batch_size=cfg.output.rows_per_part)


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def shard_items(shards: list[Shard]) -> list[dict[str, str]]:
    """The read stage's input rows: one per shard."""
    return [{"name": s.name, "url": s.url, "format": s.format} for s in shards]
