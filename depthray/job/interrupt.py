"""Ctrl-C (and SIGTERM) that never lands inside a shard's commit.

While a job streams, SIGINT raises KeyboardInterrupt at once (the driver may be waiting on
Ray for minutes), except inside `critical()` (a commit: parts promoted, manifest written,
counters updated), where it is held and raised as the block ends. So the summary's count
of committed shards is exactly the manifests written. SIGTERM, how Kubernetes, spot
schedulers and `timeout` stop a process, takes the same path (Ray's own handler, which
exits at once with no summary, is replaced while the job streams); `signal_name` says which.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class DeferredInterrupt:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.busy = False
        self.pending = False
        self.signal_name: str | None = None  # "SIGINT" | "SIGTERM" once one arrived

    def _handler(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self.busy:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator["DeferredInterrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; nothing to defer here
            return
        previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def critical(self) -> Iterator[None]:
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
