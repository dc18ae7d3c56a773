"""A `depthray run` killed at each named step of a shard's commit (depthray/crash_points.py),
on local disk and on moto S3: what a plain reader sees right after the crash, then what a
plain re-run and an overwrite re-run of two copies of that output leave: every key
exactly once, all rows from one configuration. Real processes killed by SIGKILL, nothing
filtered before the exactly-once check. The commit is the driver's, whichever executor
labelled the rows, so the runs use `compute.executor: local` (no Ray job per crash); one
case (the first crash point, both stores) runs the real Ray job."""

from __future__ import annotations

from collections import Counter

import pytest

from depthray.config import load_config
from depthray.job.driver import run_job
from tests.reliability.conftest import assert_exactly_once
from tests.reliability.crash_harness import Output, inputs, job, rerun_copies, run_killed

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "s3":
        return Output("s3", tmp_path, request.getfixturevalue("s3_bucket"))
    return Output("local", tmp_path)


def killed_at(step: str, config, tmp_path) -> None:
    log = tmp_path / f"killed-{step.replace(':', '-')}.log"
    rc = run_killed(config, log, {"DEPTHRAY_CRASH_AT": step})
    assert rc == -9, f"not killed at {step} (rc {rc}):\n" + log.read_text()[-3000:]


def state(output: Output, name: str = "out") -> tuple[set[str], list[dict]]:
    """(shards with a manifest, commit records left under _pending/)."""
    files = output.files(name)
    manifests = {f[len("_manifest/"):-len(".json")] for f in files
                 if f.startswith("_manifest/") and f.endswith(".json") and "/." not in f}
    records = [output.read_json(f, name) for f in files if f.startswith("_pending/") and f.endswith(".json")]
    return manifests, records


def visible(output: Output, name: str = "out") -> tuple[dict[str, set[str]], Counter, list[dict]]:
    """Keys a plain reader sees per shard (results and errors), how often each appears, and
    the result rows."""
    rows, errors = output.plain_view(name)
    seen = Counter((r["source"], r["key"]) for r in rows + errors)
    per: dict[str, set[str]] = {}
    for source, key in seen:
        per.setdefault(source, set()).add(key)
    return per, seen, rows


def reruns_finish_exactly_once(output: Output, config, expected, repaired: bool) -> None:
    """Two copies of the crashed output, re-run with the same settings: without, then with
    `output.overwrite`. Each ends with every key once and one config hash on every row."""
    for name, overwrite, cfg, summary in rerun_copies(output, config):
        if repaired:  # the killed run's commit was finished before any work
            assert summary["repaired"]["commits_finished"] == 1, summary["repaired"]
        rows, errors = output.plain_view(name)
        assert_exactly_once(expected, rows, errors)
        assert {r["config_hash"] for r in rows} == {cfg.hash("cpu")}, f"overwrite={overwrite}"
        left = [f for f in output.files(name) if f.startswith(("_pending/", "_trash/"))]
        assert not left, left


@pytest.mark.parametrize("step,fmt,executor", [("part_moved:1", "parquet", "ray"),
                                               ("part_moved:1", "webdataset", "local"),
                                               ("before_manifest:2", "parquet", "local"),
                                               ("after_manifest:2", "parquet", "local")])
def test_a_crash_mid_commit_is_finished_by_the_next_run(request, output, tmp_path, make_image, step, fmt, executor):
    """Killed after the first part (S3) / part folder (local disk) moved, before the
    manifest, after it. Local disk: a shard's results appear with one folder rename, so a
    plain reader sees all of them or none; S3: some of its parts (the window that remains).
    Never a key twice; the next run, either mode, finishes the commit first."""
    if executor == "ray":
        request.getfixturevalue("ray_session")
    expected = inputs(tmp_path, make_image)
    config = job(tmp_path, output.url(), fmt, executor=executor)
    killed_at(step, config, tmp_path)
    manifests, records = state(output)
    assert len(records) == 1, records  # the commit the kill cut short, and only it
    shard = records[0]["shard"]
    per, seen, _ = visible(output)
    assert max(seen.values()) == 1, seen  # no key twice, whatever the step
    for s in expected:  # committed shards whole; uncommitted ones (but the one mid-commit) absent
        if s in manifests - {shard}:
            assert per.get(s) == expected[s], s
        elif s != shard:
            assert s not in per, s
    results = {k for k in expected[shard] if k != "s1bad"}  # s1bad is an error row
    if step == "part_moved:1" and output.kind == "local":
        assert per[shard] == results  # the shard's result folder, whole; its errors not yet
    elif step == "part_moved:1":
        assert 0 < len(per[shard]) < len(results), per[shard]  # S3: one part of several
    else:
        assert per[shard] == expected[shard]
        assert (shard in manifests) == (step == "after_manifest:2")
    reruns_finish_exactly_once(output, config, expected, repaired=True)


