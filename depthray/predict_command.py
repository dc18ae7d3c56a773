"""`depthray predict`: files and folders on this machine in, depth PNGs and previews out.

The work is depthray/job/local.py `predict_files` (the job's own stages); this module is
what the user sees around it: folders expanded, a warning before a costly image, views
done within an image, and seconds per image at the end (what `depthray plan --measure`
estimates).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _warn_costly(files: list[str], model, cfg, shown: int = 3) -> None:
    """A warning before images that need hundreds of model evaluations: the first `shown`
    by name, the rest counted (a folder of large photos should not scroll the screen)."""
    from depthray.plan import image_sizes
    from depthray.predict_progress import COSTLY_EVALUATIONS, cost_warning
    from depthray.tiling import plan_tiles

    res = int(model.processing_resolution)
    costly = 0
    for path in files:
        try:
            (h, w), = image_sizes([path])
        except Exception:  # noqa: BLE001 - an unreadable file gets its error row later
            continue
        warning = cost_warning(path, plan_tiles(h, w, res, cfg.inference.tiling).num_views,
                               cfg.inference.ensemble_size)
        if warning:
            costly += 1
            if costly <= shown:
                print(warning, file=sys.stderr)
    if costly > shown:
        print(f"warning: {costly - shown} more image(s) need {COSTLY_EVALUATIONS} or more model evaluations "
              "each", file=sys.stderr)


def run_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from depthray.config import load_config
    from depthray.io.codecs import SPACE_KEY
    from depthray.io.fs import storage_options
    from depthray.job.local import predict_files
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
