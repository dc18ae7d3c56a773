"""What the crash-point tests share: an output on local disk or on the moto S3 server, a
`depthray run` process killed at a named commit step (depthray/crash_points.py), and a
plain reader (stock pyarrow over the output folder, a `*.tar` glob) that filters nothing.

The commit is the driver's work whichever executor labels the rows, so the killed process
runs the stage chain itself (`compute.executor: local`: a crash costs a Python start, not a
Ray job); `job(..., executor="ray")` makes it join the suite's shared Ray (`--address` its
GCS) instead, for the case that keeps the real Ray job in these tests.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import yaml

from tests.reliability.conftest import REPO, double_model
from tests.reliability.test_crashes import write_shards


class Output:
    """An output location: `kind` "local" (a folder under tmp_path) or "s3" (a bucket prefix)."""

    def __init__(self, kind: str, tmp_path: Path, bucket: str | None = None):
        self.kind = kind
        self.tmp_path = tmp_path
        self.bucket = bucket
        self.fs = fsspec.filesystem("s3" if kind == "s3" else "file")

    def root(self, name: str = "out") -> str:
        return f"{self.bucket}/{name}" if self.kind == "s3" else str(self.tmp_path / name)

    def url(self, name: str = "out") -> str:
        return f"s3://{self.root(name)}" if self.kind == "s3" else self.root(name)

    def files(self, name: str = "out") -> list[str]:
        """Every file under the output, relative, hidden ones included."""
        self.fs.invalidate_cache()
        root = self.root(name)
        if not self.fs.exists(root):
            return []
        return sorted(p[len(root.rstrip("/")) + 1:] for p in self.fs.find(root))

    def read_json(self, rel: str, name: str = "out") -> dict:
        return json.loads(self.fs.cat_file(f"{self.root(name)}/{rel}"))

    def copy(self, src: str, dst: str) -> None:
        """A second, independent copy of an output (to re-run it in two ways)."""
        for rel in self.files(src):
            data = self.fs.cat_file(f"{self.root(src)}/{rel}")
            if self.kind == "local":
                os.makedirs(os.path.dirname(f"{self.root(dst)}/{rel}"), exist_ok=True)
            self.fs.pipe_file(f"{self.root(dst)}/{rel}", data)

    def plain_view(self, name: str = "out") -> tuple[list[dict], list[dict]]:
        """(result rows, error rows) as a plain reader sees them: `pq.read_table(output)` or
        every `*.tar` under it (pyarrow's and the glob's rule: skip `_`/`.` components), and
        `pq.read_table(output/_errors)`. Rows: source, key, config_hash."""
        self.fs.invalidate_cache()
        root = self.root(name)
        visible = [rel for rel in self.files(name) if not any(c[:1] in "_." for c in rel.split("/"))]
        rows: list[dict] = []
        if any(rel.endswith(".parquet") for rel in visible):
            rows = pq.read_table(root, filesystem=self.fs, columns=["source", "key", "config_hash"]).to_pylist()
        for rel in (r for r in visible if r.endswith(".tar")):
            with tarfile.open(fileobj=io.BytesIO(self.fs.cat_file(f"{root}/{rel}"))) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(m).read())
                        rows.append({k: meta[k] for k in ("source", "key", "config_hash")})
        errors = pq.read_table(f"{root}/_errors", filesystem=self.fs, columns=["source", "key"]).to_pylist() \
            if self.fs.exists(f"{root}/_errors") else []
        return rows, errors


    def table_view(self, name: str = "out") -> tuple[list[dict], list[dict]]:
        """(result rows, error rows) as a Delta reader sees them: the table at its latest
        version through deltalake (the S3 endpoint from the environment, as any client
        would set it), and `pq.read_table(output/_errors)`."""
        from deltalake import DeltaTable

        uri, options = self.root(name), {}
        if self.kind == "s3":
            uri, options = f"s3://{uri}", {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true"}
        rows = DeltaTable(uri, storage_options=options).to_pyarrow_table(columns=["source", "key", "config_hash"])
        root = self.root(name)
        errors = pq.read_table(f"{root}/_errors", filesystem=self.fs, columns=["source", "key"]).to_pylist() \
            if self.fs.exists(f"{root}/_errors") else []
        return rows.to_pylist(), errors


def inputs(tmp_path: Path, make_image) -> dict[str, set[str]]:
    """Three shards of four images; shard 00001 also holds a file that is no image (an
    error row, so its commit moves an error part too)."""
    expected = write_shards(tmp_path / "in", make_image, shards=3, per=4)
    path = tmp_path / "in" / "00001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = tarfile.TarInfo("s1bad.jpg")
    bad.size = 9
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in [*members, (bad, b"not a jpg")]:
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    expected["00001"].add("s1bad")
    return expected


def job(tmp_path: Path, output_url: str, fmt: str = "parquet", name: str = "job", executor: str = "local",
        **changes) -> Path:
    """A job config file: the CPU test double, two rows per part (a shard is several parts)."""
    data = {
        "input": {"url": str(tmp_path / "in" / "*.tar")},
        "output": {"url": output_url, "format": fmt, "rows_per_part": 2},
        "model": double_model(),
        "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 2, "num_cpus_per_actor": 0.5, "executor": executor},
    }
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_killed(config: Path, log: Path, env: dict[str, str], timeout: float = 240) -> int:
    """`depthray run CONFIG` with `env` (DEPTHRAY_CRASH_AT), to its end; its return code
    (-9: killed at the crash point)."""
    return spawn(config, log, env).wait(timeout)


def spawn(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`depthray run CONFIG` with `env` (crash or pause points): in its own process with the
    local executor, or on the shared Ray (which must be running) with the Ray executor."""
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH")) if p)
    full.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "depthray.cli", "run", str(config)]
    if yaml.safe_load(config.read_text()).get("compute", {}).get("executor") == "ray":
        import ray

        cmd += ["--address", ray.get_runtime_context().gcs_address]
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def rerun_copies(output: Output, config: Path):
    """Two copies of the crashed output `out`, each re-run with the same settings: without,
    then with `output.overwrite`. Yields (name, overwrite, cfg, summary) once each run has
    finished every shard with no job error; the caller checks what the copy then holds."""
    from depthray.config import load_config
    from depthray.job.driver import run_job

    for overwrite in (False, True):
        name = f"out-{'overwrite' if overwrite else 'plain'}"
        output.copy("out", name)
        cfg = load_config(config, [f"output.url={output.url(name)}", f"output.overwrite={overwrite}"])
        summary = run_job(cfg)
        assert not summary["shards_unfinished"] and not summary["job_error"], summary
        yield name, overwrite, cfg, summary

