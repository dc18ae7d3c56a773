"""The `depthray` command: a thin layer over the library.

Each verb is one `_cmd_<verb>` function registered in `build_parser`; heavy imports
(torch, ray) happen inside the verbs so `depthray --help` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from depthray import __version__

log = logging.getLogger("depthray")


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from depthray.models.tiny import build_tiny_marigold

    path = build_tiny_marigold(args.out_dir, preset=args.preset, scheduler=args.scheduler, seed=args.seed)
    print(f"wrote a random-weight Marigold checkpoint ({args.preset}, {args.scheduler}) to {path}")
    print("its depth is meaningless; use it to test plumbing, not to label data")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from depthray.predict_command import run_predict

    return run_predict(args)


def _print_summary(summary: dict) -> None:
    from depthray.job.ledger import summary_lines

    print("\n".join(summary_lines(summary)))


def _cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from depthray.init_config import example_config

    text = example_config(args.input, args.output)
    if args.path == "-":
        print(text)
        return 0
    path = Path(args.path)
    if path.exists():
        print(f"depthray: {path} exists; not overwritten", file=sys.stderr)
        return 2
    path.write_text(text)
    print(f"wrote {path}: edit input.url, output.url and model, then: depthray run {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from depthray.run_command import run

    return run(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from depthray.config import load_config
    from depthray.status import format_status, job_status

    st = job_status(load_config(args.config, args.set))
    print(json.dumps(st) if args.json else format_status(st))
    return 1 if st["shards_todo"] else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from depthray.demo import run_demo

    summary = run_demo(args.workdir, num_cpus=args.num_cpus)
    _print_summary(summary)
    if summary.get("preview"):
        print(f"preview (input | depth | uncertainty): {summary['preview']}")
        print(f"sortable HTML page: {summary['preview_html']}")
    if summary.get("eval"):
        e = summary["eval"]
        print(f"eval vs the scenes' ground truth: abs_rel {e['abs_rel']:.3f}, delta1 {e['delta1']:.3f} "
              f"over {e['n_images']} images (random weights: expect poor numbers)")
    print("read it back: pyarrow.parquet.read_table(%r)  # depth: 16-bit PNG, depth*65535, 0 = near"
          % summary["output"])
    print("note: the demo model has random weights; its depth shows the plumbing, not quality")
    return 1 if summary["shards_unfinished"] else 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from depthray.submit import submit

    _, status = submit(args.config, args.set, address=args.address, wait=not args.no_wait,
                       ship_code=not args.no_ship_code, timeout_s=args.timeout)
    return 0 if status in ("SUCCEEDED", "SUBMITTED") else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from depthray.config import load_config
    from depthray.evaluate import evaluate, format_rows, format_summary, summary_json

    storage = load_config(args.config, args.set, require_io=False).storage
    report = evaluate(
        args.pred, args.gt, space=args.space, mask_url=args.mask, gt_png_scale=args.gt_png_scale,
        gt_is_disparity=args.gt_disparity, min_depth=args.min_depth, max_depth=args.max_depth,
        storage=storage,
    )
    if not args.no_rows:
        print(format_rows(report))
        print()
    print(format_summary(report))
    if report.missing:
        print(f"{len(report.missing)} GT images have no prediction, e.g. {report.missing[:5]}")
    if args.json:
        print(summary_json(report))  # last line: one JSON object
    return 0 if report.summary["n_images"] else 1


def _cmd_preview(args: argparse.Namespace) -> int:
    from depthray.config import load_config
    from depthray.preview import write_preview

    storage = load_config(args.config, args.set, require_io=False).storage
    sheet, page = write_preview(args.output, args.out, n=args.n, inputs_url=args.inputs,
                                gt_url=args.gt, max_uncertainty_mean=args.max_uncertainty_mean,
                                storage=storage)
    print(f"wrote {sheet} and {page}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from depthray.plan_command import run_plan

    return run_plan(args)


def _add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set inference.ensemble_size=3 (repeatable; "
                   "values are YAML: null, true, 0.5, [1, 2])")


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    """Object-store settings as a job has them: the job's config (its storage: section)."""
    p.add_argument("--config", help="the job's YAML config: its storage: section (S3 endpoint, region, "
                   "retries) is used to read, as the job wrote")
    _add_set_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthray",
        description="Depth pseudo ground truth at scale: tiled, ensembled Marigold on Ray Data.",
    )
    parser.add_argument("--version", action="version", version=f"depthray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "make-tiny-model",
        help="build a random-weight Marigold checkpoint (tests, demos; no download)",
        description="Build a random-weight checkpoint with Marigold's exact architecture and "
        "save it in diffusers layout. Its depth is meaningless.",
    )
    p.add_argument("out_dir", help="folder to create")
    p.add_argument("--preset", choices=("tiny", "sd2"), default="tiny",
                   help="tiny: toy widths (CPU tests); sd2: Stable Diffusion 2 widths (GPU benchmarks)")
    p.add_argument("--scheduler", choices=("ddim", "lcm"), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny_model)

    p = sub.add_parser(
        "predict",
        help="depth for image files on this machine (no Ray)",
        description="Predict depth for image files and write, per image, a 16-bit depth PNG "
        "({stem}.depth.png, depth*65535, 0 = near) and a preview ({stem}.preview.png). "
        "Settings come from --config (the model: and inference: sections) and --set.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (searched "
                   "recursively for image files; other files are counted and reported)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preview-size", type=int, default=1024, metavar="PX",
                   help="long side of {stem}.preview.png (default 1024; 0 = full size); depth stays full size")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="S",
                   help="for images still running after S seconds, a views line every S seconds (default 5)")
    p.add_argument("--config", help="YAML config (model: and inference: sections are used)")
    p.add_argument("--model", help="checkpoint: local folder, hub id or s3:// URL (sets model.path)")
    p.add_argument("--tiny", action="store_true",
                   help="use the built-in random-weight tiny model (offline; meaningless depth)")
    _add_set_option(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("init", help="write a job config with every key, its default and meaning",
                       description="Write a YAML job config listing every key with its default and "
                       "what it means (generated from depthray/config.py), ready to edit.")
    p.add_argument("path", nargs="?", default="job.yaml", help="where to write it ('-' = print; default job.yaml)")
    p.add_argument("--input", default="s3://my-bucket/images/", help="input.url to fill in")
    p.add_argument("--output", default="s3://my-bucket/depth/", help="output.url to fill in")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("run", help="run (or resume) a depth job on local Ray or a cluster",
                       description="Run the job a YAML config describes. Shards whose manifest "
                       "says complete are skipped, so re-running resumes.",
                       epilog="Every config key, its default and its meaning: `depthray init job.yaml` "
                       "writes them all into a config to edit (generated from depthray/config.py, "
                       "which validates them); the README's tables document the outputs. "
                       "Exit status: 0 done; 1 shards left unfinished (re-run to retry); 2 config "
                       "or storage error, nothing started; 3 another run took the output's lease; "
                       "4 too many error rows (quality.max_error_fraction; default: every image "
                       "failed); 130 interrupted (Ctrl-C) or 143 terminated (SIGTERM), after a summary, "
                       "committed shards kept.")
    p.add_argument("config", help="YAML config (`depthray init` writes one)")
    _add_set_option(p)
    p.add_argument("--address", help="Ray address to join (default: compute.address, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--pipeline", help="the labelling task: a module of pipelines/ (default: the config's "
                   "`pipeline`, else depth) or a path to a .py file declaring stages(cfg, run_id, device_kind)")
    p.add_argument("--verbose", dest="ray_logs", action="store_true",
                   help="show Ray's own warnings and the workers' output (tracebacks included) here; "
                   "by default they stay in Ray's log files and each failure is one summary line")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="how far a job has got, read from its output (no Ray)",
                       description="List the input shards and the output's manifests and print "
                       "shards complete / to do, images and errors in complete shards (by reason), "
                       "shards labelled with other settings, and the last run's summary. Reads "
                       "only; works while the job runs. Exit status 0 when every shard is "
                       "complete, 1 when some are left, 2 on a config or storage error.")
    p.add_argument("config", help="the job's YAML config")
    _add_set_option(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("demo", help="the whole job on built-in sample images (offline, ~1 min)",
                       description="Make sample images, build the tiny random-weight model, run the "
                       "full pipeline on a local Ray and print where the outputs are.")
    p.add_argument("--workdir", default="demo_output", help="where inputs and outputs go")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("submit", help="submit a job to a Ray cluster (ray job submit)",
                       description="Validate the config locally, then submit it through the Ray Job "
                       "API with the local depthray code in the runtime env; streams logs until done.")
    p.add_argument("config")
    _add_set_option(p)
    p.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("--no-ship-code", action="store_true", help="use the depthray installed on the cluster")
    p.add_argument("--timeout", type=float, help="stop the job after this many seconds")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser(
        "eval",
        help="score depth outputs against ground truth (AbsRel, delta1, ... after scale+shift; "
        "metric labels in metres, as written)",
        description="Compare predictions (Parquet/WebDataset output or a folder of 16-bit PNGs) "
        "with ground truth (16-bit PNG, .npy, .pfm; optional {key}.mask.png), matched by key. "
        "Each prediction gets a least-squares scale and shift (Marigold protocol). Any fsspec URL.",
        epilog="Metric outputs (pipelines/metric_depth.py: a metric_depth column or "
        "{key}.metric_depth.png) are also scored as written, in metres, with NO scale or shift "
        "fitted: m_abs_rel, m_rmse (metres), m_delta1, m_no_depth (GT pixels the map leaves "
        "without depth), beside the fit's own held-out abs_rel and its verdict (ok / "
        "low_confidence, counted in the summary). This takes the GT as metres: a 16-bit PNG "
        "divided by --gt-png-scale (1000 = millimetres, KITTI 256), .npy and .pfm as stored. "
        "A median metric/GT ratio far from 1 (say 1000) means the GT is in another unit. "
        "With --gt-disparity the metric map is not scored (disparity GT has no stated unit).",
    )
    p.add_argument("pred", metavar="PRED", help="depth output: folder, .parquet/.tar file, glob or URL")
    p.add_argument("gt", metavar="GT", help="ground-truth folder or URL")
    p.add_argument("--space", choices=("depth", "disparity"), default="depth",
                   help="what the prediction is affine-invariant in (default depth)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object, last line")
    p.add_argument("--mask", help="folder of valid masks ({key}.png, non-zero = valid)")
    p.add_argument("--gt-png-scale", type=float, default=1000.0,
                   help="16-bit GT PNG value per metre (1000 = millimetres; KITTI: 256); metric "
                   "labels are compared with GT in metres")
    p.add_argument("--gt-disparity", action="store_true", help="GT files hold disparity, not depth")
    p.add_argument("--min-depth", type=float, help="ignore GT closer than this")
    p.add_argument("--max-depth", type=float, help="ignore GT farther than this")
    p.add_argument("--no-rows", action="store_true", help="summary only, no per-image rows")
    _add_storage_options(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "preview",
        help="contact sheet PNG + one-file HTML page of depth outputs",
        description="Write preview.png (contact sheet) and preview.html (self-contained, sortable "
        "by uncertainty) for the first N images of an output (Parquet, WebDataset or folder). "
        "A metric output (pipelines/metric_depth.py) shows its metric map instead of the "
        "relative one, with a colour bar in metres from the map's own nearest to farthest "
        "depth, and the fit's verdict and held-out abs_rel under it (low_confidence = flagged).",
    )
    p.add_argument("output", metavar="OUTPUT", help="depth output: folder, file, glob or URL")
    p.add_argument("--n", type=int, default=32, help="images to show (default 32)")
    p.add_argument("--out", required=True, help="folder for preview.png and preview.html")
    p.add_argument("--inputs", help="folder of input images ({key}.jpg ...) when the output has none")
    p.add_argument("--gt", help="ground-truth folder: adds AbsRel / delta1 per image (metric outputs: "
                   "also m_abs_rel, the metric map against GT in metres, no fit)")
    p.add_argument("--max-uncertainty-mean", type=float,
                   help="flag images above this uncertainty (as quality.max_uncertainty_mean)")
    _add_storage_options(p)
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser(
        "plan",
        help="views, model evaluations and GPU time per image, before a job runs",
        description="Plan the views (global + tiles) of images of given sizes, or of local image "
        "files, with the tiling and ensemble settings of a config, and print views, model "
        "evaluations (views x members x steps) and an estimated GPU time.",
    )
    p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("--size", action="append", metavar="WxH", help="an image size, e.g. 4000x3000 (repeatable)")
    p.add_argument("--count", type=int, default=1, help="images of each --size (default 1)")
    p.add_argument("--images", action="append", metavar="GLOB", help="local image files to read sizes from")
    _add_set_option(p)
    p.add_argument("--processing-resolution", type=int,
                   help="model resolution (default: model.processing_resolution, checkpoint, 768)")
    p.add_argument("--steps", type=int, help="denoising steps (default: inference.num_inference_steps, "
                   "checkpoint, 1)")
    p.add_argument("--seconds-per-evaluation", type=float,
                   help="measured seconds for one UNet step on one view (enables the GPU-time estimate)")
    p.add_argument("--measure", action="store_true",
                   help="load the configured model and time, on this machine, one image of each "
                   "planned size as `depthray predict` runs it (model calls, decoding, tile fusion, "
                   "encoding); run it on a node of the kind the job will use")
    p.set_defaults(func=_cmd_plan)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from depthray.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"depthray: {e}", file=sys.stderr)
        return 2


def run_pipeline_file(path: str, argv: list[str]) -> int:
    """`python pipelines/<name>.py CONFIG [depthray run options]`: `depthray run` of that
    pipeline (so `ray job submit -- python pipelines/<name>.py CONFIG` runs it on a cluster).
    A module of the project's pipelines/ folder is named as a config would name it, so its
    config hash is the plain run's; any other file by its path."""
    import os

    import pipelines

    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    same = os.path.dirname(path) == os.path.dirname(os.path.abspath(pipelines.__file__))
    return main(["run", *argv, "--pipeline", stem if same else path])


if __name__ == "__main__":
    sys.exit(main())
