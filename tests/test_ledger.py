"""Driver bookkeeping (depthray.job.ledger): commit only complete shards, refuse duplicates,
progress with a time-left estimate."""

from __future__ import annotations

import json

import pytest

from depthray.durations import format_duration
from depthray.job.ledger import ShardLedger


def ack(source: str, outputs: int, errors: int = 0, total: int | None = None) -> dict:
    """A write-stage acknowledgement; `total` marks the batch carrying the shard's trailer."""
    return {"source": source, "rows": outputs + errors + (1 if total is not None else 0),
            "outputs": outputs, "errors": errors, "parts": [f"{source}.part"], "error_parts": [],
            "error_reasons": json.dumps({"decode": errors} if errors else {}), "infer_s": 0.1 * outputs,
            "shard_total": total, "shard_error": None}


def test_commits_a_shard_once_all_rows_landed_and_estimates_time_left():
    commits = {}
    t = ShardLedger({"a": "u/a", "b": "u/b", "c": "u/c"}, commits.__setitem__, {"run_id": "r"})
    t.update(ack("a", 6))
    assert commits == {} and t.eta_seconds() is None  # no shard finished: no basis for a guess
    t.update(ack("a", 3, errors=1, total=10))
    assert list(commits) == ["a"] and commits["a"]["outputs"] == 9 and commits["a"]["errors"] == 1
    assert commits["a"]["inputs"] == 10 and commits["a"]["run_id"] == "r"
    t.update(ack("b", 5))
    # 15 rows in 10 s -> 1.5 rows/s; left: b needs 5 more (10 per shard), c needs 10.
    t.start = 100.0
    assert t.eta_seconds(now=110.0) == pytest.approx(15 / 1.5)
    t.update(ack("b", 5, total=10))
    t.update(ack("c", 10, total=10))
    assert sorted(commits) == ["a", "b", "c"] and t.eta_seconds() == 0.0
    s = t.summary()
    assert (s["shards_complete"], s["images"], s["errors"], s["shards_unfinished"]) == (3, 29, 1, {})


def test_more_rows_than_read_is_refused_and_late_acks_are_ignored():
    t = ShardLedger({"a": "u/a", "b": "u/b"}, lambda *a: None, {})
    with pytest.raises(RuntimeError, match="refusing to commit a duplicate"):
        t.update(ack("a", 3, total=2))  # 3 outputs + trailer for a shard of 2 images
    commits = []
    t = ShardLedger({"b": "u/b"}, lambda name, m: commits.append(name), {})
    t.update(ack("b", 2, total=2))
    t.update(ack("b", 1))  # a retried write after the commit: never a second commit
    assert commits == ["b"] and t.images == 2


@pytest.mark.parametrize("seconds,text", [(8, "8s"), (95, "1m35s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_line_says_time_left_only_once_a_shard_gave_a_rate():
    t = ShardLedger({"a": "u/a", "b": "u/b"}, lambda *a: None, {})
    t.start = 100.0
    t.update(ack("a", 6))
    line = t.progress_line(now=200.0)  # images written, but no shard finished: no rate per shard
    assert line.startswith("progress: 0/2 shards, 6 images") and "left" not in line
    t.update(ack("a", 4, total=10))
    assert t.progress_line(now=110.0).endswith("about 10s left")  # b: 10 images at 1 image/s


def test_the_end_of_a_job_does_not_repeat_the_last_progress_line(caplog):
    t = ShardLedger({"a": "u/a"}, lambda *a: None, {}, log_every_s=0.0)
    with caplog.at_level("INFO", logger="depthray.job.ledger"):
        t.update(ack("a", 2, total=2))  # logs the line (every 0 s)
        t.maybe_log(force=True)  # the job's end: nothing new since
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 1 and lines[0].startswith("progress: 1/1 shards, 2 images"), lines
