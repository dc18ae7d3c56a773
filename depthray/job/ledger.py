"""The driver's shard ledger: which shards are complete, progress lines, the job totals.

The write stage returns one small ACK row per (batch, shard). The ledger adds them up;
when a shard's rows-written equals the count its reader announced in the trailer, the
shard is complete and its manifest is written (the commit point). Nothing here touches
images, so the driver's memory stays small whatever the dataset size.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from depthray.durations import format_duration

log = logging.getLogger(__name__)


@dataclass
class ShardState:
    url: str
    identity: dict[str, Any] = field(default_factory=dict)  # source size/etag, recorded in the manifest
    rows: int = 0  # rows written so far, trailer included
    total: int | None = None  # rows the reader emitted, trailer excluded
    failed: str | None = None
    outputs: int = 0
    errors: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # staged part -> bytes
    error_parts: dict[str, int] = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    infer_s: float = 0.0
    started: float = field(default_factory=time.time)
    done: bool = False

    @property
    def complete(self) -> bool:
        return self.total is not None and self.failed is None and self.rows == self.total + 1


class ShardLedger:
    def __init__(self, shards: dict[str, str | dict[str, Any]], commit: Callable[[str, dict], None],
                 static: dict[str, Any], log_every_s: float = 10.0):
        """`shards`: name -> input URL, or -> {"url", "source_size", "source_etag"}."""
        self.states = {name: ShardState(url=v, identity={}) if isinstance(v, str)
                       else ShardState(url=v["url"], identity={k: x for k, x in v.items() if k != "url"})
                       for name, v in shards.items()}
        self.commit = commit  # promotes a shard's parts and writes its manifest
        self.static = static  # fields every manifest carries (config hash, model, ...)
        self.log_every_s = log_every_s
        self.start = time.time()
        self.last_log = self.start
        self.completed = 0
        self.images = 0  # outputs written
        self.errors = 0
        self.reasons: Counter = Counter()
        self.unlabelled: Counter = Counter()  # image members not labelled, by extension
        self._last_counts: tuple | None = None  # (shards, images, errors) of the last progress line

    def update(self, ack: dict[str, Any]) -> None:
        st = self.states.get(ack["source"])
        if st is None or st.done:
            log.error("unexpected write acknowledgement for shard %r (ignored)", ack["source"])
            return
        st.rows += ack["rows"]
        st.outputs += ack["outputs"]
        st.errors += ack["errors"]
        st.parts.update(zip(ack["parts"] or [], ack.get("part_bytes") or [-1] * len(ack["parts"] or [])))
        st.error_parts.update(zip(ack["error_parts"] or [],
                                  ack.get("error_part_bytes") or [-1] * len(ack["error_parts"] or [])))
        st.reasons.update(json.loads(ack["error_reasons"] or "{}"))
        st.infer_s += ack["infer_s"] or 0.0
        if ack["shard_total"] is not None:
            st.total = ack["shard_total"]
            st.failed = ack["shard_error"]
        self.images += ack["outputs"]
        self.errors += ack["errors"]
        self.reasons.update(json.loads(ack["error_reasons"] or "{}"))
        self.unlabelled.update(json.loads(ack.get("unlabelled_members") or "{}"))
        if st.total is not None and st.rows > st.total + 1:
            raise RuntimeError(f"shard {ack['source']}: more rows written ({st.rows}) than read "
                               f"({st.total + 1}); refusing to commit a duplicate")
        if st.complete:
            self._commit(ack["source"], st)
        self.maybe_log()

    def _commit(self, name: str, st: ShardState) -> None:
        manifest = {
            "shard": name,
            "url": st.url,
            **st.identity,
            "status": "complete",
            "inputs": st.total,
            "outputs": st.outputs,
            "errors": st.errors,
            "parts": dict(sorted(st.parts.items())),
            "error_parts": dict(sorted(st.error_parts.items())),
            "error_reasons": dict(st.reasons),
            "infer_seconds": round(st.infer_s, 3),
            "wall_seconds": round(time.time() - st.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.static,
        }
        self.commit(name, manifest)
        st.done = True
        self.completed += 1

    def rate(self) -> float:
        return self.images / max(time.time() - self.start, 1e-9)

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the rate so far, assuming unfinished shards hold as many images
        as the finished ones did on average; None until one shard has finished."""
        done = [s for s in self.states.values() if s.done]
        if not done or self.completed == len(self.states):
            return None if not done else 0.0
        elapsed = max((now or time.time()) - self.start, 1e-9)
        per_shard = sum(s.outputs + s.errors for s in done) / len(done)
        left = sum(max(per_shard - (s.outputs + s.errors), 0.0) for s in self.states.values() if not s.done)
        rows_per_s = (self.images + self.errors) / elapsed
        return left / rows_per_s if rows_per_s > 0 else None

    def progress_line(self, now: float | None = None) -> str:
        """'progress: 3/10 shards, ...'; time left only once a shard finished (a rate to go by)."""
        eta = self.eta_seconds(now)
        elapsed = max((now or time.time()) - self.start, 1e-9)
        return (f"progress: {self.completed}/{len(self.states)} shards, {self.images} images "
                f"({self.images / elapsed:.2f} images/s), {self.errors} errors"
                + (f", about {format_duration(eta)} left" if eta else ""))

    def maybe_log(self, force: bool = False) -> None:
        """The progress line every log_every_s; `force` (the job's end) skips a line that
        would only repeat the last one."""
        now = time.time()
        if force or now - self.last_log >= self.log_every_s:
            self.last_log = now
            counts = (self.completed, self.images, self.errors)
            if force and counts == self._last_counts:
                return
            self._last_counts = counts
            log.info("%s", self.progress_line(now))

    def summary(self, job_error: str | None = None) -> dict[str, Any]:
        """Totals; `job_error` (the job stopped early) is given as the reason of every
        shard that was still incomplete."""
        unfinished = {n: (s.failed or (f"incomplete: {job_error}" if job_error else "incomplete"))
                      for n, s in self.states.items() if not s.done}
        infer_s = sum(s.infer_s for s in self.states.values())
        return {
            "shards": len(self.states),
            "shards_complete": self.completed,
            "shards_unfinished": unfinished,
            "images": self.images,
            "errors": self.errors,
            "error_reasons": dict(self.reasons),
            "image_members_unlabelled": dict(self.unlabelled),
            "wall_seconds": round(time.time() - self.start, 3),
            "images_per_second": round(self.rate(), 3),
            "infer_seconds": round(infer_s, 3),
        }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The job summary as `depthray run` prints it (the full one is `_jobs/{run_id}.json`)."""
    lines = [
        f"output: {summary['output']}  (summary: {summary['summary_path']})",
        f"shards: {summary['shards_complete']} done now, {summary['shards_skipped']} already complete, "
        f"{len(summary['shards_unfinished'])} unfinished",
        f"images: {summary['images']} written, {summary['errors']} errors "
        f"{summary['error_reasons'] or ''}; {summary['images_per_second']:.2f} images/s "
        f"over {summary['wall_seconds']:.1f}s",
    ]
    if summary.get("image_members_unlabelled"):
        found = summary["image_members_unlabelled"]
        lines.append(f"  {sum(found.values())} image member(s) of WebDataset samples not labelled "
                     f"({', '.join(f'{n} .{e}' for e, n in sorted(found.items()))}): input.image_member chose another")
    lines += [f"  {line}" for line in summary.get("stages", [])]
    lines += [f"  unfinished {name}: {why} (re-run to retry)" for name, why in summary["shards_unfinished"].items()]
    return lines
