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
