"""One writer per output: a fenced lease in `{output}/_jobs/lease.json`, renewed by a heartbeat.

A run takes the lease before it deletes or writes anything. A second run on the same
output finds it and stops at once, naming the run that holds it; a lease whose heartbeat
is older than `output.lease_timeout_s` (its run was killed, its node lost) is taken over.

Every change of the lease is a compare-and-swap (depthray/io/conditional.py: If-Match on
S3, a locked read-compare-replace on local disk), so of two runs taking over one stale
lease exactly one wins, and a heartbeat never overwrites a lease another run took over.
Each holder has a generation (the one it took over + 1): the fencing token that every
manifest records. Before each commit the ledger calls `verify`; a run whose lease was taken
over (it froze past the timeout, say) gets LeaseLost there and commits nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from depthray import crash_points
from depthray.config import ConfigError
from depthray.io.conditional import delete_if, read_versioned, write_if
from depthray.io.fs import filesystem, join

log = logging.getLogger(__name__)

LEASE_FILE = "_jobs/lease.json"


class OutputBusy(ConfigError):
    """Another run holds this output's lease."""


class LeaseLost(RuntimeError):
    """Another run took this run's lease over: this run must stop committing."""


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (a killed `depthray run`): its
    lease needs no timeout to be known stale."""
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _parse(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:  # half-written by a dying writer on a store without atomic PUT
        return {"run_id": "?", "heartbeat": 0.0}


def describe(holder: dict | None) -> str:
    if not holder:
        return "nobody (the lease is gone)"
    return (f"run {holder.get('run_id')} on {holder.get('host', '?')} (pid {holder.get('pid', '?')}, "
            f"lease generation {holder.get('generation', '?')})")


class OutputLease:
    def __init__(self, output_url: str, storage, run_id: str, timeout_s: float = 300.0,
                 heartbeat_s: float | None = None):
        self.fs, root = filesystem(output_url, storage)
        self.url = output_url
        self.path = join(root, LEASE_FILE)
        self.run_id = run_id
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = heartbeat_s or max(1.0, self.timeout_s / 5)
        self.generation = 0  # the fencing token, once held
        self.lost: str | None = None  # who took the lease over, once this run knows
        self._version: str | None = None  # of the lease as this run last wrote it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time(), "timeout_s": self.timeout_s,
                           "generation": self.generation}).encode()

    def holder(self) -> dict | None:
        return _parse(read_versioned(self.fs, self.path)[0])

    def acquire(self) -> "OutputLease":
        """Take the lease (taking over a stale one) or raise OutputBusy; starts the heartbeat."""
        for _ in range(5):
            data, version = read_versioned(self.fs, self.path)
            other = _parse(data)
            if other is not None and other.get("run_id") == self.run_id:
                # our own write landed though its answer was lost (a retried PUT then fails If-Match)
                self.generation, self._version = int(other.get("generation") or 0), version
                break
            if other is not None:
                age = time.time() - float(other.get("heartbeat") or 0)
                dead = _dead_here(other)
                if age < self.timeout_s and not dead:
                    raise OutputBusy(
                        f"output.url {self.url!r} is being written by run {other.get('run_id')} on "
                        f"{other.get('host', '?')} (pid {other.get('pid', '?')}, heartbeat {age:.0f} s ago); "
                        f"one run per output. Wait for it, or stop it; a lease without heartbeat for "
                        f"output.lease_timeout_s={self.timeout_s:g} s is taken over.")
                log.warning("taking over the lease of run %s (%s)", other.get("run_id"),
                            "its process on this host is gone" if dead else f"no heartbeat for {age:.0f} s")
                crash_points.reached("lease_takeover")
            self.generation = int((other or {}).get("generation") or 0) + 1
            # Conditional on the version just read: if another run changed the lease since
            # (took it over too, or its holder beat), this write fails and the loop looks again.
            self._version = write_if(self.fs, self.path, self._body(), version)
            if self._version is not None:
                break
        else:
            raise OutputBusy(f"output.url {self.url!r}: could not take the output lease (contended)")
        self._thread = threading.Thread(target=self._beat, name="depthray-lease", daemon=True)
        self._thread.start()
        return self

    def _lose(self, holder: dict | None) -> str:
        self.lost = (f"this run ({self.run_id}, lease generation {self.generation}) lost the lease of "
                     f"output.url {self.url!r} to {describe(holder)}: it stopped committing")
        log.error("%s", self.lost)
        return self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                version = write_if(self.fs, self.path, self._body(), self._version)
            except Exception as e:  # a missed beat is not fatal; timeout_s covers several
                log.warning("lease heartbeat failed: %s", e)
                continue
            if version is None:
                data, version = read_versioned(self.fs, self.path)
                holder = _parse(data)
                if not self._ours(holder):  # somebody replaced our lease: it is theirs now
                    self._lose(holder)
                    return
                # else our own beat landed though its answer was lost (a retried PUT fails If-Match)
            self._version = version

    def _ours(self, holder: dict | None) -> bool:
        return bool(holder) and holder.get("run_id") == self.run_id and holder.get("generation") == self.generation

    def verify(self) -> int:
        """This run's lease generation (the fencing token a manifest records); raises
        LeaseLost, naming the other run, once the lease is no longer this run's."""
        if self.lost:
            raise LeaseLost(self.lost)
        holder = self.holder()
        if not self._ours(holder):
            raise LeaseLost(self._lose(holder))
        return self.generation

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost or self._version is None:
            return  # not ours (any more): leave it to its holder
        try:
            delete_if(self.fs, self.path, self._version)
        except Exception as e:
            log.warning("could not release the output lease %s: %s", self.path, e)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
