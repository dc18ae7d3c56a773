"""Named points of the commit protocol where a test can kill or hold the driver.

Tests only. `DEPTHRAY_CRASH_AT=<step>[:<n>]` SIGKILLs this process the n-th time (default:
the first) it reaches `<step>`: the crash lands exactly there, not wherever a timer
happened to fire. `DEPTHRAY_PAUSE_AT=<step>[:<n>]=<path>` holds it there instead: the
process writes `<path>.<pid>.reached` and waits (up to 120 s) until `<path>` exists, so a
test can line two processes up at one step (two runs taking over one lease) or act on the
output while a run waits mid-commit.

Unset, `reached` costs two environment lookups; it is called a few times per shard commit.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

# Where the commit protocol (depthray/io/commit.py) and the lease (depthray/job/lease.py) call
# `reached`, in the order a commit passes them.
STEPS = (
    "commit_start",  # a shard is complete; nothing of its commit is written yet
    "table_commit",  # Delta output: the commit record is written, the shard's transaction not yet taken
    "table_committed",  # Delta output: the shard's transaction is in the table, its error parts not yet
    "old_parts_hidden",  # overwrite: the replaced parts are out of readers' sight, new ones not yet in
    "part_moved",  # one more staged part (S3) / part folder (local disk) is in place
    "new_parts_in_place",  # every new part is in place; the replaced ones are not yet deleted
    "before_manifest",  # parts in place, old ones gone, the manifest not yet written
    "after_manifest",  # the manifest is written; the commit record not yet removed
    "lease_takeover",  # a stale lease was read and is about to be taken over
)

_counts: Counter = Counter()


def _parse(value: str) -> tuple[str, int]:
    step, _, n = value.partition(":")
    if step not in STEPS:  # a misspelt step would make a crash test pass without crashing
        raise ValueError(f"crash point {step!r} is unknown; steps: {', '.join(STEPS)}")
    return step, int(n or 1)


def reached(step: str) -> None:
    crash, pause = os.environ.get("DEPTHRAY_CRASH_AT"), os.environ.get("DEPTHRAY_PAUSE_AT")
    if crash is None and pause is None:
        return
    _counts[step] += 1
    if crash and _parse(crash) == (step, _counts[step]):
        os.kill(os.getpid(), signal.SIGKILL)
    if pause:
        where, _, path = pause.partition("=")
        if _parse(where) == (step, _counts[step]):
            with open(f"{path}.{os.getpid()}.reached", "w") as f:
                f.write(step)
            deadline = time.monotonic() + 120
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
