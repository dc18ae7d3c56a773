"""`depthray predict`: files and folders on this machine in, depth PNGs and previews out.

The job's own decode -> infer -> encode stages run in this process (depthray/job/local.py,
the in-process executor), so each `{key}.depth.png` is the bytes a job writes for the same
image and config; the folder is a sink of the job's family (depthray/io/sinks.py
`FolderSink`). What is predict's own lives here: a key per file, the per-file loop, the
preview (from the pixels the decode stage decoded and the depth the infer stage made:
nothing is read or decoded twice), and what the user sees around it: folders expanded, a
warning before a costly image, views done within an image, and seconds per image at the
end (what `depthray plan --measure` estimates).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from depthray.io import row_meta


def _warn_costly(files: list[str], model, cfg, shown: int = 3) -> None:
    """A warning before images that need hundreds of model evaluations: the first `shown`
    by name, the rest counted (a folder of large photos should not scroll the screen)."""
    from depthray.io.decode import own_pixel_limit
    from depthray.plan import image_sizes
    from depthray.predict_progress import COSTLY_EVALUATIONS, cost_warning
    from depthray.tiling import plan_tiles
    from depthray.tiling_budget import max_views

    res = int(model.processing_resolution)
    costly = 0
    for path in files:
        try:
            with own_pixel_limit():  # the decoder judges it by input.max_pixels, not PIL's limit
                (h, w), = image_sizes([path])
        except Exception:  # noqa: BLE001 - an unreadable file gets its error row later
            continue
        plan = plan_tiles(h, w, res, cfg.inference.tiling)
        warning = cost_warning(path, max_views(plan, plan.budget),
                               cfg.inference.ensemble_size)
        if warning:
            costly += 1
            if costly <= shown:
                print(warning, file=sys.stderr)
    if costly > shown:
        print(f"warning: {costly - shown} more image(s) need {COSTLY_EVALUATIONS} or more model evaluations "
              "each", file=sys.stderr)


def file_keys(paths: list[str]) -> list[str]:
    """A key per file: its stem, as an image folder reads; files that share a stem (`a/x.jpg`,
    `b/x.png`) get a hash of their path appended, so no output overwrites another."""
    import hashlib
    from collections import Counter

    stems = [Path(p).stem for p in paths]
    repeated = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{s}-{hashlib.sha1(str(Path(p).resolve()).encode()).hexdigest()[:8]}" if s in repeated else s
            for s, p in zip(stems, paths)]


def file_rows(paths: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, SAMPLE row) for local image files, keyed by `file_keys`."""
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


