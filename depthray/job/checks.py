"""Pre-run checks: everything that can be known wrong before a worker starts.

The input is listed, outputs must never be read back as inputs, and the output must be
writable and the input's folder or bucket reachable. Each failure is a ConfigError naming
the URL, raised before Ray starts. Nothing here imports Ray (`depthray status` uses it).
"""

from __future__ import annotations

import inspect
import logging
import os
import re

from depthray.config import Config, ConfigError
from depthray.io.sources import Shard, list_shards

log = logging.getLogger(__name__)


def check_reachable(cfg: Config, timeout_s: float = 3.0) -> None:
    """A custom S3 endpoint (MinIO, moto, ...) that refuses connections is named at once:
    the storage client would retry with backoff for 15-20 s before saying so."""
    import socket
    from urllib.parse import urlsplit

    from depthray.io.fs import storage_options

    seen = set()
    for where, url in (("input.url", cfg.input.url), ("output.url", cfg.output.url)):
        endpoint = storage_options(url, cfg.storage).get("endpoint_url") if url else None
        if not endpoint or endpoint in seen:
            continue
        seen.add(endpoint)
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
        except OSError as e:
            raise ConfigError(f"{where} {url!r}: cannot connect to the storage endpoint {endpoint} "
                              f"({e.strerror or type(e).__name__})") from None


def check_bucket(url: str, where: str, cfg: Config) -> None:
    """An object-store URL whose bucket does not exist is a ConfigError naming it."""
    from depthray.io.fs import filesystem, is_local

    fs, path = filesystem(url, cfg.storage)
    if is_local(fs) or "://" not in url:
        return
    bucket = path.split("/", 1)[0]
    try:
        exists = fs.exists(bucket)
    except Exception as e:
        raise ConfigError(f"{where} {url!r}: cannot read it ({describe_error(e)})") from e
    if not exists:
        raise ConfigError(f"{where} {url!r}: bucket {bucket!r} does not exist")


def list_input_shards(cfg: Config) -> list[Shard]:
    """The input's shards; any failure to list them is a ConfigError naming the URL.
    (Storage clients raise more than OSError: botocore's NoCredentialsError,
    EndpointConnectionError, ... all mean the URL cannot be used.)"""
    check_reachable(cfg)
    try:
        return list_shards(cfg.input, cfg.storage)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"input.url {cfg.input.url!r}: cannot list it ({describe_error(e)})") from e


def check_paths(cfg: Config, shards: list[Shard]) -> None:
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


def describe_error(e: BaseException, limit: int = 500) -> str:
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


def check_columns(cfg: Config, shards: list[Shard]) -> None:
    """Parquet and Arrow inputs: the first file's schema holds input.image_column, of a type
    an image is read from (io/columns.py: bytes, a {bytes, path} struct, a path string),
    the key_column named (when one is) and input.keep_columns; else a ConfigError naming
    the columns that exist or the column's type (a wrong column would make every shard a
    corrupt one, or keys row numbers); the same for metric.column where the pipeline reads it."""
    _, column = sparse_inputs(cfg) or (None, None)
    first = next((s for s in shards if s.format in ("parquet", "arrow")), None)
    if first is None:
        return
    from depthray.io.columns import ACCEPTED, SPARSE_ACCEPTED, image_kind, read_schema, sparse_kind

    try:
        schema = read_schema(first.url, first.format, cfg.storage)
    except Exception as e:  # unreadable: the reader reports it per shard
        log.debug("cannot read the schema of %s: %s", first.url, e)
        return
    names = schema.names
    inp = cfg.input
    wanted = [("input.image_column", inp.image_column)] + \
        ([("input.key_column", inp.key_column)] if inp.key_column else []) + \
        [("input.keep_columns", c) for c in inp.keep_columns] + ([("metric.column", column)] if column else [])
    missing = [f"{where} {col!r}" for where, col in wanted if col not in names]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: no such column in {first.url} "
                          f"(columns: {', '.join(names)})")
    tp = schema.field(inp.image_column).type
    if image_kind(tp) is None:
        raise ConfigError(f"input.image_column {inp.image_column!r} in {first.url} is of type {tp}: "
                          f"an image is read from {ACCEPTED}")
    if column and sparse_kind(schema.field(column).type) is None:
        raise ConfigError(f"metric.column {column!r} in {first.url} is of type {schema.field(column).type}: "
                          f"sparse metric depth is read from {SPARSE_ACCEPTED}")


