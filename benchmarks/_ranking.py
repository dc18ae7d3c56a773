"""What the two ranking benchmarks share (uncertainty_ranking.py for seed ensembles,
augmentation_ranking.py for augmentation ensembles): does an image's mean uncertainty rank
its error? The scores, and one command line that runs every setting and prints the table
and a last-line JSON."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Callable

import numpy as np
import torch

from depthray.metrics import spearman

# run_setting(name, scenes, (H, W), ensemble_size, first range, second range, seed) -> row
RunSetting = Callable[[str, int, tuple[int, int], int, tuple[float, float], tuple[float, float], int], dict]


def ranking_scores(uncertainty: np.ndarray, abs_rel: np.ndarray) -> dict:
    """Rank agreement, and what dropping the 25 % most uncertain images buys."""
    keep = uncertainty <= np.quantile(uncertainty, 0.75)
    return {
        "spearman": spearman(uncertainty, abs_rel),
        "pearson": float(np.corrcoef(uncertainty, abs_rel)[0, 1]),
        "abs_rel_all": float(abs_rel.mean()),
        "abs_rel_kept_75pct": float(abs_rel[keep].mean()),
        "abs_rel_dropped_25pct": float(abs_rel[~keep].mean()),
    }


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A size drawn log-uniformly from `bounds` (some images easy, some hard); 0 if off."""
    return float(np.exp(rng.uniform(*np.log(bounds)))) if bounds[1] > 0 else 0.0


def ranking_main(argv: list[str] | None, description: str, settings: dict[str, tuple], run_setting: RunSetting,
                 scenes: int, size: tuple[int, int], members: str) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scenes", type=int, default=scenes)
    p.add_argument("--size", type=int, nargs=2, default=size, metavar=("H", "W"))
    p.add_argument("--ensemble-size", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # small tensors: threads only add contention
    rows = [run_setting(name, args.scenes, tuple(args.size), args.ensemble_size, a, b, args.seed)
            for name, (a, b) in settings.items()]
    width = max(map(len, settings))
    print(f"{args.scenes} scenes {args.size[0]}x{args.size[1]}, {args.ensemble_size} {members}, median + MAD")
    print(f"{'setting':{width}s} {'spearman':>8s} {'pearson':>8s} {'AbsRel all':>10s} {'kept 75%':>9s} "
          f"{'dropped 25%':>11s}")
    for r in rows:
        print(f"{r['setting']:{width}s} {r['spearman']:8.3f} {r['pearson']:8.3f} {r['abs_rel_all']:10.4f} "
              f"{r['abs_rel_kept_75pct']:9.4f} {r['abs_rel_dropped_25pct']:11.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(json.dumps(rows))
    return 0
