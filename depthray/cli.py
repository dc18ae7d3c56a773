"""The `depthray` command: a thin layer over the library.

Each verb is one `_cmd_<verb>` function registered in `build_parser`; heavy imports
(torch, ray) happen inside the verbs so `depthray --help` answers instantly.
"""

from __future__ import annotations

import argparse
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


def _read_image(path: str):
    """Image file -> numpy array as displayed (EXIF orientation applied)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im.convert("RGB"))


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from depthray.config import load_config
    from depthray.models.loading import load_model
    from depthray.models.tiny import ensure_tiny_model
    from depthray.predict import predict_images
    from depthray.visualize import colorize, side_by_side

    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = load_config(args.config, overrides, require_io=False)
    if args.tiny:
        cfg.model.path = str(ensure_tiny_model())
        print("using the built-in tiny random-weight model: its depth is meaningless (plumbing only)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model)
    chunk = max(1, cfg.compute.images_per_batch)
    failed = 0
    with tqdm(total=len(args.images), unit="img", desc="depth") as bar:
        for start in range(0, len(args.images), chunk):
            paths, images = [], []
            for p in args.images[start : start + chunk]:
                try:
                    images.append(_read_image(p))
                    paths.append(p)
                except (OSError, ValueError) as e:  # unreadable file: report, keep going
                    failed += 1
                    tqdm.write(f"skipped {p}: {type(e).__name__}: {e}")
                    bar.update(1)
            for p, img, res in zip(paths, images, predict_images(images, model, cfg.inference)):
                stem = Path(p).stem
                depth16 = np.round(res.depth * 65535).astype(np.uint16)
                Image.fromarray(depth16).save(out / f"{stem}.depth.png")
                rgb = img if img.ndim == 3 else np.repeat((img / max(img.max(), 1) * 255).astype(np.uint8)[..., None], 3, 2)
                if rgb.dtype != np.uint8:
                    rgb = (rgb / 257).astype(np.uint8)
                Image.fromarray(side_by_side(rgb[..., :3], colorize(res.depth))).save(out / f"{stem}.preview.png")
                bar.update(1)
    print(f"wrote {len(args.images) - failed} depth maps to {out}/ "
          "({stem}.depth.png: 16-bit, depth*65535, 0 = near; {stem}.preview.png: input | depth)")
    return 1 if failed else 0


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
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="YAML config (model: and inference: sections are used)")
    p.add_argument("--model", help="checkpoint: local folder, hub id or s3:// URL (sets model.path)")
    p.add_argument("--tiny", action="store_true",
                   help="use the built-in random-weight tiny model (offline; meaningless depth)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set inference.ensemble_size=3 (repeatable)")
    p.set_defaults(func=_cmd_predict)

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


if __name__ == "__main__":
    sys.exit(main())
