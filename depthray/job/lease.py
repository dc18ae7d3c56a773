"""One writer per output: a lease in `{output}/_jobs/lease.json`, renewed by a heartbeat.

A run takes the lease before it deletes or writes anything. A second run on the same
output finds it and stops at once, naming the run that holds it; a lease whose heartbeat
is older than `output.lease_timeout_s` (its run was killed, its node lost) is taken over.
Creation is atomic where the store allows it (O_EXCL on disk, If-None-Match on S3, see
depthray/io/fs.py `create_exclusive`); docs/reliability.md says what holds elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from depthray.config import ConfigError
from depthray.io.fs import create_exclusive, filesystem, join, write_atomic

log = logging.getLogger(__name__)

LEASE_FILE = "_jobs/lease.json"


class OutputBusy(ConfigError):
    """Another run holds this output's lease."""


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


class OutputLease:
    def __init__(self, output_url: str, storage, run_id: str, timeout_s: float = 300.0,
                 heartbeat_s: float | None = None):
        self.fs, root = filesystem(output_url, storage)
        self.url = output_url
        self.path = join(root, LEASE_FILE)
        self.run_id = run_id
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = heartbeat_s or max(1.0, self.timeout_s / 5)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time(), "timeout_s": self.timeout_s}).encode()

    def holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # half-written by a dying writer on a store without atomic PUT
            return {"run_id": "?", "heartbeat": 0.0}

    def acquire(self) -> "OutputLease":
        """Take the lease (taking over a stale one) or raise OutputBusy; starts the heartbeat."""
        for _ in range(3):
            if create_exclusive(self.fs, self.path, self._body()):
                break
            other = self.holder()
            if other is None:
                continue  # released between our attempt and the read: try again
            age = time.time() - float(other.get("heartbeat") or 0)
            if age < self.timeout_s and not _dead_here(other):
                raise OutputBusy(
                    f"output.url {self.url!r} is being written by run {other.get('run_id')} on "
                    f"{other.get('host', '?')} (pid {other.get('pid', '?')}, heartbeat {age:.0f} s ago); "
                    f"one run per output. Wait for it, or stop it; a lease without heartbeat for "
                    f"output.lease_timeout_s={self.timeout_s:g} s is taken over.")
            log.warning("taking over the lease of run %s (%s)", other.get("run_id"),
                        "its process on this host is gone" if _dead_here(other) else f"no heartbeat for {age:.0f} s")
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
        else:
            raise OutputBusy(f"output.url {self.url!r}: could not take the output lease (contended)")
        self._thread = threading.Thread(target=self._beat, name="depthray-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.holder() or {}).get("run_id") != self.run_id:
                    log.error("the output lease was taken over by another run; this run's commits "
                              "may now race it")
                    return
                write_atomic(self.fs, self.path, self._body())
            except Exception as e:  # a missed beat is not fatal; timeout_s covers several
                log.warning("lease heartbeat failed: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self.holder() or {}).get("run_id") == self.run_id:
                self.fs.rm_file(self.path)
        except Exception as e:
            log.warning("could not release the output lease %s: %s", self.path, e)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
