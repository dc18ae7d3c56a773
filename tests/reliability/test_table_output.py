"""`output.format: delta` (depthray/io/table.py): a `depthray run` killed at each step of a
shard's commit, on local disk and on moto S3; what a Delta reader sees right after
(`DeltaTable(url).to_pyarrow_table()`: never part of a shard, never a key twice); then a
plain and an overwrite re-run of two copies: every key once, one config. Each shard (and
each shard's overwrite) is one table version, read from the log's own JSON; a re-run after
OPTIMIZE replaces each compacted shard whole; and two processes committing one shard at
once on moto: Delta's conflict check refuses one.

The table commit is the driver's whichever executor labelled the rows, so the jobs run the
stage chain with `compute.executor: local` (no Ray job per crash); one case, the hardest
(on moto S3, killed between the commit record and the transaction, which the next run then
takes), runs the real Ray job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from depthray.config import load_config
from depthray.job.driver import run_job
from tests.reliability.conftest import REPO, assert_exactly_once
from tests.reliability.crash_harness import Output, inputs, job, rerun_copies
from tests.reliability.test_commit_windows import killed_at, state

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def output(request, tmp_path):
    """The crashed output: `request.param` "local" (a folder) or "s3" (moto), set per case."""
    if request.param == "s3":
        return Output("s3", tmp_path, request.getfixturevalue("s3_bucket"))
    return Output("local", tmp_path)


def seen_in_table(output: Output, name: str = "out") -> tuple[dict[str, set[str]], Counter, list[dict]]:
    rows, errors = output.table_view(name)
    seen = Counter((r["source"], r["key"]) for r in rows)
    per: dict[str, set[str]] = {}
    for source, key in seen:
        per.setdefault(source, set()).add(key)
    return per, seen, rows


def results(expected: dict[str, set[str]]) -> dict[str, set[str]]:
    return {s: {k for k in keys if k != "s1bad"} for s, keys in expected.items()}  # s1bad: an error row


def versions(output: Output, name: str) -> list[str]:
    return [f for f in output.files(name) if f.startswith("_delta_log/") and f.endswith(".json")]


def reruns_finish_exactly_once(output: Output, config, expected, finished: int, taken: int = 0,
                               overwriting: int = 0) -> None:
    """Two copies of the crashed output, re-run without and with `output.overwrite`: the
    table and `_errors/` hold every key once, all rows from this config, no record left.
    Each re-run adds one table version per shard it commits, plus `taken` for the record it
    replays when the table's log shows that record's transaction is not in (a replay never
    takes one twice), and the plain re-run redoes no shard but the `overwriting` ones an
    overwrite in progress had not reached."""
    before = len(versions(output, "out"))
    for name, overwrite, cfg, summary in rerun_copies(output, config):
        assert summary["repaired"]["commits_finished"] == finished, summary["repaired"]
        assert len(versions(output, name)) == before + taken + summary["shards_complete"], versions(output, name)
        if not overwrite:
            assert list(summary["shards_redone"].values()) == ["overwriting"] * overwriting, summary["shards_redone"]
        rows, errors = output.table_view(name)
        assert_exactly_once(expected, rows, errors)
        assert {r["config_hash"] for r in rows} == {cfg.hash("cpu")}, f"overwrite={overwrite}"
        assert not [f for f in output.files(name) if f.startswith(("_pending/", "_trash/"))]


STEPS = ["commit_start:2", "table_commit:2", "table_committed:2", "before_manifest:2", "after_manifest:2"]
RAY_CASE = ("s3", "table_commit:2")  # the one case on the real Ray job: S3, a transaction still to take
CASES = [(store, step, "ray" if (store, step) == RAY_CASE else "local") for store in ("local", "s3") for step in STEPS]


@pytest.mark.parametrize("output,step,executor", CASES, indirect=["output"])
def test_a_delta_reader_sees_a_shard_whole_or_not_at_all(request, output, tmp_path, make_image, step, executor):
    """Killed before the shard's commit record, between it and the shard's transaction
    (nothing of the shard in the table either way), after the transaction (all of its rows;
    its error rows not yet under `_errors/`), before and after its manifest. The next run,
    either mode, finishes the commit from its record, taking the transaction only if the
    table's log says it is not in, and every key ends once."""
    if executor == "ray":
        request.getfixturevalue("ray_session")
    expected = inputs(tmp_path, make_image)
    config = job(tmp_path, output.url(), "delta", executor=executor)
    killed_at(step, config, tmp_path)
    manifests, records = state(output)
    per, seen, _ = seen_in_table(output)
    assert max(seen.values(), default=1) == 1, seen
    for s, keys in per.items():  # every shard in the table is there whole
        assert keys == results(expected)[s], s
    if step == "commit_start:2":  # the record is not written yet: the shard is redone
        assert records == [] and set(per) == manifests, (per, manifests)
        reruns_finish_exactly_once(output, config, expected, finished=0)
        return
    assert len(records) == 1, records
    shard = records[0]["shard"]
    in_table = step != "table_commit:2"  # in the table from its transaction on
    assert set(per) == manifests | ({shard} if in_table else set()), (per, manifests)
    errors_seen = {e["source"] for e in output.table_view()[1]}
    if step == "table_committed:2":  # its error rows (shard 00001 has one) come after the transaction
        assert shard not in errors_seen
    assert (shard in manifests) == (step == "after_manifest:2")
    reruns_finish_exactly_once(output, config, expected, finished=1, taken=int(not in_table))


