"""The commit protocol where it is hardest: connections cut mid-shard, two runs on one output,
readers during a run and after a SIGKILL, a changed config, a deleted part, an input list
that grows, two inputs with the same shard names. Real moto S3 and real processes; the
busy-output test is the real Ray job (a driver SIGKILLed while another run is refused), the
others run the stage chain locally (`executor="local"`): their subject is the driver's commit."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from depthray.config import ConfigError
from depthray.job.driver import run_job
from depthray.job.lease import OutputBusy
from tests.reliability.conftest import (
    COMMITTED,
    assert_exactly_once,
    assert_no_partial_files,
    double_model,
    job_config,
    read_outputs,
)
from tests.reliability.test_crashes import run_cli, write_shards

pytestmark = pytest.mark.timeout(300)


def committed_keys(out: Path) -> set[tuple[str, str]]:
    """(shard, key) of every output row the manifests commit, read from the parts they list."""
    keys = set()
    for m in (json.loads(p.read_text()) for p in (out / "_manifest").glob(COMMITTED)):
        for part in m["parts"]:
            keys |= {(r["source"], r["key"]) for r in pq.read_table(out / part, columns=["source", "key"]).to_pylist()}
    return keys


def plain_reader_keys(out: Path) -> list[tuple[str, str]]:
    """What the README's recipe reads: plain pyarrow over the whole output folder."""
    if not any(p.suffix == ".parquet" and not any(x.startswith("_") for x in p.relative_to(out).parts)
               for p in out.rglob("*.parquet")):
        return []
    return [(r["source"], r["key"]) for r in pq.read_table(str(out), columns=["source", "key"]).to_pylist()]


def test_connections_cut_mid_shard_are_retried_never_committed_short(s3_bucket, fault_proxy,
                                                                     make_image, make_tar):
    """A GET body cut in the middle, more often than the storage client retries by itself
    (s3fs: 5 times): the reader reads the shard again; every key ends exactly once, and no
    intact shard gets an error row."""
    fs = fsspec.filesystem("s3")
    expected = {}
    for s in range(2):
        members = [(f"s{s}k{i}.jpg", make_image(16, 20, seed=s * 10 + i)) for i in range(30)]
        fs.pipe_file(f"{s3_bucket}/in/{s:05d}.tar", make_tar(members))
        expected[f"{s:05d}"] = {f"s{s}k{i}" for i in range(30)}
    fault_proxy.cut_bodies(budget=8, match=lambda m, p: m == "GET" and "/in/00001.tar" in p)
    cfg = job_config(f"s3://{s3_bucket}/in/{{00000..00001}}.tar", f"s3://{s3_bucket}/out", double_model(),
                     executor="local", storage={"endpoint_url": fault_proxy.url, "retries": 3})
    summary = run_job(cfg)
    assert fault_proxy.injected["cut"] == 8, fault_proxy.injected
    assert (summary["shards_complete"], summary["shards_unfinished"]) == (2, {}), summary
    fault_proxy.clear()
    outs, errors = read_outputs(fs, f"{s3_bucket}/out")
    assert errors == [], errors
    assert_exactly_once(expected, outs, errors)


def test_a_shard_that_stays_unreadable_is_left_unfinished_not_committed(s3_bucket, fault_proxy,
                                                                         make_image, make_tar):
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_bucket}/in/00000.tar", make_tar([(f"k{i}.jpg", make_image(16, 20, seed=i)) for i in range(20)]))
    fault_proxy.cut_bodies(budget=10_000, match=lambda m, p: m == "GET" and "/in/00000.tar" in p)
    cfg = job_config(f"s3://{s3_bucket}/in/00000.tar", f"s3://{s3_bucket}/out", double_model(),
                     executor="local", storage={"endpoint_url": fault_proxy.url, "retries": 1})
    summary = run_job(cfg)
    assert summary["shards_complete"] == 0 and "00000" in summary["shards_unfinished"], summary
    assert not fs.exists(f"{s3_bucket}/out/_manifest/00000.json")
    fault_proxy.clear()
    again = run_job(cfg)  # the next run, with the network back, finishes it
    assert (again["shards_complete"], again["images"]) == (1, 20), again


def _slow_job(tmp_path: Path, make_image, shards: int = 8, **output) -> tuple[Path, Path, dict]:
    expected = write_shards(tmp_path / "in", make_image, shards=shards, per=4)
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "in" / "*.tar")},
        "output": {"url": str(out), "rows_per_part": 2, **output},
        "model": double_model(sleep_s=0.3),
        "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 2, "num_cpus_per_actor": 0.5},
    }))
    return config, out, expected


