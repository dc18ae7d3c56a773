"""`depthray run`: the job from a config, its summary, and the exit status.

0 done; 1 shards left unfinished (a re-run retries them); 3 another run took the output's
lease; 4 too many error rows (`quality.max_error_fraction`); 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), both after a summary with the committed shards kept. Config and
storage errors (2) are raised before anything starts and reported by the CLI's `main`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _stop_ray() -> None:
    try:  # after Ctrl-C: report a failed shutdown, keep the exit code
        __import__("ray").shutdown()
    except BaseException as e:  # noqa: BLE001
        logging.getLogger(__name__).debug("ray.shutdown: %s", e)


def run(args: argparse.Namespace) -> int:
    """`depthray run`: the job, its summary printed, and an exit status a pipeline can act on."""
    from depthray.config import load_config
    from depthray.job.driver import run_job
    from depthray.job.ledger import summary_lines

    overrides = list(args.set or [])
    if getattr(args, "pipeline", None):
        overrides.append(f"pipeline={args.pipeline}")
    cfg = load_config(args.config, overrides)
    try:
        summary = run_job(cfg, address=args.address, num_cpus=args.num_cpus,
                          quiet=not (args.verbose or args.ray_logs))
    except KeyboardInterrupt:  # before the job ran: nothing to summarise
        print("depthray: interrupted before the job started; nothing was committed", file=sys.stderr)
        return 130
    print("\n".join(summary_lines(summary)))
    if summary.get("lease_lost"):  # another run writes this output now: say which, stop
        print(f"depthray: {summary['lease_lost']}", file=sys.stderr)
        return 3
    if summary.get("interrupted"):
        _stop_ray()  # now, not in an exit hook a late signal or worker error can turn into exit 1
        print(f"interrupted: {summary['shards_complete']} shard(s) committed by this run, "
              f"{summary['shards_skipped']} before it; re-run the same command to resume")
        return 143 if summary.get("interrupted_by") == "SIGTERM" else 130  # 128 + the signal, as shells report
    if summary["shards_unfinished"]:
        return 1
    failed = error_fraction_failed(summary, cfg.quality.max_error_fraction)
    if failed:
        print(f"depthray: {failed}", file=sys.stderr)
        return 4
    return 0


def error_fraction_failed(summary: dict, limit: float) -> str | None:
    """Why a finished run fails on its errors (quality.max_error_fraction), or None."""
    images, errors = int(summary.get("images") or 0), int(summary.get("errors") or 0)
    if errors and errors / (images + errors) >= limit:
        return (f"{errors} of the {images + errors} images this run took became error rows "
                f"(quality.max_error_fraction: {limit}); see _errors/ for the reasons")
    return None