@pytest.mark.parametrize("output", ["local", "s3"], indirect=True)
def test_an_overwrite_cut_after_its_transaction_shows_new_rows_only(output, tmp_path, make_image):
    """An overwrite killed right after its second shard's transaction: that shard's new rows
    replaced its old ones in the same version (never both, never neither); re-runs finish."""
    expected = inputs(tmp_path, make_image)
    base = load_config(job(tmp_path, output.url(), "delta", name="base"))
    assert run_job(base)["shards_complete"] == 3
    config = job(tmp_path, output.url(), "delta", name="relabel", inference={"ensemble_size": 2},
                 output={"overwrite": True, "rows_per_part": 3})
    killed_at("table_committed:2", config, tmp_path)
    (record,) = state(output)[1]
    per, seen, rows = seen_in_table(output)
    assert max(seen.values()) == 1 and per == results(expected), seen
    new_hash = load_config(config).hash("cpu")
    assert {r["config_hash"] for r in rows if r["source"] == record["shard"]} == {new_hash}
    assert {r["config_hash"] for r in rows} <= {base.hash("cpu"), new_hash}
    reruns_finish_exactly_once(output, config, expected, finished=1, overwriting=1)  # the third shard


def log_commits(output: Output, name: str = "out") -> list[dict]:
    """The table's versions as its log files say: per version, the files added and removed."""
    out = []
    for rel in sorted(f for f in output.files(name) if f.startswith("_delta_log/") and f.endswith(".json")):
        actions = [json.loads(line) for line in output.fs.cat_file(f"{output.root(name)}/{rel}").decode().splitlines()]
        out.append({"add": {a["add"]["path"] for a in actions if "add" in a},
                    "remove": {a["remove"]["path"] for a in actions if "remove" in a}})
    return out


def test_each_shard_and_its_overwrite_is_one_table_version(tmp_path, make_image):
    """Every shard's parts enter the table in one version, and an overwrite's version also
    removes every part the shard had: read from `_delta_log/*.json` itself."""
    output = Output("local", tmp_path)
    expected = inputs(tmp_path, make_image)
    assert run_job(load_config(job(tmp_path, output.url(), "delta", name="base")))["shards_complete"] == 3
    first = {s: set(output.read_json(f"_manifest/{s}.json")["parts"]) for s in expected}
    assert all(len(p) >= 2 for p in first.values()), first  # several parts per shard
    config = job(tmp_path, output.url(), "delta", name="relabel", inference={"ensemble_size": 2},
                 output={"overwrite": True})
    assert run_job(load_config(config))["shards_complete"] == 3
    second = {s: set(output.read_json(f"_manifest/{s}.json")["parts"]) for s in expected}
    commits = [c for c in log_commits(output) if c["add"] or c["remove"]]
    assert len(commits) == 6, commits
    for s in expected:
        assert [c["add"] for c in commits if c["add"] & first[s]] == [first[s]], s
        (over,) = [c for c in commits if c["add"] & second[s]]
        assert over == {"add": second[s], "remove": first[s]}, s
    rows, errors = output.table_view()
    assert_exactly_once(expected, rows, errors)
    # The overwrite's removed parts are still in the folder (for readers of older versions):
    # depthray's reader (preview, eval) reads the table, not the folder.
    on_disk = [f for f in output.files() if f.endswith(".parquet") and not f.startswith("_")]
    assert len(on_disk) == sum(len(first[s]) + len(second[s]) for s in expected)
    from depthray.io.outputs import read_outputs

    assert Counter(r.key for r in read_outputs(output.url())) == Counter(r["key"] for r in rows)