def sparse_inputs(cfg: Config) -> tuple[str | None, str | None] | None:
    """(member, column) the pipeline's read stage carries each image's sparse metric depth
    from (pipelines/metric_depth.py); None where it reads none (or does not build:
    check_pipeline says why)."""
    from depthray.job.pipelines import load_pipeline

    try:
        stages = load_pipeline(cfg.pipeline)(cfg, "", None)
        kwargs = next(s.kwargs for s in stages if s.name == "read")
    except Exception:
        return None
    if "sparse_member" not in kwargs and "sparse_column" not in kwargs:
        return None
    return kwargs.get("sparse_member"), kwargs.get("sparse_column")


def check_sparse_sources(cfg: Config, shards: list[Shard]) -> None:
    """A pipeline that reads sparse metric depth: every input format among the shards has
    where it comes from (a WebDataset member, a Parquet/Arrow column; an image folder has
    none), else a ConfigError before Ray (every row would be an error row)."""
    sparse = sparse_inputs(cfg)
    if sparse is None:
        return
    member, column = sparse
    formats = {s.format for s in shards}
    if "webdataset" in formats and not member:
        raise ConfigError(f"metric.member: input {cfg.input.url!r} holds WebDataset shards: name the member "
                          "holding each sample's sparse metric depth (e.g. lidar.png)")
    if formats & {"parquet", "arrow"} and not column:
        raise ConfigError(f"metric.column: input {cfg.input.url!r} is a Parquet/Arrow table: name the column "
                          "holding each row's sparse metric depth")
    if "images" in formats:
        raise ConfigError(f"input {cfg.input.url!r}: a folder of image files carries no sparse metric depth; "
                          "use WebDataset samples with a member (metric.member) or a Parquet/Arrow column "
                          "(metric.column)")