@pytest.mark.parametrize("step", ["old_parts_hidden:2", "new_parts_in_place:2"])
def test_a_crash_mid_overwrite_never_shows_a_key_twice(output, tmp_path, make_image, step):
    """An overwrite killed in its second shard's commit, after the old parts left readers'
    sight (local disk: moved into `_trash/`; S3: deleted) and after the new ones are in place
    (the old ones not yet deleted: issue #24's permanent duplicates). A plain reader never
    sees a key twice; a re-run with the same settings, with or without output.overwrite,
    finishes the relabelling."""
    expected = inputs(tmp_path, make_image)
    base = load_config(job(tmp_path, output.url(), name="base"))
    assert run_job(base)["shards_complete"] == 3
    # One part per shard now (two keys per part before): the new parts get other names than
    # the old ones (a part's name is the hash of its keys; a same-named part is replaced in
    # place, one atomic PUT or rename, so it would show its old rows until then).
    config = job(tmp_path, output.url(), name="relabel", inference={"ensemble_size": 2},
                 output={"overwrite": True, "rows_per_part": 100})
    killed_at(step, config, tmp_path)
    manifests, records = state(output)
    assert len(records) == 1, records
    shard = records[0]["shard"]
    per, seen, rows = visible(output)
    assert max(seen.values()) == 1, seen
    new_hash = load_config(config).hash("cpu")
    if step == "old_parts_hidden:2":  # the shard is out of sight for the moment, never doubled
        assert per == {s: keys for s, keys in expected.items() if s != shard}
    else:
        assert per == expected
        assert {r["config_hash"] for r in rows if r["source"] == shard} == {new_hash}
    assert {r["config_hash"] for r in rows} <= {base.hash("cpu"), new_hash}
    reruns_finish_exactly_once(output, config, expected, repaired=True)


def test_a_crash_while_taking_over_a_lease_changes_nothing(output, tmp_path, make_image):
    """A run killed mid-commit leaves its lease; the next one is killed while taking it over
    (before its conditional write): the output, lease included, is as the first left it.
    The run after that takes the lease over (generation 2, in its manifests) and finishes."""
    expected = inputs(tmp_path, make_image)
    config = job(tmp_path, output.url())
    killed_at("before_manifest:2", config, tmp_path)
    before = {f: output.fs.cat_file(f"{output.root()}/{f}") for f in output.files()}
    lease = output.read_json("_jobs/lease.json")
    assert lease["generation"] == 1
    killed_at("lease_takeover", config, tmp_path)
    assert "taking over the lease" in (tmp_path / "killed-lease_takeover.log").read_text()
    after = {f: output.fs.cat_file(f"{output.root()}/{f}") for f in output.files()}
    assert after == before
    reruns_finish_exactly_once(output, config, expected, repaired=True)
    for name in ("out-plain", "out-overwrite"):
        generations = {output.read_json(f"_manifest/{s}.json", name)["lease_generation"] for s in expected}
        assert generations <= {1, 2} and 2 in generations, generations


def test_a_commit_whose_parts_were_lost_is_dropped_and_its_visible_parts_deleted(output, tmp_path,
                                                                                  make_image):
    """Killed after its first move; then one of the shard's new parts is lost (deleted by
    hand). The record cannot be finished: the next run drops it and deletes the parts it
    had made visible (no manifest claims them), whatever it runs: here only the other shards."""
    expected = inputs(tmp_path, make_image)
    killed_at("part_moved:1", job(tmp_path, output.url()), tmp_path)
    (record,) = state(output)[1]
    shard = record["shard"]
    lost = sorted(record["manifest"]["parts"])[-1]  # S3: still staged; local disk: in place
    for rel in (lost, f"_staging/{lost}"):
        if output.fs.exists(f"{output.root()}/{rel}"):
            output.fs.rm_file(f"{output.root()}/{rel}")
    assert shard in visible(output)[0]
    others = [s for s in expected if s != shard]
    cfg = load_config(job(tmp_path, output.url(), name="others",
                          input={"url": str(tmp_path / "in" / f"{{{','.join(others)}}}.tar")}))
    summary = run_job(cfg)
    assert summary["repaired"]["commits_dropped"] == 1 and summary["repaired"]["orphan_parts_deleted"] >= 1
    rows, errors = output.plain_view()
    assert_exactly_once({s: expected[s] for s in others}, rows, errors)


def test_a_side_by_side_output_left_with_old_and_new_parts_is_cleaned(tmp_path):
    """Outputs written before shard folders kept parts side by side; an overwrite killed
    between moving the new parts and deleting the old ones left both visible (issue #24's
    permanent duplicates). The next run deletes the visible part the manifest does not list,
    whatever its mode, before anything else."""
    from depthray.config import StorageConfig, config_from_dict
    from depthray.io.manifest import ManifestStore, resume_shards
    from depthray.io.sources import Shard

    out = tmp_path / "out"
    out.mkdir()
    old, new = "a.part-0123456789abcdef.parquet", "a.part-fedcba9876543210.parquet"
    (out / old).write_bytes(b"x")
    (out / new).write_bytes(b"y")
    cfg = config_from_dict({"output": {"url": str(out)}, "input": {"url": "x"}})
    ManifestStore(str(out), StorageConfig()).write("a", {"status": "complete", "url": "file:///a.tar",
                                                         "config_hash": cfg.hash(), "parts": {old: 1}})
    plan = resume_shards([Shard("a", "file:///a.tar", "webdataset")], cfg)
    assert plan.skipped == ["a"] and plan.deleted_parts == 1
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [old]
