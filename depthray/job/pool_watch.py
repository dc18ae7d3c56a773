"""The inference pool over time, for the job summary: how many actors were alive when,
and how long after a node joined its first actor came up (the ramp-up an autoscaling
cluster pays per node: machine start, Ray start, model load).

A daemon thread samples Ray's actor and node tables (GCS, no dashboard needed) every
`every_s` seconds while the job runs. Best effort: a failed sample is skipped, never fails
the job.
"""

from __future__ import annotations

import threading
import time
from typing import Any

ACTOR_CLASS = "DepthPredictor"


class PoolWatch:
    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self.start = time.time()
        self.sizes: list[tuple[float, int]] = []  # (seconds since start, alive actors), on change
        self.node_seen: dict[str, float] = {}  # node id -> first seen alive (s since start)
        self.actor_up: dict[str, float] = {}  # node id -> first actor seen alive there
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="depthray-pool-watch", daemon=True)

    def __enter__(self) -> "PoolWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # best effort: the job never fails for its statistics
                pass
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        import ray

        now = round(time.time() - self.start, 1)
        for n in ray.nodes():
            if n.get("Alive") and n["NodeID"] not in self.node_seen:
                self.node_seen[n["NodeID"]] = now
        alive = [a for a in ray._private.state.actors().values()
                 if ACTOR_CLASS in (a.get("ActorClassName") or "") and a.get("State") == "ALIVE"]
        for a in alive:
            self.actor_up.setdefault(a["Address"]["NodeID"], now)
        if not self.sizes or self.sizes[-1][1] != len(alive):
            self.sizes.append((now, len(alive)))

    def summary(self) -> dict[str, Any]:
        """`pool_sizes`: [[seconds, actors], ...] at each change; `node_rampup_s`: per node
        that got an actor, seconds from the node first seen to its actor alive (nodes up
        before the job count from the job's start)."""
        ramp = {node[-8:]: round(t - self.node_seen.get(node, 0.0), 1) for node, t in self.actor_up.items()}
        return {"pool_sizes": [list(s) for s in self.sizes],
                "pool_max": max((n for _, n in self.sizes), default=0),
                "node_rampup_s": ramp}
