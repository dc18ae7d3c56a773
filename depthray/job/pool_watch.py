"""The actor pool over time, for the job summary: how many actors were alive when, and how
long after a node joined its first actor came up (the ramp-up an autoscaling cluster pays
per node: machine start, Ray start, model load).

The pool reports itself; nothing looks it up by class or stage name. Each pool actor, once
built (model loaded), beats every `BEAT_EVERY_S` to a registry: a small actor per run,
named after the run (`registry_name`), that the driver starts on its own node. `PoolWatch`
samples the registry and Ray's node table (`ray.nodes()`); an actor is alive while its last
beat is under `ALIVE_WITHIN_S` old, so one whose node was lost drops out within seconds.
Only public Ray API: `ray.util.state` would need the dashboard, which tests and
`compute.dashboard: false` runs do not start.

Best effort on both sides: a failed sample is skipped and a failed beat retried, and
neither ever fails the job or a batch.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

BEAT_EVERY_S = 1.0
ALIVE_WITHIN_S = 5.0  # a few beats: a loaded machine delays one by a second or two
GIVE_UP_AFTER_S = 60.0  # no beat landed for this long: the registry (the run) is gone


def registry_name(run_id: str) -> str:
    return f"depthray-pool-{run_id}"


class PoolRegistry:
    """Ray actor: the pool's members by their last beat, on the registry's clock (the
    members' nodes' clocks may disagree)."""

    def __init__(self) -> None:
        self._beats: dict[str, tuple[str, float]] = {}  # actor id -> (node id, last beat)

    def beat(self, actor_id: str, node_id: str) -> None:
        self._beats[actor_id] = (node_id, time.monotonic())

    def alive(self, within_s: float) -> dict[str, str]:
        """Actor id -> node id of every member that beat within `within_s` seconds."""
        now = time.monotonic()
        return {a: node for a, (node, t) in self._beats.items() if now - t <= within_s}


class Heartbeat:
    """Calls `beat()` every `every_s` on a daemon thread (a process never waits for it),
    until `stop()`, or until no beat has landed for `give_up_after_s` or `beat` says the
    registry died (`gone(error)`): after a run ends its registry is killed, and a lingering
    actor stops calling it instead of logging an error a second."""

    def __init__(self, beat: Callable[[], None], every_s: float = BEAT_EVERY_S,
                 give_up_after_s: float = GIVE_UP_AFTER_S, gone: Callable[[BaseException], bool] = lambda e: False):
        self.beat, self.every_s, self.give_up_after_s, self.gone = beat, every_s, give_up_after_s, gone
        self.beats = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="depthray-pool-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.is_set():
            try:
                self.beat()
                self.beats += 1
                last_ok = time.monotonic()
            except Exception as e:  # the registry not up yet, gone, or slow: never the batch's problem
                if self.gone(e) or time.monotonic() - last_ok > self.give_up_after_s:
                    return
            self._stop.wait(self.every_s)


def report_pool_member(run_id: str) -> Heartbeat | None:
    """Called by a pool stage's class once built: inside a Ray actor of run `run_id`, start
    beating to the run's registry; anywhere else (the local executor, `depthray predict`,
    a benchmark's plain loop) do nothing, without importing Ray."""
    ray = sys.modules.get("ray")
    if not run_id or ray is None or not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    actor_id = ctx.get_actor_id()
    if actor_id is None:  # a driver or a task, not an actor of the pool
        return None
    node_id = ctx.get_node_id()
    name = registry_name(run_id)
    handle: list[Any] = []

    def beat() -> None:
        try:
            if not handle:
                handle.append(ray.get_actor(name))
            ray.get(handle[0].beat.remote(actor_id, node_id), timeout=10 * BEAT_EVERY_S)
        except Exception:
            handle.clear()  # look the name up again next time
            raise

    def gone(e: BaseException) -> bool:
        return isinstance(e, ray.exceptions.ActorDiedError)

    return Heartbeat(beat, gone=gone).start()


class PoolWatch:
    """While the job runs (`with PoolWatch(run_id):`): the run's registry, sampled with the
    node table every `every_s` seconds on a daemon thread; the registry is killed at the end
    (its members then stop beating)."""

    def __init__(self, run_id: str, every_s: float = 2.0):
        self.run_id = run_id
        self.every_s = every_s
        self.start = time.time()
        self.sizes: list[tuple[float, int]] = []  # (seconds since start, alive actors), on change
        self.node_seen: dict[str, float] = {}  # node id -> first seen alive (s since start)
        self.actor_up: dict[str, float] = {}  # node id -> first actor seen alive there
        self.registry = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="depthray-pool-watch", daemon=True)

    def __enter__(self) -> "PoolWatch":
        try:
            self.registry = start_registry(registry_name(self.run_id))
        except Exception:  # best effort: no registry, no pool statistics, the same job
            self.registry = None
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.registry is None:
            return
        try:
            # One last look: the registry remembers the last ALIVE_WITHIN_S, so a short job's
            # actors, up only since the last sample, still count.
            self.sample()
        except Exception:
            pass
        try:
            import ray

            ray.kill(self.registry)
        except Exception:
            pass

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
        if self.registry is None:
            return
        # a registry still starting answers later: skip this sample rather than hold the
        # job's end (which waits for this thread)
        alive = ray.get(self.registry.alive.remote(ALIVE_WITHIN_S), timeout=max(1.0, self.every_s))
        for node in alive.values():
            self.actor_up.setdefault(node, now)
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


def start_registry(name: str):
    """The run's registry actor, named `name` in this job's namespace (the pool's actors are
    this job's, so they find it by name). On this driver's node: the driver's lifetime is the
    run's, and a lost worker node must not take the registry with it. No CPU: it must start
    even when the pool holds every CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(PoolRegistry).options(name=name, num_cpus=0, scheduling_strategy=here).remote()