class _Kept:
    """The decode stage's pixels and the infer stage's float depth of the images in flight,
    by key, taken as the stages return them (LocalRunner's `tap`): the next stage drops
    them, and the preview needs both. Views of the Arrow buffers, not copies."""

    def __init__(self):
        self.pixels: dict[str, tuple[Any, int, int]] = {}
        self.depth: dict[str, tuple[Any, int, int]] = {}

    def __call__(self, stage: str, table: pa.Table) -> None:
        if stage == "decode":
            self._keep(self.pixels, table, "pixels")
        elif stage == "infer":
            self._keep(self.depth, table, "depth_f32")

    @staticmethod
    def _keep(into: dict, table: pa.Table, column: str) -> None:
        from depthray.io.codecs import column_buffers

        sizes = zip(table.column("key").to_pylist(), table.column("height").to_pylist(),
                    table.column("width").to_pylist(), column_buffers(table, column))
        into.update((key, (buf, h, w)) for key, h, w, buf in sizes if buf is not None)

    def preview_png(self, row: dict[str, Any], max_side: int | None) -> bytes:
        """The row's preview as PNG bytes; its kept pixels and depth are let go."""
        from PIL import Image

        from depthray.io.codecs import depth_as_stored

        buf, h, w = self.pixels.pop(row["key"])
        image = np.frombuffer(buf, np.uint8).reshape(h, w, 3)
        buf, h, w = self.depth.pop(row["key"])
        # the depth the .depth.png holds (16-bit levels), not the finer float: the preview
        # shows what a reader of that file sees
        depth = depth_as_stored(np.frombuffer(buf, np.float32).reshape(h, w))
        space = row_meta.get(row).get("output_space", "depth")
        out = io.BytesIO()
        Image.fromarray(preview_image(image, depth, max_side, space)).save(out, format="PNG")
        return out.getvalue()


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
    from depthray.io import records
    from depthray.io.sinks import FolderSink, writable
    from depthray.job.local import LocalRunner
    from depthray.job.predictor import DepthPredictor
    from depthray.job.stages import job_stages, stage

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    sink = FolderSink(str(out_dir), cfg.storage)
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
        kept = _Kept()
        table = records.to_table([row for _, row in part], records.SAMPLE)
        for encoded in runner.run([table], tap=kept):
            for row in encoded.to_pylist():
                if not records.is_error(row):
                    row["preview"] = kept.preview_png(row, preview_max_side)
                    samples, unwritable = writable(sink, [row])
                    row = unwritable[0] if unwritable else row
                    sink.write_files(samples)
                if records.is_error(row):
                    failed += 1
                if on_done:  # the row as the outputs hold it: meta as JSON text
                    on_done(by_key[row["key"]], {**row, "meta": row_meta.to_json(row)})
    return failed


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from depthray.config import load_config
    from depthray.io.codecs import SPACE_KEY
    from depthray.io.fs import storage_options
    from depthray.models.loading import load_model
    from depthray.models.tiny import ensure_tiny_model
    from depthray.predict_progress import ViewProgress, expand_inputs, skipped_line

    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = load_config(args.config, overrides, require_io=False)
    if args.tiny:
        cfg.model.path = str(ensure_tiny_model())
        print("using the built-in tiny random-weight model: its depth is meaningless (plumbing only)")
    out = Path(args.out).resolve()
    for folder in (Path(p).resolve() for p in args.images if Path(p).is_dir()):
        if out == folder or folder in out.parents:  # its PNGs would be labelled next time
            print(f"depthray predict: --out {args.out} is inside the input folder {folder}; the next "
                  "predict over that folder would label its depth maps as photos. Choose an output "
                  "folder outside the inputs.", file=sys.stderr)
            return 2
    files, skipped = expand_inputs(args.images)
    if line := skipped_line(skipped):
        print(line, file=sys.stderr)
    if not files:
        print("depthray predict: no image files in " + " ".join(args.images), file=sys.stderr)
        return 2
    model = load_model(cfg.model, storage_options(cfg.model.path, cfg.storage))
    _warn_costly(files, model, cfg)
    t0 = time.perf_counter()
    with tqdm(total=len(files), unit="img", desc="depth") as bar:
        def done(path: str, row: dict) -> None:
            if row.get("error"):
                tqdm.write(f"skipped {path}: {row['error']}: {row['message']}")
            bar.update(1)

        views = ViewProgress(len(files), lambda line: tqdm.write(line, file=sys.stderr), every_s=args.progress_every)
        failed = predict_files(files, cfg, args.out, on_done=done, progress=views,
                               preview_max_side=args.preview_size, model=model)
    seconds = time.perf_counter() - t0
    preview = f"long side at most {args.preview_size} px" if args.preview_size else "full size"
    space = getattr(model, "output_space", "depth")
    held = "depth*65535, 0 = near" if space == "depth" else "disparity*65535, 1 = near (not depth)"
    print(f"wrote {len(files) - failed} depth maps to {args.out}/ "
          f"({{stem}}.depth.png: 16-bit, {held}, recorded in its text chunk {SPACE_KEY}; "
          "{stem}.preview.png: input | depth, "
          f"{preview}) in {seconds:.1f} s "
          f"({seconds / len(files):.2f} s per image, model loading excluded)")
    return 1 if failed else 0
