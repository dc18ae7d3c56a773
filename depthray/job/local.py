"""The stage chain (depthray/job/stages.py) in one process, without Ray.

For `compute.executor: local`, benchmarks (the job's own stages in a plain loop) and
`depthray predict` (depthray/predict_command.py: files on this machine, written with
exactly the bytes a job writes). Batches are cut as Ray cuts them: each stage gets at most
its `batch_size` rows per call; stateful stages are built once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from depthray.io.sources import Shard
from depthray.job.stages import Stage, shard_items


def _tables(out: Any) -> Iterator[pa.Table]:
    """A stage returns one table or yields several (a reader streams a shard)."""
    if isinstance(out, pa.Table):
        yield out
    else:
        yield from out


def _rebatch(tables: Iterable[pa.Table], size: int | None) -> Iterator[pa.Table]:
    if size is None:
        yield from (t for t in tables if t.num_rows)
        return
    pending: list[pa.Table] = []
    held = 0
    for t in tables:
        pending.append(t)
        held += t.num_rows
        while held >= size:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, size)
            rest = whole.slice(size)
            pending, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_tables(pending)


class LocalRunner:
    """Runs a list of stages over tables in this process; stateful stages are built once
    (here: the model loads when the runner is made), or passed in `built` by stage name
    to share one model between runners."""

    def __init__(self, stages: list[Stage], built: dict[str, Any] | None = None):
        self.stages = stages
        built = built or {}
        self.calls: list[Callable[[pa.Table], Any]] = [built.get(s.name) or s.make() for s in stages]

    def instance(self, name: str) -> Any:
        """The built object of a stateful stage (e.g. the predictor, for its model)."""
        return next(c for s, c in zip(self.stages, self.calls) if s.name == name)

    def run(self, tables: Iterable[pa.Table],
            tap: Callable[[str, pa.Table], None] | None = None) -> Iterator[pa.Table]:
        """Stream `tables` through every stage; yields what the last stage returns.
        `tap(stage name, table)` sees each table a stage returns before the next stage takes
        it, so a caller can keep what a later stage drops (the decoded pixels, the float
        depth) instead of computing it again."""
        stream: Iterable[pa.Table] = tables
        for st, call in zip(self.stages, self.calls):
            stream = self._apply(st, call, stream, tap)
        yield from stream

    @staticmethod
    def _apply(st: Stage, call, tables: Iterable[pa.Table], tap) -> Iterator[pa.Table]:
        for batch in _rebatch(tables, st.batch_size):
            for out in _tables(call(batch)):
                if tap is not None:
                    tap(st.name, out)
                yield out


def shard_tables(shards: list[Shard]) -> Iterator[pa.Table]:
    """The read stage's input, one shard per table, as the Ray graph hands it out."""
    for item in shard_items(shards):
        yield pa.Table.from_pylist([item])

