"""Crash bookkeeping names rows by (source shard, key): Parquet shards without a key column
number their rows, so the same key appears in every shard, and one batch can span shards."""

from __future__ import annotations

import uuid

from depthray.job.inflight import InFlight


def test_a_crash_marks_only_its_own_shards_key():
    run = uuid.uuid4().hex
    rows = [{"source": "a", "key": "0"}, {"source": "b", "key": "0"}, {"source": "b", "key": "1"}]
    for attempt in (1, 2):  # the whole batch dies, then the image-by-image retry dies on a/0
        note = InFlight(run, rows)
        assert note.state["attempt"] == attempt and not note.node_lost
    note.working_on(rows[0])
    third = InFlight(run, rows)  # what the restarted worker sees
    try:
        assert third.retried
        assert third.crashed(rows[0]) is not None
        assert third.crashed(rows[1]) is None, "b/0 shares a's key but never ran"
        assert third.crashed(rows[2]) is None
    finally:
        third.done()
