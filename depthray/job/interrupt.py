"""Ctrl-C that never lands inside a shard's commit.

While a job streams, SIGINT raises KeyboardInterrupt at once (the driver may be waiting on
Ray for minutes), except inside `critical()` (a commit: parts promoted, manifest written,
counters updated), where it is held and raised as the block ends. So the summary's count
of committed shards is exactly the manifests written.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class DeferredInterrupt:
    def __init__(self) -> None:
        self.busy = False
        self.pending = False

    def _handler(self, signum, frame) -> None:
        if self.busy:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator["DeferredInterrupt"]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only; nothing to defer here
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

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
