"""The driver: `run_job(cfg)` lists the input, resumes, runs the stages on Ray, and commits.

    1. lease, repair,  depthray/job/lease.py, depthray/io/commit.py (finish commits a crash
       list + resume   cut short), depthray/job/checks.py, depthray/io/manifest.py (before Ray)
    2. run             depthray/job/stages.py as a Ray Data graph (depthray/job/ray_graph.py)
    3. commit          the write stage's acknowledgements -> depthray/job/ledger.py, which
                       commits a shard (depthray/io/commit.py) once all of its rows have landed
    4. summary         `_jobs/{run_id}.json`

`depthray run` (and `depthray submit`, on a cluster) is the one way in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from typing import Any

from depthray import __version__
from depthray.config import Config, ConfigError
from depthray.io import output_config
from depthray.io.commit import Committer, repair
from depthray.io.manifest import ManifestStore, input_fingerprints, resume_shards
from depthray.io.sinks import OUTPUT_SCHEMA, ensure_errors_file
from depthray.io.table import ShardTable, require_deltalake
from depthray.job.checks import (
    check_bucket,
    check_columns,
    check_input,
    check_local_cpus,
    check_model,
    check_paths,
    check_pipeline,
    check_sparse_sources,
    describe_error,
    list_input_shards,
)
from depthray.job.interrupt import DeferredInterrupt
from depthray.job.lease import LeaseLost, OutputLease
from depthray.job.ledger import ShardLedger
from depthray.job.pool_watch import PoolWatch
from depthray.job.local import LocalRunner, shard_tables
from depthray.job.ray_graph import Resources, build_dataset, resolve_resources
from depthray.job.stages import job_stages, model_label

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
             dashboard: bool = False) -> None:
    """Join `address` (a cluster, "auto"), or with `num_cpus` start a local Ray of that size
    (never a stray `ray start` cluster's); no-op if already connected.

    `quiet` (`depthray run` without --verbose): Ray's own warnings, its C++ error lines and
    the workers' output (where each failure's traceback is printed again) stay in Ray's log
    files (/tmp/ray/session_latest/logs); failures still reach the summary, one line each.
    `dashboard`: start Ray's dashboard with a local Ray (`compute.dashboard`; ignored by Ray
    when joining a running cluster, which keeps its own).
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": not quiet, "include_dashboard": dashboard,
                              "logging_level": logging.ERROR if quiet else logging.WARNING}
    if address is None and num_cpus is not None:
        kwargs.update(address="local", num_cpus=num_cpus)
    if quiet:
        # the driver's core worker prints Ray's C++ log lines ("[... E ...] core_worker.cc:")
        # to this terminal; a user's own setting wins
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    ray.init(**kwargs)


def quiet_ray_data() -> None:
    """Ray Data prints every execution's start and end, and a warning that progress bars are
    off (the ledger prints its own progress): errors only on the terminal; its log file
    (ray-data.log in the session's logs) keeps everything. Call after ray.data is imported
    (its import installs the handlers)."""
    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.ERROR)