def check_model(cfg: Config) -> None:
    """The model spec, before Ray starts (a worker would fail 40 s later, once per retry):
    a factory must import and name a callable; otherwise the kind must be known and the
    path a local folder holding its kind's marker file, a hub id `org/name`, or a URL with
    a protocol fsspec knows. (Whether a hub id or URL exists is learnt when it is fetched.)
    What each kind needs: depthray/models/kinds.py."""
    import importlib

    from depthray.models.kinds import HUB_ID, kind_of, local_folder

    m = cfg.model
    if m.factory:
        module_name, _, attr = m.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ConfigError(f"model.factory {m.factory!r}: cannot import {module_name!r} "
                              f"({type(e).__name__}: {e})") from None
        if not callable(getattr(module, attr, None)):
            raise ConfigError(f"model.factory {m.factory!r}: {module_name!r} has no callable {attr!r}")
        return
    try:
        kind = kind_of(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_steps(cfg)
    path = m.path[len("file://"):] if m.path.startswith("file://") else m.path
    if "://" in path:
        import fsspec

        proto = path.split("://", 1)[0]
        if proto not in fsspec.available_protocols() or not path.split("://", 1)[1].strip("/"):
            raise ConfigError(f"model.path {m.path!r}: not a usable URL (protocol {proto!r})")
        return
    folder = local_folder(path)
    if folder is not None:
        problem = kind.folder_problem(m.path, folder)
        if problem:
            raise ConfigError(problem)
        return
    if path.startswith(("/", ".", "~")) or not HUB_ID.match(path):
        raise ConfigError(f"model.path {m.path!r}: no such folder, and not a hub id (org/name)")


def reference_problem(path: str) -> str | None:
    """Why `metric.reference_model: path` cannot be a metric reference, before Ray (None: it
    can; a hub id or URL is checked when the infer actor fetches it). Reads config.json only."""
    import json

    from depthray.models.hf_families import metric_reference_family
    from depthray.models.kinds import HUB_ID, local_folder

    folder = local_folder(path)
    if folder is None:
        bare = path[len("file://"):] if path.startswith("file://") else path
        if "://" not in bare and (bare.startswith(("/", ".", "~")) or not HUB_ID.match(bare)):
            return f"metric.reference_model {path!r}: no such folder, and not a hub id (org/name)"
        return None
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return f"metric.reference_model {path!r}: a folder without config.json, not a transformers checkpoint"
    try:
        with open(config) as f:
            metric_reference_family(json.load(f))
    except ValueError as e:  # json's decode error is one too
        return f"metric.reference_model {path!r}: {e}"
    return None


def check_pipeline(cfg: Config) -> None:
    """The labelling task the config names (`pipeline`) loads and builds its stage list,
    before Ray: a typo there would otherwise fail the job after Ray started."""
    from depthray.job.pipelines import load_pipeline

    try:
        declare = load_pipeline(cfg.pipeline)
        stages = declare(cfg, "", None)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:
        raise ConfigError(f"pipeline {cfg.pipeline!r}: its stages(cfg, ...) raised {type(e).__name__}: {e}") from None
    if not stages or not all(hasattr(s, "fn") and hasattr(s, "name") for s in stages):
        raise ConfigError(f"pipeline {cfg.pipeline!r}: stages(cfg, ...) must return a list of Stage "
                          "(depthray/job/stages.py)")
    # which file declared the task: on a cluster, the code that travelled with the job (depthray submit)
    log.info("pipeline %s: %s", cfg.pipeline, inspect.getsourcefile(declare) or declare.__module__)


def check_steps(cfg: Config) -> None:
    """`inference.num_inference_steps` the model kind can run, before Ray: otherwise every
    image of the job would become an `infer` error row and the job would still exit 0
    (transformers models have no steps; end-to-end checkpoints, by kind, by their published
    name or by a local model_index.json's `end_to_end`, take exactly one)."""
    from depthray.models.kinds import kind_of

    m = cfg.model
    if m.factory:
        return
    problem = kind_of(m).step_problem(cfg.inference.num_inference_steps, m.path)
    if problem:
        raise ConfigError(problem)


def check_input(cfg: Config, shards: list[Shard]) -> None:
    """Fail fast, naming the URL, when the input's folder or bucket does not exist or is
    forbidden. A single missing shard is not fatal: its reader reports it and the next run
    retries it. (That the output is writable is proven by taking its lease.)"""
    from depthray.io.fs import filesystem

    first = shards[0].url.split("#", 1)[0]  # image shards: the folder (depthray/io/folders.py)
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
        raise ConfigError(f"input.url {cfg.input.url!r}: cannot read {first} ({describe_error(e)})") from e


def check_local_cpus(cfg: Config, address: str | None, num_cpus: int | None) -> None:
    """A local Ray this run would start must leave a CPU beside the inference actors: Ray
    Data's read, decode and write tasks take one each, and with none left the job waits
    forever at its start (a 1-vCPU VM, a CI runner, a pod with `cpu: 1`). Refused before
    Ray starts, naming the settings; the local executor runs on any CPU count. A cluster
    (an address, or a Ray already running) is left alone: an autoscaler may add CPUs."""
    import sys

    ray = sys.modules.get("ray")
    if cfg.compute.executor != "ray" or address or cfg.compute.address or (ray and ray.is_initialized()):
        return
    if num_cpus is not None and num_cpus < 1:
        return  # not a size at all: Ray's own start-up error says so
    if num_cpus is None:
        num_cpus = local_ray_cpus()
    actors = cfg.compute.num_actors or cfg.compute.min_actors
    need = actors * cfg.compute.num_cpus_per_actor + 1
    if num_cpus < need:
        raise ConfigError(
            f"a local Ray of {num_cpus} CPU(s) leaves no CPU for the read, decode and write tasks: "
            f"{actors} inference actor(s) x compute.num_cpus_per_actor {cfg.compute.num_cpus_per_actor:g} "
            f"+ 1 needs {need:g}. Use compute.executor: local (one process, any CPU count), a smaller "
            "compute.num_cpus_per_actor, or more CPUs (--num-cpus)")



def local_ray_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """The CPUs a local Ray sizes itself to, counted as Ray counts them (Ray's own function
    is private): the machine's, unless a container's cgroup says fewer (a CPU quota, v1 or
    v2, or a v1 cpuset; the smaller one, whole CPUs, at least 1)."""
    count = os.cpu_count() or 1
    if os.environ.get("RAY_USE_MULTIPROCESSING_CPU_COUNT"):
        return count

    def read(path: str) -> str | None:
        try:
            with open(os.path.join(cgroup, path)) as f:
                return f.read().strip()
        except (OSError, ValueError):
            return None

    quota = None
    v1 = read("cpu/cpu.cfs_quota_us"), read("cpu/cpu.cfs_period_us")
    v2 = (read("cpu.max") or "").split()
    try:
        if None not in v1:
            quota = float(v1[0]) / float(v1[1])
        elif len(v2) == 2 and v2[0].isnumeric() and v2[1].isnumeric():  # "max ..." = no quota
            quota = float(v2[0]) / float(v2[1])
    except (ValueError, ZeroDivisionError):
        quota = None
    if quota is not None and quota < 0:
        quota = None
    cpuset = None
    try:
        ranges = (read("cpuset/cpuset.cpus") or "").split(",")
        cpuset = sum(int(r.split("-")[1]) - int(r.split("-")[0]) + 1 if "-" in r else 1 for r in ranges if r) or None
    except ValueError:
        cpuset = None
    limits = [n for n in (quota, cpuset) if n is not None]
    return max(1, int(min(limits))) if limits else count
