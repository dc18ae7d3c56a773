"""What `depthray predict` tells a user while it works: which files it takes from the
folders it was given, what one image will cost, and views done within an image.

A 6000x4000 photo is 120 views x 5 members: it sat at `0/1` for 25 minutes. These lines
say how far it is and, once a view has been timed, how long is left. Pure functions and a
small class with an injectable clock, so tests drive them without a model.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable

from depthray.durations import format_duration
from depthray.io.decode import IMAGE_EXTS

# one image asking for this many model evaluations (views x members) earns a warning
COSTLY_EVALUATIONS = 200


def expand_inputs(paths: list[str]) -> tuple[list[str], Counter]:
    """Files to predict: named files as given; folders searched recursively for image files
    (depthray/io/decode.py IMAGE_EXTS), sorted. Returns the files and, by extension, what
    folders held that is not an image (counted, so nothing vanishes unseen). Hidden files
    (a leading dot, e.g. .DS_Store) are neither taken nor counted."""
    files: list[str] = []
    skipped: Counter = Counter()
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            files.append(text)  # a named file is tried as given; unreadable becomes an error row
            continue
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            if any(part.startswith(".") for part in p.relative_to(path).parts):
                continue
            ext = p.suffix.lstrip(".").lower()
            if ext in IMAGE_EXTS:
                files.append(str(p))
            else:
                skipped[f".{ext}" if ext else "(no extension)"] += 1
    return files, skipped


def skipped_line(skipped: Counter) -> str | None:
    if not skipped:
        return None
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"skipped {sum(skipped.values())} file(s) in the input folders that are not images "
            f"({kinds}); image extensions: {', '.join(IMAGE_EXTS)}")


def cost_warning(name: str, views: int, ensemble_size: int, threshold: int = COSTLY_EVALUATIONS) -> str | None:
    """A warning when one image needs `threshold` or more model evaluations, naming the
    settings that reduce them; None below it."""
    evaluations = views * ensemble_size
    if evaluations < threshold:
        return None
    return (f"warning: {name} needs {evaluations} model evaluations ({views} views x {ensemble_size} "
            f"ensemble members), each running every denoising step; fewer with --set "
            f"inference.tiling.max_tiles=N (fewer tiles), a smaller inference.ensemble_size, a "
            f"larger model.processing_resolution (fewer, larger tiles), or "
            f"inference.tiling.mode=off (global view only). `depthray plan --measure` times it first.")


def views_line(first: int, count: int, n_images: int, done: int, total: int, elapsed: float) -> str:
    """'image 1/1: views 37/120, ~3m left'; time left only once a view has been timed."""
    which = f"image {first + 1}/{n_images}" if count == 1 else f"images {first + 1}-{first + count}/{n_images}"
    line = f"{which}: views {done}/{total}"
    if done > 0 and elapsed > 0 and done < total:
        line += f", ~{format_duration(elapsed / done * (total - done))} left"
    return line


class ViewProgress:
    """predict.Progress for `depthray predict`: for a batch of images still running after
    `every_s` seconds, prints `views_line` every `every_s` seconds and once more when it is
    done, so a long image shows it is moving. Quick batches print nothing (the progress bar
    counts images): a line at each batch's start and end gave 642 lines for 300 images."""

    def __init__(self, n_images: int, write: Callable[[str], None], every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.n_images, self.write, self.every_s, self.clock = n_images, write, every_s, clock
        self.started = self.last = 0.0
        self.shown = False  # a line was printed for the batch running now

    def __call__(self, first: int, count: int, done: int, total: int) -> None:
        now = self.clock()
        if done == 0:  # a new batch of images: its clock starts now
            self.started = self.last = now
            self.shown = False
            return
        if (done == total and self.shown) or (done < total and now - self.last >= self.every_s):
            self.last, self.shown = now, True
            self.write(views_line(first, count, self.n_images, done, total, now - self.started))