def test_a_rerun_after_optimize_replaces_each_compacted_shard_whole(tmp_path, make_image):
    """Delta's OPTIMIZE rewrites each shard's parts into files of its own (`source={shard}/`):
    the manifests' parts are no longer listed, so a plain re-run redoes every such shard, and
    each shard's one version removes exactly its partition's compacted files: every key
    once, rows of this config only, no compacted file left in the latest version."""
    from deltalake import DeltaTable

    from depthray.config import StorageConfig
    from depthray.io.table import ShardTable

    output = Output("local", tmp_path)
    expected = inputs(tmp_path, make_image)
    config = job(tmp_path, output.url(), "delta")
    assert run_job(load_config(config))["shards_complete"] == 3
    DeltaTable(output.url()).optimize.compact()
    table = ShardTable(output.url(), StorageConfig())
    compacted = {s: set(table.shard_files(s)) for s in expected}
    assert all(files and all(f.startswith(f"source={s}/") for f in files) for s, files in compacted.items()), compacted
    summary = run_job(load_config(config))
    assert summary["shards_complete"] == 3 and not summary["job_error"], summary
    assert set(summary["shards_redone"]) == set(expected), summary["shards_redone"]
    assert all(why.startswith("part ") and why.endswith(" is missing") for why in summary["shards_redone"].values())
    commits = log_commits(output)
    assert sorted(sorted(c["remove"]) for c in commits[-3:]) == sorted(sorted(f) for f in compacted.values())
    assert not set(table.files()) & set().union(*compacted.values())
    rows, errors = output.table_view()
    assert_exactly_once(expected, rows, errors)
    assert {r["config_hash"] for r in rows} == {load_config(config).hash("cpu")}


CHILD = r"""
import sys, time, os
from depthray.config import StorageConfig
from depthray.io.sinks import TableSink
from depthray.io.table import ShardTable
url, me, gate = sys.argv[1], sys.argv[2], sys.argv[3]
row = {"key": "k1", "source": "a", "width": 1, "height": 1, "depth": b"d", "uncertainty": b"u"}
sink = TableSink(url, StorageConfig(), "m", "h-" + me, run_id="run-" + me)
part = dict([sink.write("a", [row, {**row, "key": "k2"}], "0123456789abcdef")])
table = ShardTable(url, StorageConfig())
txn = table.next_txn()  # both read the table before either commits
open(gate + "." + me, "w").close()
while not os.path.exists(gate):
    time.sleep(0.01)
try:
    print("committed", table.commit("a", part, txn))
except Exception as e:
    print("refused", type(e).__name__, e)
"""


def test_two_writers_committing_one_shard_at_once_one_is_refused(s3_bucket, tmp_path):
    """Two processes commit shard `a` into one table on moto S3, lined up after both read it:
    Delta's conflict check (the shard's application transaction) refuses one, and the table
    holds the shard's keys once: the winner's."""
    from depthray.config import StorageConfig
    from depthray.io.sinks import OUTPUT_SCHEMA
    from depthray.io.table import ShardTable

    url = f"s3://{s3_bucket}/out"
    ShardTable(url, StorageConfig()).ensure(OUTPUT_SCHEMA)
    gate = str(tmp_path / "gate")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, url, me, gate], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for me in ("1", "2")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"gate.{me}").exists() for me in ("1", "2")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "gate").touch()
    said = sorted(p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs)
    assert said[0].startswith("committed") and said[1].startswith("refused"), said
    assert "concurrent transaction" in said[1].lower(), said
    output = Output("s3", tmp_path, s3_bucket)
    rows, _ = output.table_view()
    assert sorted(r["key"] for r in rows) == ["k1", "k2"]
    assert len({r["config_hash"] for r in rows}) == 1  # one writer's rows, not a mix
