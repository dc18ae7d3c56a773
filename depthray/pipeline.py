"""The distributed job: a Ray Data graph from input shards to depth shards, and its driver.

    list + plan  -> read (tasks) -> decode (tasks) -> infer (actor pool, GPU)
                 -> encode (tasks) -> write (tasks) -> acks -> driver commits manifests

Every stage turns a bad row into an error record and never raises for one, so Ray Data's
`max_errored_blocks` (kept at 0) can never drop rows silently. The driver consumes only
the write stage's small acknowledgements and writes a shard's manifest once all of its
rows have landed (see depthray/stats.py and depthray/io/manifest.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from depthray import __version__
from depthray.config import Config, ConfigError
from depthray.io import records
from depthray.io.codecs import encode_batch
from depthray.io.decode import decode_batch
from depthray.io.manifest import ManifestStore, plan_shards
from depthray.io.sinks import write_batch
from depthray.io.sources import list_shards, read_shards
from depthray.stats import ShardTracker

log = logging.getLogger(__name__)


def model_label(cfg: Config) -> str:
    return cfg.model.factory or cfg.model.path


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError older torch / other backends raise."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class WorkerCrashed(Exception):
    """An image whose prediction killed the worker process on every attempt."""


class WorkerHung(WorkerCrashed):
    """An image whose prediction ran past compute.batch_timeout_s on every attempt."""


DEFAULT_GPU_BATCH_TIMEOUT_S = 1800.0


class InFlight:
    """Node-local note of the batch an actor is working on, so the restarted actor that Ray
    hands the same batch again can tell the last attempt killed its process (segfault,
    host OOM killer) and find the image that did it.

    attempt 1: whole batch; dies -> attempt 2: one image at a time, the current key noted
    before each; dies -> attempt 3: the noted key is an error ("crashed"), the rest run.
    Without this an image that always kills the process would be retried forever. A hang
    takes the same path: the watchdog notes it (`mark_hung`) and ends the process.
    """

    def __init__(self, run_id: str, rows: list[dict]):
        import hashlib
        import tempfile

        ids = "\n".join(sorted(f"{r['source']}\t{r['key']}" for r in rows))
        digest = hashlib.sha1(f"{run_id}\n{ids}".encode()).hexdigest()[:20]
        self.path = os.path.join(tempfile.gettempdir(), "depthray-inflight", f"{digest}.json")
        try:
            with open(self.path) as f:
                self.state = json.load(f)
        except (OSError, ValueError):
            self.state = {"attempt": 0, "current": None, "crashed": [], "hung": [], "hanging": False}
        self.state["attempt"] += 1
        if self.state["current"] is not None:  # the last attempt died on this image
            self.state["crashed"].append(self.state["current"])
            if self.state.get("hanging"):
                self.state.setdefault("hung", []).append(self.state["current"])
            self.state["current"] = None
        self.state["hanging"] = False
        self.save()

    @property
    def retried(self) -> bool:
        return self.state["attempt"] > 1

    def crashed(self, row: dict) -> WorkerCrashed | None:
        """Why `row` must not run again (it killed or hung its worker twice), else None."""
        if row["key"] not in self.state["crashed"]:
            return None
        if row["key"] in self.state.get("hung", []):
            limit = float(self.state.get("timeout_s") or 0)
            return WorkerHung(f"prediction ran past compute.batch_timeout_s={limit:g} s twice (the "
                              "model call hung; its worker was restarted); skipped")
        return WorkerCrashed("the worker process died while predicting this image, twice; skipped")

    def mark_hung(self, timeout_s: float) -> None:
        self.state["hanging"] = True
        self.state["timeout_s"] = timeout_s
        self.save()

    def working_on(self, row: dict | None) -> None:
        self.state["current"] = row["key"] if row else None
        self.save()

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def done(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass


class DepthPredictor:
    """Ray Data actor: loads the model once, predicts depth for batches of decoded rows.

    A batch that fails is retried one image at a time, so one bad image becomes one error
    record instead of failing its neighbours (or the job). A batch whose previous attempt
    killed the actor's process is also run one image at a time (see InFlight).
    """

    def __init__(self, model_spec: dict, inference: Any, storage: Any, run_id: str = "",
                 timeout_s: float | None = None):
        from depthray.io.fs import storage_options
        from depthray.models.loading import load_model

        self.model = load_model(model_spec, storage_options(model_spec["path"], storage))
        self.inference = inference
        self.run_id = run_id
        if timeout_s is None:
            on_gpu = getattr(getattr(self.model, "device", None), "type", "cpu") == "cuda"
            timeout_s = DEFAULT_GPU_BATCH_TIMEOUT_S if on_gpu else 0.0
        self.timeout_s = float(timeout_s)

    def _predict_watched(self, rows: list[dict], inflight: InFlight | None) -> list:
        """_predict under a watchdog: past timeout_s the call is taken for a hang, and the
        process ends (a thread cannot interrupt a CUDA or C call), so Ray restarts the actor
        and the retry runs image by image (see InFlight)."""
        if not self.timeout_s:
            return self._predict(rows)
        import threading

        def hung() -> None:
            log.error("a model call on %d image(s) ran past compute.batch_timeout_s=%g s; "
                      "ending this worker so Ray restarts it", len(rows), self.timeout_s)
            if inflight is not None:
                inflight.mark_hung(self.timeout_s)
            os._exit(3)

        timer = threading.Timer(self.timeout_s, hung)
        timer.daemon = True
        timer.start()
        try:
            return self._predict(rows)
        finally:
            timer.cancel()

    def _predict(self, rows: list[dict]) -> list:
        """Depth for `rows`; on GPU out-of-memory, retry with half the views per model call
        (down to 1) instead of failing the batch."""
        from depthray.predict import predict_images

        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3).copy() for r in rows]
        inference = self.inference
        while True:
            try:
                return predict_images(images, self.model, inference)
            except Exception as e:
                if not is_out_of_memory(e) or inference.batch_size <= 1:
                    raise
                _release_gpu_memory()
                smaller = max(1, inference.batch_size // 2)
                log.warning("out of memory with %d views per call on %d image(s); retrying with %d",
                            inference.batch_size, len(images), smaller)
                inference = dataclasses.replace(inference, batch_size=smaller)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if not records.is_trailer(r) and r.get("error") is None]
        t0 = time.perf_counter()
        inflight = InFlight(self.run_id, todo) if todo else None
        try:
            if inflight is not None and inflight.retried:
                raise WorkerCrashed(f"attempt {inflight.state['attempt']}: a previous attempt "
                                    "of this batch killed its worker process")
            results = list(zip(todo, self._predict_watched(todo, inflight))) if todo else []
        except Exception as e:
            log.warning("batch of %d failed (%s); retrying one image at a time", len(todo), e)
            results = []
            for r in todo:
                skip = inflight.crashed(r) if inflight is not None else None
                if skip is not None:
                    results.append((r, skip))
                    continue
                if inflight is not None and inflight.retried:
                    inflight.working_on(r)
                try:
                    results.append((r, self._predict_watched([r], inflight)[0]))
                except Exception as e1:
                    results.append((r, e1))
        if inflight is not None:
            inflight.done()
        share = (time.perf_counter() - t0) / max(len(todo), 1)
        out = [r for r in rows if records.is_trailer(r) or r.get("error") is not None]
        for r, res in results:
            if isinstance(res, Exception):
                reason = ("timeout" if isinstance(res, WorkerHung)
                          else "crashed" if isinstance(res, WorkerCrashed) else "infer")
                out.append(records.error_row(r, "infer", reason, f"{type(res).__name__}: {res}"))
                continue
            r.update(depth_f32=res.depth.astype(np.float32).tobytes(),
                     uncertainty_f32=res.uncertainty.astype(np.float32).tobytes(),
                     num_views=res.num_views, ensemble_size=res.ensemble_size, infer_s=share)
            r.pop("pixels", None)
            out.append(r)
        return records.to_table(out, records.PREDICTED)


@dataclasses.dataclass
class Resources:
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float


def resolve_resources(cfg: Config) -> Resources:
    """Actor pool size and per-actor GPUs from config, defaulting to the cluster's GPUs."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0)
    per = cfg.compute.num_gpus_per_actor
    if per is None:
        per = 1.0 if gpus >= 1 else 0.0
    n = cfg.compute.num_actors
    if n is None:
        n = max(1, int(gpus // per)) if per > 0 else 1
    if per > 0 and n * per > gpus:
        log.warning("%d actors x %g GPUs asked, cluster has %g GPUs now (autoscaler may add more)",
                    n, per, gpus)
    return Resources(num_actors=n, gpus_per_actor=per, cpus_per_actor=cfg.compute.num_cpus_per_actor)


def build_dataset(cfg: Config, shards: list, res: Resources, run_id: str = ""):
    """The Ray Data graph for `shards` (lazy; runs when the driver iterates it)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0  # a failing block fails the job loudly, never drops rows
    ctx.enable_progress_bars = False  # the driver logs its own progress lines

    keep_input = cfg.output.format == "webdataset" and cfg.output.include_image
    items = [{"name": s.name, "url": s.url, "format": s.format} for s in shards]
    read_compute = TaskPoolStrategy(size=cfg.compute.read_parallelism) if cfg.compute.read_parallelism else None
    # Decoded pixels take memory; saying so keeps Ray from packing too many decode tasks
    # on one node. It also keeps Ray from fusing read+decode into the inference actor (it
    # fuses operators with equal resource requests), which would put CPU decoding on the
    # GPU actor's critical path.
    read_args = {"memory": 256 << 20}
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", compute=read_compute,
                        fn_kwargs={"cfg": cfg.input, "storage": cfg.storage}, **read_args)
    ds = ds.map_batches(decode_batch, batch_size=None, batch_format="pyarrow", compute=read_compute,
                        fn_kwargs={"cfg": cfg.input, "keep_input": keep_input}, **read_args)
    ds = ds.map_batches(
        DepthPredictor,
        batch_size=cfg.compute.images_per_batch,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=res.num_actors),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
        fn_constructor_kwargs={"model_spec": dataclasses.asdict(cfg.model), "inference": cfg.inference,
                               "storage": cfg.storage, "run_id": run_id,
                               "timeout_s": cfg.compute.batch_timeout_s},
    )
    ds = ds.map_batches(encode_batch, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"quality": cfg.quality})
    ds = ds.map_batches(
        write_batch,
        batch_size=cfg.output.rows_per_part,
        batch_format="pyarrow",
        fn_kwargs={"cfg": cfg.output, "storage": cfg.storage, "model": model_label(cfg),
                   "config_hash": cfg.hash()},
    )
    return ds


def _check_paths(cfg: Config, shards: list) -> None:
    """Outputs must never become inputs: not inside an input folder, not matched by the input."""
    out = cfg.output.url.rstrip("/")
    out_path = out.split("://", 1)[-1]
    inp = cfg.input.url.rstrip("/")
    is_pattern = any(c in inp for c in "*?[{") or inp.lower().endswith((".txt", ".lst", ".list"))
    inside_folder = not is_pattern and (out == inp or out.startswith(inp + "/"))
    clash = next((s.url for s in shards if s.url.split("://", 1)[-1].startswith(out_path + "/")), None)
    if inside_folder or clash:
        raise ConfigError(f"output.url {cfg.output.url!r} overlaps input.url {cfg.input.url!r}"
                          + (f" (input shard {clash} is under the output)" if clash else "")
                          + "; outputs would be read back as inputs")


_RAY_WRAPPERS = {"RayTaskError", "UserCodeException", "RayActorError"}


def _short(e: BaseException, limit: int = 500) -> str:
    """One line for an exception: Ray wraps task errors in tracebacks; name the root cause."""
    top, seen = e, set()
    while id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None) or e.__cause__  # RayTaskError keeps it in .cause
        if not isinstance(cause, BaseException):
            break
        e = cause
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    if type(e).__module__.startswith("ray"):  # the cause lives only in the traceback text
        for ln in str(top).splitlines():
            m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", ln.strip())
            if m and not m.group(1).startswith("ray.") and m.group(1) not in _RAY_WRAPPERS:
                text = f"{m.group(1)}: {m.group(2)}"
                break
    return text[:limit]


def _check_storage(cfg: Config, shards: list, run_id: str) -> None:
    """Fail fast, naming the URL, when the output cannot be written or the input's folder
    or bucket does not exist / is forbidden. A single missing shard is not fatal: its reader
    reports it and the next run retries it."""
    from depthray.io.fs import filesystem, join, write_atomic

    fs, root = filesystem(cfg.output.url, cfg.storage)
    probe = join(root, "_jobs", f".probe-{run_id}")
    try:
        write_atomic(fs, probe, b"")
        fs.rm_file(probe)
    except Exception as e:
        raise ConfigError(f"output.url {cfg.output.url!r}: not writable ({_short(e)})") from e
    first = shards[0].url
    fs, path = filesystem(first, cfg.storage)
    try:
        if fs.exists(path):
            return
        parent = path.rstrip("/").rsplit("/", 1)[0]
        if parent == path.rstrip("/") or not fs.exists(parent):
            raise ConfigError(f"input.url {cfg.input.url!r}: {first} and its folder/bucket do not exist")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"input.url {cfg.input.url!r}: cannot read {first} ({_short(e)})") from e


def list_input_shards(cfg: Config) -> list:
    """The input's shards; any failure to list them is a ConfigError naming the URL.
    (Storage clients raise more than OSError: botocore's NoCredentialsError,
    EndpointConnectionError, ... all mean the URL cannot be used.)"""
    try:
        return list_shards(cfg.input, cfg.storage)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"input.url {cfg.input.url!r}: cannot list it ({_short(e)})") from e


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (a cluster, "auto") or start a local Ray; no-op if already connected."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True, "logging_level": logging.WARNING}
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def run_job(cfg: Config, log_every_s: float = 10.0, address: str | None = None,
            num_cpus: int | None = None) -> dict[str, Any]:
    """Run (or resume) the job described by `cfg`; returns the summary.

    Uses the connected Ray, or joins `address` / starts a local Ray (`num_cpus`) only once
    there is work: configuration and storage problems raise ConfigError before Ray starts,
    and a re-run with every shard complete never starts it.
    """
    run_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
    # 1. Plan: list shards, skip committed ones, clear leftovers of the rest. Storage that
    #    cannot be reached or written (403, missing bucket) stops the job here, by URL.
    shards = list_input_shards(cfg)
    _check_paths(cfg, shards)
    _check_storage(cfg, shards, run_id)
    try:
        plan = plan_shards(shards, cfg.output, cfg.storage)
    except Exception as e:
        raise ConfigError(f"output.url {cfg.output.url!r}: cannot read or clean it ({_short(e)})") from e
    log.info("%d shards: %d to do, %d already complete", len(shards), len(plan.todo), len(plan.skipped))
    store = ManifestStore(cfg.output.url, cfg.storage)
    static = {"config_hash": cfg.hash(), "model": model_label(cfg), "run_id": run_id,
              "depthray_version": __version__}
    tracker = ShardTracker({s.name: s.url for s in plan.todo}, store.write, static, log_every_s)
    stages: list[str] = []
    res = None
    job_error = None
    # 2. Stream the graph; the driver only sees acknowledgements.
    if plan.todo:
        init_ray(address or cfg.compute.address, num_cpus=num_cpus)
        res = resolve_resources(cfg)
        ds = build_dataset(cfg, plan.todo, res, run_id)
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for ack in batch.to_pylist():
                    tracker.update(ack)
        except Exception as e:  # a stage failed past Ray's retries: report, don't lose the summary
            job_error = _short(e)
            log.error("job stopped early: %s", job_error, exc_info=log.isEnabledFor(logging.DEBUG))
        tracker.maybe_log(force=True)
        stages = [ln.strip() for ln in ds.stats().splitlines() if ln.startswith("Operator")]
    # 3. Summary.
    totals = tracker.summary(job_error)
    summary = {
        "run_id": run_id,
        "input": cfg.input.url,
        "output": cfg.output.url,
        "shards_total": len(shards),
        "shards_skipped": len(plan.skipped),
        "leftover_files_deleted": plan.deleted_parts,
        **totals,
        "gpu_seconds": round(totals["infer_seconds"] * (res.gpus_per_actor if res else 0), 3),
        "actors": res.num_actors if res else 0,
        "stages": stages,
        "job_error": job_error,
        **static,
    }
    summary["summary_path"] = store.write_job_summary(run_id, summary)
    if summary["shards_unfinished"]:
        log.warning("%d shard(s) unfinished; re-run the same command to retry them: %s",
                    len(summary["shards_unfinished"]), summary["shards_unfinished"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """Job entry point: `python -m depthray.pipeline CONFIG [--set k=v ...]`.

    This is what `ray job submit` runs (see depthray/submit.py and pipelines/); inside a
    Ray job, `ray.init()` joins the job's cluster. Exit status 1 when shards are unfinished.
    """
    import argparse
    import json

    from depthray.config import load_config

    ap = argparse.ArgumentParser(prog="python -m depthray.pipeline", description=main.__doc__)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--address", help="Ray address (default: compute.address, else local/job cluster)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.set)
    summary = run_job(cfg, address=args.address)
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 1 if summary["shards_unfinished"] else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
