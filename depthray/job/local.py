"""The stage chain (depthray/job/stages.py) in one process, without Ray.

For benchmarks (the job's own stages in a plain loop) and `depthray predict` (files on this
machine, written with exactly the bytes a job writes). Batches are cut as Ray cuts them:
each stage gets at most its `batch_size` rows per call; stateful stages are built once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from depthray.io import row_meta
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

    def run(self, tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """Stream `tables` through every stage; yields what the last stage returns."""
        stream: Iterable[pa.Table] = tables
        for st, call in zip(self.stages, self.calls):
            stream = self._apply(st, call, stream)
        yield from stream

    @staticmethod
    def _apply(st: Stage, call, tables: Iterable[pa.Table]) -> Iterator[pa.Table]:
        for batch in _rebatch(tables, st.batch_size):
            yield from _tables(call(batch))


def shard_tables(shards: list[Shard]) -> Iterator[pa.Table]:
    """The read stage's input, one shard per table, as the Ray graph hands it out."""
    for item in shard_items(shards):
        yield pa.Table.from_pylist([item])


def file_keys(paths: list[str]) -> list[str]:
    """A key per file: its stem, as an image folder reads; files that share a stem (`a/x.jpg`,
    `b/x.png`) get a hash of their path appended, so no output overwrites another."""
    import hashlib
    from collections import Counter
    from pathlib import Path

    stems = [Path(p).stem for p in paths]
    repeated = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{s}-{hashlib.sha1(str(Path(p).resolve()).encode()).hexdigest()[:8]}" if s in repeated else s
            for s, p in zip(stems, paths)]


def file_rows(paths: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, SAMPLE row) for local image files, keyed by `file_keys`."""
    from pathlib import Path

    for p, key in zip(paths, file_keys(paths)):
        path = Path(p)
        row: dict[str, Any] = {"source": str(path.parent), "key": key, "ext": path.suffix.lstrip(".").lower()}
        try:
            row["data"] = path.read_bytes()
        except OSError as e:  # unreadable: an error row, like a reader's
            row.update(stage="read", error="unreadable", message=f"{type(e).__name__}: {e}")
        yield p, row


def preview_image(image, depth, max_side: int | None, space: str = "depth"):
    """input | colourised depth side by side, shrunk so its long side is at most `max_side`
    (None or 0: full size). A preview is for looking: at full size a 24 MP photo made a
    17.6 MB PNG; the depth PNG keeps every pixel. `space`: what the label holds
    (meta.output_space), so disparity is coloured near-red like depth."""
    import numpy as np

    from depthray.resize import resize_map
    from depthray.visualize import colorize_label, side_by_side

    h, w = depth.shape
    gap = 4  # side_by_side's white gap between the panels
    if max_side and max(h, 2 * w + gap) > max_side:
        scale = min(max_side / h, (max_side - gap) / (2 * w))  # both panels shrink alike
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        image = np.round(resize_map(image, size)).clip(0, 255).astype(np.uint8)
        depth = resize_map(depth, size)
    return side_by_side(image, colorize_label(depth, space), gap=gap)


def predict_files(paths: list[str], cfg, out_dir, on_done: Callable[[str, dict], None] | None = None, *,
                  progress: Callable[[int, int, int, int], None] | None = None,
                  preview_max_side: int | None = 1024, model: Any = None) -> int:
    """Depth for local image files through the job's decode -> infer -> encode stages.

    Writes `{key}.depth.png` (the encode stage's bytes: what a job writes for the same image
    and config) and `{key}.preview.png` (input | colourised depth, long side at most
    `preview_max_side`) per image, key = the file stem (made unique, see `file_keys`); calls
    `on_done(path, row)` for every file, an error row included, and `progress(first, count,
    views_done, views_total)` as the views of images first..first+count-1 finish.
    `model`: one already loaded (else cfg.model is loaded). Returns the error count.
    """
    from pathlib import Path

    from depthray.io import records
    from depthray.io.codecs import decode_depth_png16
    from depthray.io.decode import decode_image
    from depthray.job.predictor import DepthPredictor
    from depthray.job.stages import job_stages, stage
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = job_stages(cfg)
    # The hang watchdog ends its process so Ray restarts it; here there is no Ray, and a large
    # image's batch may rightly run past the GPU default (30 min): only a value set in the
    # config arms it.
    infer = {**stage(stages, "infer").kwargs, "timeout_s": cfg.compute.batch_timeout_s or 0.0}
    runner = LocalRunner([stage(stages, n) for n in ("decode", "infer", "encode")],
                         {"infer": DepthPredictor(**infer, loaded=model)})
    predictor = runner.instance("infer")
    failed = 0
    chunk = max(1, cfg.compute.images_per_batch)
    items = list(file_rows(paths))
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        by_key = {row["key"]: p for p, row in part}
        if progress is not None:
            predictor.progress = lambda done, total, first=start, n=len(part): progress(first, n, done, total)
        table = records.to_table([row for _, row in part], records.SAMPLE)
        for encoded in runner.run([table]):
            for row in encoded.to_pylist():
                if records.is_error(row):
                    failed += 1
                else:
                    (out / f"{row['key']}.depth.png").write_bytes(row["depth"])
                    image, _ = decode_image(Path(by_key[row["key"]]).read_bytes(), cfg.input.max_pixels,
                                            cfg.input.min_side)
                    depth = decode_depth_png16(row["depth"])
                    space = row_meta.get(row).get("output_space", "depth")
                    Image.fromarray(preview_image(image, depth, preview_max_side, space)).save(
                        out / f"{row['key']}.preview.png")
                if on_done:  # the row as the outputs hold it: meta as JSON text
                    on_done(by_key[row["key"]], {**row, "meta": row_meta.to_json(row)})
    return failed
