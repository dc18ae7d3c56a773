"""The job's stage chain as a plain value: what runs, in which order, with which settings.

`job_stages(cfg)` is the only place the chain read -> decode -> infer -> encode -> write is
written down. Ray (depthray/job/ray_graph.py) and the in-process runner
(depthray/job/local.py) both execute this list unchanged, so a benchmark, `depthray
predict` and a cluster job cannot drift apart. Nothing here imports Ray.

Every stage maps an Arrow table of rows to a table of rows (`read` yields several: a shard
streams). `infer` is a class: it is built once per worker (it loads the model) and called
per batch; the rest are plain functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from depthray.config import Config
from depthray.io.codecs import encode_batch
from depthray.io.decode import decode_batch
from depthray.io.sinks import write_batch
from depthray.io.sources import Shard, read_shards
from depthray.job.predictor import DepthPredictor

STAGE_NAMES = ("read", "decode", "infer", "encode", "write")


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]  # fn(table, **kwargs) -> table | iterator of tables; or a class
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None  # rows per call; None = whatever block arrives
    stateful: bool = False  # fn is a class: built once per worker with kwargs, then called

    def make(self) -> Callable[[Any], Any]:
        """The per-batch callable: the built class, or fn with its settings bound."""
        if self.stateful:
            return self.fn(**self.kwargs)
        return lambda table: self.fn(table, **self.kwargs)


def model_label(cfg: Config) -> str:
    """What the `model` column says: the checkpoint path or the factory."""
    return cfg.model.factory or cfg.model.path


def job_stages(cfg: Config, run_id: str = "", device_kind: str | None = None) -> list[Stage]:
    """The five stages of a job described by `cfg`, in order; `device_kind` ("cpu" | "cuda")
    is where the infer stage runs (it resolves `auto` settings in the config hash)."""
    keep_input = cfg.output.format == "webdataset" and cfg.output.include_image
    return [
        Stage("read", read_shards, {"cfg": cfg.input, "storage": cfg.storage}, batch_size=1),
        Stage("decode", decode_batch, {"cfg": cfg.input, "keep_input": keep_input}),
        Stage("infer", DepthPredictor, {"model": cfg.model, "inference": cfg.inference, "storage": cfg.storage,
                                        "run_id": run_id, "timeout_s": cfg.compute.batch_timeout_s},
              batch_size=cfg.compute.images_per_batch, stateful=True),
        Stage("encode", encode_batch, {"quality": cfg.quality}),
        Stage("write", write_batch, {"cfg": cfg.output, "storage": cfg.storage, "model": model_label(cfg),
                                     "config_hash": cfg.hash(device_kind), "run_id": run_id},
              batch_size=cfg.output.rows_per_part),
    ]


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def shard_items(shards: list[Shard]) -> list[dict[str, str]]:
    """The read stage's input rows: one per shard."""
    return [{"name": s.name, "url": s.url, "format": s.format} for s in shards]
