"""`depthray submit`: run a job on a Ray cluster through its Job API (`ray job submit`).

The config is validated here, before anything is uploaded, then shipped in a small working
directory with `python -m depthray run job.yaml` (the same `depthray run` as on a laptop)
as the entry point. By default the local depthray package and the project's pipelines/
package (the labelling tasks a config names: `pipeline: metric_depth`) travel too
(runtime_env py_modules), so the cluster runs exactly the code you have; `ship_code=False`
uses the versions installed on the cluster instead. A pipeline given as a path to a .py file
inside the current folder travels in the working directory at the same relative path (the
path is part of the config hash); an absolute path must exist on the cluster as it is.
Credentials are never put in the runtime env (it is visible in the dashboard): clusters
should use instance roles; only the non-secret endpoint/region variables are forwarded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from depthray.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "DEPTHRAY_CACHE")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _absolute_local(url: str) -> str:
    """Relative local paths would resolve inside the job's upload dir: make them absolute."""
    if "://" in url or url.startswith("/"):
        return url
    return os.path.abspath(url)


def _auth_headers() -> dict[str, str]:
    """Ray's token auth: the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
    (where `ray start` keeps it), sent only to authenticate, never logged."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _submit_when_ready(client, attempts: int = 30, **job) -> str:
    """submit_job, retried while a freshly started head has no job agent yet (Ray answers
    500 "No available agent to submit job, please try again later")."""
    for attempt in range(attempts):
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == attempts - 1:
                raise
            log.info("the cluster's job agent is not up yet; retrying in 2 s")
            time.sleep(2.0)
    raise AssertionError("unreachable")


def job_config(cfg: Config) -> dict:
    data = cfg.to_dict()
    data["input"]["url"] = _absolute_local(cfg.input.url)
    data["output"]["url"] = _absolute_local(cfg.output.url)
    data["compute"]["address"] = None  # the job joins the cluster it was submitted to
    return data


def pipeline_file(cfg: Config) -> Path | None:
    """The relative path of the config's pipeline file when it must travel with the job (a
    .py file inside the current folder); None for a named pipeline or an absolute path."""
    name = cfg.pipeline
    if not (name.endswith(".py") or "/" in name or os.sep in name) or os.path.isabs(os.path.expanduser(name)):
        return None
    rel = Path(os.path.normpath(name))
    if rel.parts and rel.parts[0] == "..":
        raise ConfigError(f"pipeline {name!r}: a pipeline file outside the current folder does not travel with "
                         "the job; submit from a folder that holds it, or give its absolute path on the cluster")
    if not rel.is_file():
        raise ConfigError(f"pipeline {name!r}: no such file")
    return rel


def code_modules() -> list[str]:
    """The local packages a job runs: depthray, and pipelines/ (the named labelling tasks)."""
    import depthray

    modules = [str(Path(depthray.__file__).parent)]
    try:
        import pipelines
    except ImportError:  # an installation without the project's pipelines/: named ones must be on the cluster
        return modules
    return modules + [str(Path(pipelines.__file__).parent)]


def submit(config_path: str, overrides: list[str] | None = None, address: str | None = None,
           wait: bool = True, ship_code: bool = True, timeout_s: float | None = None,
           echo=print) -> tuple[str, str]:
    """Submit a job; with `wait`, stream its logs until it ends. Returns (job id, status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = load_config(config_path, overrides)  # fail here, not on the cluster
    shipped = pipeline_file(cfg)
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    workdir = Path(tempfile.mkdtemp(prefix="depthray-job-"))
    try:
        (workdir / "job.yaml").write_text(yaml.safe_dump(job_config(cfg), sort_keys=False))
        if shipped is not None:  # the job runs in the working dir: the same relative name resolves there
            (workdir / shipped).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shipped, workdir / shipped)
        runtime_env: dict = {
            "working_dir": str(workdir),
            "env_vars": {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)},
        }
        if ship_code:
            runtime_env["py_modules"] = code_modules()
        client = JobSubmissionClient(address, headers=_auth_headers())
        job_id = _submit_when_ready(client, entrypoint="python -m depthray run job.yaml",
                                    runtime_env=runtime_env,
                                    metadata={"depthray_config": Path(config_path).name,
                                              "config_hash": cfg.hash()})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # uploaded by submit_job already
    echo(f"submitted job {job_id} to {address}")
    if not wait:
        return job_id, "SUBMITTED"
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    seen = 0
    start = time.time()
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            echo(logs[seen:].rstrip("\n"))
            seen = len(logs)
        if status in terminal:
            break
        if timeout_s is not None and time.time() - start > timeout_s:
            echo(f"job {job_id} still {status} after {timeout_s:.0f}s; stopping it")
            client.stop_job(job_id)
            status = JobStatus.STOPPED
            break
        time.sleep(1.0)
    echo(f"job {job_id}: {status}")
    return job_id, str(status.value if hasattr(status, "value") else status)