def run_job(cfg: Config, log_every_s: float = 10.0, address: str | None = None,
            num_cpus: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) the job described by `cfg`; returns the summary.

    Uses the connected Ray, or joins `address` / starts a local Ray (`num_cpus`) only once
    there is work: configuration and storage problems raise ConfigError before Ray starts,
    and a re-run with every shard complete never starts it.
    """
    run_id = time.strftime("%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
    # 1. List and resume: list shards, skip committed ones, clear leftovers of the rest. Storage that
    #    cannot be reached or written (403, missing bucket) stops the job here, by URL.
    shards = list_input_shards(cfg)
    check_paths(cfg, shards)
    check_bucket(cfg.output.url, "output.url", cfg)
    check_columns(cfg, shards)
    check_sparse_sources(cfg, shards)
    check_pipeline(cfg)
    check_model(cfg)  # last: a factory's import may take seconds (torch)
    skipped = getattr(shards, "skipped", {})
    if skipped:
        log.warning("input: %d file(s) skipped, not images: %s", sum(skipped.values()),
                    ", ".join(f"{n} .{ext}" for ext, n in sorted(skipped.items())))
    # One writer per output: nothing is deleted or written before this run holds the lease.
    lease = OutputLease(cfg.output.url, cfg.storage, run_id, cfg.output.lease_timeout_s)
    try:
        lease.acquire()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"output.url {cfg.output.url!r}: not writable ({describe_error(e)})") from e
    try:
        return _run(cfg, run_id, shards, lease, log_every_s, address, num_cpus, quiet)
    finally:
        lease.release()


def local_resources(cfg: Config) -> Resources:
    """compute.executor local: one model in this process, on the device model.device
    resolves to here (auto: CUDA when there is one)."""
    from depthray.precision import resolve_device

    cuda = resolve_device(cfg.model.device).type == "cuda"
    return Resources(min_actors=1, max_actors=1, gpus_per_actor=1.0 if cuda else 0.0,
                     cpus_per_actor=cfg.compute.num_cpus_per_actor)


def _run(cfg: Config, run_id: str, shards: list, lease: OutputLease, log_every_s: float, address: str | None,
         num_cpus: int | None, quiet: bool = False) -> dict[str, Any]:
    check_input(cfg, shards)
    if cfg.output.format == "delta":
        require_deltalake()
    store = ManifestStore(cfg.output.url, cfg.storage)
    try:
        # Whatever this run's settings and mode: first finish what a killed run left mid-commit.
        repaired = repair(store)
        fingerprints = input_fingerprints(shards, cfg.storage)
        resume = resume_shards(shards, cfg, fingerprints, run_id)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"output.url {cfg.output.url!r}: cannot read or clean it ({describe_error(e)})") from e
    log.info("%d shards: %d to do, %d already complete", len(shards), len(resume.todo), len(resume.skipped))
    ensure_errors_file(cfg.output.url, cfg.storage)
    table = ShardTable(cfg.output.url, cfg.storage) if cfg.output.format == "delta" else None
    if table is not None:
        table.ensure(OUTPUT_SCHEMA)  # version 0, no rows: readers can open it from the start
    res = None
    local = cfg.compute.executor == "local"
    if resume.todo and local:
        res = local_resources(cfg)
    elif resume.todo:
        check_local_cpus(cfg, address, num_cpus)
        try:
            init_ray(address or cfg.compute.address, num_cpus=num_cpus, quiet=quiet, dashboard=cfg.compute.dashboard)
        except Exception as e:  # a node start-up timeout under load, a wrong address: one line, exit 2
            where = address or cfg.compute.address or "a local Ray"
            raise ConfigError(f"Ray did not start ({where}): {describe_error(e)}; nothing was run, "
                              "re-run the same command once Ray can start") from e
        res = resolve_resources(cfg)
    device_kind = ("cuda" if res.gpus_per_actor > 0 else "cpu") if res else None
    if device_kind is not None:  # `auto` resolved: the output's one configuration, checked again and recorded
        output_config.record(store, cfg, device_kind, run_id)
    static = {"config_hash": cfg.hash(device_kind), "model": model_label(cfg), "run_id": run_id,
              "depthray_version": __version__}
    identities = {s.name: {"url": s.url, **{f"source_{k}": v for k, v in fingerprints.get(s.url, {}).items()}}
                  for s in resume.todo}
    manifest_fields = {**static, "settings": cfg.settings(device_kind), "overwrite_epoch": resume.overwrite_epoch}
    committer = Committer(store, fence=lease.verify, table=table)
    ledger = ShardLedger(identities, lambda name, m: committer.commit(name, m, resume.replaced.get(name)),
                         manifest_fields, log_every_s)
    stages: list[str] = []
    job_error = None
    watch = None
    interrupted, interrupted_by = False, None
    lease_lost = None
    # 2. Stream the graph; the driver only sees acknowledgements.
    if res is not None:
        stop = DeferredInterrupt()
        if local:
            log.info("Starting execution: %d shard(s) in this process (compute.executor: local)", len(resume.todo))
            batches = LocalRunner(job_stages(cfg, run_id, device_kind)).run(shard_tables(resume.todo))
        else:
            ds = build_dataset(job_stages(cfg, run_id, device_kind), resume.todo, res)
            if quiet:
                quiet_ray_data()
            log.info("Starting execution: %d shard(s) on Ray, %s inference actor(s)", len(resume.todo),
                     res.num_actors if res.fixed else f"{res.min_actors}..{res.max_actors or 'cluster limit'}")
            watch = PoolWatch(run_id)
            batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        try:
            with watch or contextlib.nullcontext(), stop.installed():
                for batch in batches:
                    with stop.critical():  # Ctrl-C never lands inside a commit
                        for ack in batch.to_pylist():
                            ledger.update(ack)
        except LeaseLost as e:  # another run took the output over: not one more commit
            lease_lost = job_error = str(e)
        except KeyboardInterrupt:  # Ctrl-C: stop, keep what committed, write the summary
            interrupted, interrupted_by = True, stop.signal_name or "SIGINT"
            job_error = f"interrupted ({'Ctrl-C' if interrupted_by == 'SIGINT' else interrupted_by})"
            log.warning("interrupted: stopping; committed shards stay committed, a re-run resumes")
        except Exception as e:  # a stage failed past Ray's retries: report, don't lose the summary
            job_error = describe_error(e)
            log.error("job stopped early: %s", job_error, exc_info=log.isEnabledFor(logging.DEBUG))
        ledger.maybe_log(force=True)
        if not interrupted and not lease_lost and not local:
            stages = [ln.strip() for ln in ds.stats().splitlines() if ln.startswith("Operator")]
    # 3. Summary.
    totals = ledger.summary(job_error)
    summary = {
        "run_id": run_id,
        "input": cfg.input.url,
        "output": cfg.output.url,
        "shards_total": len(shards),
        "shards_skipped": len(resume.skipped),
        "leftover_files_deleted": resume.deleted_parts + repaired["orphan_parts_deleted"],
        "repaired": repaired,
        "input_files_skipped": dict(getattr(shards, "skipped", {})),
        **totals,
        "gpu_seconds": round(totals["infer_seconds"] * (res.gpus_per_actor if res else 0), 3),
        "actors": res.num_actors if res else 0,
        "actors_max": (res.max_actors if res.max_actors is not None else "cluster limit") if res else 0,
        "stages": stages,
        **(watch.summary() if watch is not None else {}),
        "job_error": job_error,
        "interrupted": interrupted,
        "interrupted_by": interrupted_by,  # "SIGINT" (Ctrl-C) or "SIGTERM"
        "lease_lost": lease_lost,
        **static,
    }
    summary["shards_redone"] = resume.redo
    summary["summary_path"] = store.write_job_summary(run_id, summary)
    if resume.overwrite_epoch and not summary["shards_unfinished"] and not lease_lost:
        store.end_overwrite()  # every shard relabelled: the overwrite is over
    if summary["shards_unfinished"]:
        log.warning("%d shard(s) unfinished; re-run the same command to retry them: %s",
                    len(summary["shards_unfinished"]), summary["shards_unfinished"])
    return summary