def _wait_for(pred, proc, log: Path, timeout: float = 150):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if pred():
            return
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended too soon:\n" + log.read_text()[-3000:]
    raise AssertionError("timed out waiting")


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_second_run_on_a_busy_output_stops_at_once_and_readers_see_committed_shards_only(
        ray_session, tmp_path, make_image):
    """Two runs on one output: the second exits at once naming the first and touches
    nothing. Meanwhile, and after the first is SIGKILLed, plain pyarrow over the output
    reads exactly the committed shards' rows; the next run resumes to exactly once."""
    config, out, expected = _slow_job(tmp_path, make_image)
    first = run_cli(config, tmp_path / "first.log")
    try:
        _wait_for(lambda: len(list((out / "_manifest").glob(COMMITTED))) >= 2, first, tmp_path / "first.log")
        holder = json.loads((out / "_jobs" / "lease.json").read_text())
        # Mid-run: a shard in flight is staged, invisible; what readers see is what is committed.
        seen = plain_reader_keys(out)  # (a commit may land between this read and the next line)
        assert seen and len(seen) == len(set(seen)) and set(seen) <= committed_keys(out)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "_staging" not in p.parts
                  and p.name != "lease.json"}
        from depthray.config import load_config

        t0 = time.monotonic()
        with pytest.raises(OutputBusy, match=holder["run_id"]):
            run_job(load_config(config))
        assert time.monotonic() - t0 < 10
        after = {p: p.stat().st_mtime_ns for p in before if p.exists()}
        assert after == before, "the refused run changed committed files"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        time.sleep(0.5)
    finally:
        _kill_group(first)
    committed = {p.stem for p in (out / "_manifest").glob(COMMITTED)}
    assert 2 <= len(committed) < 8
    seen = plain_reader_keys(out)  # after the crash: committed shards only, no duplicates
    assert len(seen) == len(set(seen)) and set(seen) == committed_keys(out)
    assert {s for s, _ in seen} == committed
    # The killed run's lease names a process that is gone from this host: the next run takes
    # it over at once (on another host it would wait for output.lease_timeout_s).
    assert json.loads((out / "_jobs" / "lease.json").read_text())["run_id"] == holder["run_id"]
    t0 = time.monotonic()
    summary = run_job(load_config(config))
    assert summary["run_id"] != holder["run_id"]
    assert summary["shards_skipped"] == len(committed) and not summary["shards_unfinished"], summary
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once(expected, outs, errors)
    assert_no_partial_files(fsspec.filesystem("file"), str(out))
    assert not (out / "_jobs" / "lease.json").exists(), "a finished run releases its lease"
    assert time.monotonic() - t0 < 120


