"""Crash and hang bookkeeping for the inference stage, kept outside its process.

A batch whose model call kills the worker (segfault, host OOM killer) or hangs past the
watchdog would be retried by Ray forever. The note below lives in a node-local file, so
the restarted worker that Ray hands the same batch can tell, and narrow it down:

    attempt 1: whole batch; dies -> attempt 2: one image at a time, the current key noted
    before each; dies -> attempt 3: the noted key is an error ("crashed"/"timeout"), the
    rest run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

DEFAULT_GPU_BATCH_TIMEOUT_S = 1800.0


class WorkerCrashed(Exception):
    """An image whose prediction killed the worker process on every attempt."""


class WorkerHung(WorkerCrashed):
    """An image whose prediction ran past compute.batch_timeout_s on every attempt."""


class InFlight:
    """Node-local note of the batch an actor is working on, so the restarted actor that Ray
    hands the same batch again can tell the last attempt killed its process (segfault,
    host OOM killer) and find the image that did it.

    attempt 1: whole batch; dies -> attempt 2: one image at a time, the current key noted
    before each; dies -> attempt 3: the noted key is an error ("crashed"), the rest run.
    Without this an image that always kills the process would be retried forever. A hang
    takes the same path: the watchdog notes it (`mark_hung`) and ends the process.

    Rows are named by (source shard, key): Parquet shards without a key column number
    their rows, so keys alone repeat across shards, and one batch can span shards. The
    note also names the node of the attempt that wrote it: when that node is gone (spot
    preemption, a lost host) and the batch comes back elsewhere, the lost attempt is not
    counted against the batch or its current image; they are simply redone.
    """

    def __init__(self, run_id: str, rows: list[dict]):
        ids = "\n".join(sorted(row_id(r) for r in rows))
        digest = hashlib.sha1(f"{run_id}\n{ids}".encode()).hexdigest()[:20]
        self.path = os.path.join(tempfile.gettempdir(), "depthray-inflight", f"{digest}.json")
        self.node = current_node()
        self.node_lost = False
        try:
            with open(self.path) as f:
                self.state = json.load(f)
        except (OSError, ValueError):
            self.state = {"attempt": 0, "current": None, "crashed": [], "hung": [], "hanging": False}
        prev = self.state.get("node")
        if self.state["attempt"] and prev and prev != self.node and not node_alive(prev):
            # The previous attempt went down with its node, not because of this batch.
            log.warning("a previous attempt of this batch of %d was lost with its node %s; redoing it",
                        len(rows), prev[:12])
            self.node_lost = True
            self.state["attempt"] -= 1
            self.state["current"] = None
        self.state["node"] = self.node
        self.state["attempt"] += 1
        if self.state["current"] is not None:  # the last attempt died on this image
            self.state["crashed"].append(self.state["current"])
            if self.state.get("hanging"):
                self.state.setdefault("hung", []).append(self.state["current"])
            self.state["current"] = None
        self.state["hanging"] = False
        self.save()

    @property
    def retried(self) -> bool:
        return self.state["attempt"] > 1

    def crashed(self, row: dict) -> WorkerCrashed | None:
        """Why `row` must not run again (it killed or hung its worker twice), else None."""
        if row_id(row) not in self.state["crashed"]:
            return None
        if row_id(row) in self.state.get("hung", []):
            limit = float(self.state.get("timeout_s") or 0)
            return WorkerHung(f"prediction ran past compute.batch_timeout_s={limit:g} s twice (the "
                              "model call hung; its worker was restarted); skipped")
        return WorkerCrashed("the worker process died while predicting this image, twice; skipped")

    def mark_hung(self, timeout_s: float) -> None:
        self.state["hanging"] = True
        self.state["timeout_s"] = timeout_s
        self.save()

    def working_on(self, row: dict | None) -> None:
        self.state["current"] = row_id(row) if row else None
        self.save()

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def done(self) -> None:
        try:
            os.remove(self.path)
        except OSError:
            pass


def row_id(row: dict) -> str:
    """A row's name across shards: (source shard, key)."""
    return f"{row['source']}\t{row['key']}"


def current_node() -> str | None:
    """The Ray node this process runs on; None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def node_alive(node_id: str) -> bool:
    """Whether Ray still counts `node_id` alive; True when that cannot be told (so a crash
    is never taken for a node loss without evidence)."""
    try:
        import ray

        for n in ray.nodes():
            if n.get("NodeID") == node_id:
                return bool(n.get("Alive"))
        return False
    except Exception:
        return True
