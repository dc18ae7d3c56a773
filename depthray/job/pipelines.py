"""Where a labelling task's stage list comes from: the `pipeline` setting.

A pipeline is a Python module that declares one labelling task as a list of stages over the
job package (depthray/job/stages.py), as datatrove's pipelines are lists of steps any
executor runs: `stages(cfg, run_id, device_kind) -> list[Stage]`. The project's pipelines/
folder holds them (`depth`, the default); a path to a .py file names one of your own (copy
pipelines/depth.py). Both executors (Ray, local) run whatever list it returns.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

PipelineStages = Callable[..., list]


def load_pipeline(name: str) -> PipelineStages:
    """`stages` of the pipeline `name`: a module of pipelines/ ("depth"), a dotted module
    ("pkg.task"), or a path to a .py file. Raises ValueError saying what is wrong."""
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isfile(path):
            raise ValueError(f"pipeline {name!r}: no such file")
        module_name = f"depthray_pipeline_{os.path.splitext(os.path.basename(path))[0]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"pipeline {name!r}: {type(e).__name__}: {e}") from e
    else:
        dotted = name if "." in name else f"pipelines.{name}"
        try:
            module = importlib.import_module(dotted)
        except ImportError as e:
            raise ValueError(f"pipeline {name!r}: cannot import {dotted!r} ({e}); name a module of "
                             "pipelines/ or a path to a .py file") from e
    stages = getattr(module, "stages", None)
    if not callable(stages):
        raise ValueError(f"pipeline {name!r}: declares no stages(cfg, run_id, device_kind) function")
    return stages
