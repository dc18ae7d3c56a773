"""Durations as a person reads them in a progress line ("1h02m", "1m35s", "8s").

Shared by the job's progress (depthray/job/ledger.py) and `depthray predict`'s views line
(depthray/predict_progress.py): predict's reporting should not import the job's ledger for
one formatter, and both lines should say time left the same way.
"""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 8 -> '8s'."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"