def test_a_lease_without_heartbeat_is_taken_over_a_live_one_is_not(tmp_path):
    from depthray.config import StorageConfig
    from depthray.job.lease import OutputLease

    out = tmp_path / "out"
    (out / "_jobs").mkdir(parents=True)
    lease = out / "_jobs" / "lease.json"
    lease.write_text(json.dumps({"run_id": "other-host-run", "host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(OutputBusy, match="other-host-run"):
        OutputLease(str(out), StorageConfig(), "me", timeout_s=30).acquire()
    lease.write_text(json.dumps({"run_id": "other-host-run", "host": "elsewhere", "pid": 1,
                                 "heartbeat": time.time() - 60}))
    held = OutputLease(str(out), StorageConfig(), "me", timeout_s=30, heartbeat_s=0.2).acquire()
    try:
        first = json.loads(lease.read_text())
        assert first["run_id"] == "me"
        time.sleep(0.7)
        assert json.loads(lease.read_text())["heartbeat"] > first["heartbeat"]  # it beats
    finally:
        held.release()
    assert not lease.exists()


def test_changed_config_is_refused_and_overwrite_relabels_shard_by_shard(tmp_path, make_image):
    expected = write_shards(tmp_path / "in", make_image, shards=3, per=3)
    out = tmp_path / "out"
    base = job_config(str(tmp_path / "in" / "*.tar"), str(out), double_model(), executor="local")
    assert run_job(base)["shards_complete"] == 3
    changed = job_config(str(tmp_path / "in" / "*.tar"), str(out), double_model(), executor="local",
                         inference={"ensemble_size": 2})
    listing = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "_jobs" not in p.parts)
    with pytest.raises(ConfigError, match=r"inference.ensemble_size: 1 -> 2"):
        run_job(changed)
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "_jobs" not in p.parts) == listing
    changed.output.overwrite = True
    summary = run_job(changed)
    assert (summary["shards_complete"], summary["shards_skipped"]) == (3, 0), summary
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once(expected, outs, errors)
    rows = pq.read_table(str(out), columns=["config_hash"]).column("config_hash").to_pylist()
    assert set(rows) == {changed.hash("cpu")} and len(rows) == 9
    hashes = {json.loads(p.read_text())["config_hash"] for p in (out / "_manifest").glob(COMMITTED)}
    assert hashes == {changed.hash("cpu")}
    assert not (out / "_jobs" / "overwrite.json").exists(), "a finished overwrite is over"
    changed.output.overwrite = False
    assert run_job(changed)["shards_skipped"] == 3  # the relabelled output now is this config's


def test_a_deleted_part_is_noticed_and_redone(tmp_path, make_image, capsys):
    expected = write_shards(tmp_path / "in", make_image, shards=3, per=4)
    out = tmp_path / "out"
    cfg = job_config(str(tmp_path / "in" / "*.tar"), str(out), double_model(), executor="local", output={"rows_per_part": 2})
    run_job(cfg)
    manifest = json.loads((out / "_manifest" / "00001.json").read_text())
    gone = sorted(manifest["parts"])[0]
    (out / gone).unlink()
    from depthray.status import job_status

    st = job_status(cfg)
    assert st["shards_todo"] == ["00001"] and f"part {gone} is missing" in st["shards_damaged"]["00001"]
    summary = run_job(cfg)
    assert (summary["shards_skipped"], summary["shards_complete"]) == (2, 1), summary
    assert "missing" in summary["shards_redone"]["00001"]
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once(expected, outs, errors)


def test_a_list_file_that_gains_an_entry_keeps_every_shard_name(tmp_path, make_image):
    a = write_shards(tmp_path / "data" / "a", make_image, shards=2, per=2)
    listing = tmp_path / "data" / "shards.txt"
    listing.write_text("a/00000.tar\na/00001.tar\n".replace("a/", str(tmp_path / "data" / "a") + "/"))
    out = tmp_path / "out"
    first = run_job(job_config(str(listing), str(out), double_model(), executor="local"))
    assert first["shards_complete"] == 2
    b = write_shards(tmp_path / "other" / "b", make_image, shards=1, per=2)
    listing.write_text(listing.read_text() + str(tmp_path / "other" / "b" / "00000.tar") + "\n")
    second = run_job(job_config(str(listing), str(out), double_model(), executor="local"))
    assert (second["shards_skipped"], second["shards_complete"]) == (2, 1), second
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    sources = {r["source"] for r in outs}
    assert len(sources) == 3 and len(outs) == 6 and len({(r["source"], r["key"]) for r in outs}) == 6
    assert sum(len(v) for v in a.values()) + sum(len(v) for v in b.values()) == len(outs)


def test_two_inputs_with_equal_shard_names_into_one_output_are_refused(tmp_path, make_image):
    write_shards(tmp_path / "x", make_image, shards=2, per=2)
    write_shards(tmp_path / "y", make_image, shards=2, per=2)
    out = tmp_path / "out"
    assert run_job(job_config(str(tmp_path / "x" / "*.tar"), str(out), double_model(), executor="local"))["shards_complete"] == 2
    with pytest.raises(ConfigError, match=r"already holds shard '00000' from .*x/00000.tar"):
        run_job(job_config(str(tmp_path / "y" / "*.tar"), str(out), double_model(), executor="local"))


def test_the_lease_is_exclusive_on_s3_too(s3_bucket):
    """On S3 the lease is created with a conditional PUT (If-None-Match): of two runs, one
    gets it, the other is refused; released, it can be taken again."""
    from depthray.config import StorageConfig
    from depthray.job.lease import OutputLease

    url = f"s3://{s3_bucket}/out"
    first = OutputLease(url, StorageConfig(), "run-a").acquire()
    try:
        with pytest.raises(OutputBusy, match="run-a"):
            OutputLease(url, StorageConfig(), "run-b").acquire()
    finally:
        first.release()
    OutputLease(url, StorageConfig(), "run-b").acquire().release()
