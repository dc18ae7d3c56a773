"""`depthray init`: a job config holding every key with its default and its meaning.

The text is generated from the dataclasses in depthray/config.py (their field comments are
the documentation of each key), so it never drifts from what the job accepts.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import yaml

from depthray.config import Config

_FIELD = re.compile(r"^\s+(\w+):[^=]+=.*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


def _comments(cls: type) -> dict[str, list[str]]:
    """Field -> comment lines (the ones above it, then the one at its end)."""
    out: dict[str, list[str]] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = _COMMENT.match(line)
        if m:
            above.append(m.group(1))
            continue
        f = _FIELD.match(line)
        if f:
            out[f.group(1)] = above + ([f.group(2)] if f.group(2) else [])
        above = []
    return out


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _section(obj, indent: int) -> list[str]:
    lines: list[str] = []
    notes = _comments(type(obj))
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for note in notes.get(f.name, []):
            lines.append(f"{pad}# {note}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines += _section(value, indent + 1)
        else:
            lines.append(f"{pad}{f.name}: {_scalar(value)}")
    return lines


def example_config(input_url: str = "s3://my-bucket/images/", output_url: str = "s3://my-bucket/depth/") -> str:
    cfg = Config()
    cfg.input.url, cfg.output.url = input_url, output_url
    head = ["# depthray job config: every key, its default and what it means (from depthray/config.py).",
            "# Run: depthray run THIS.yaml   Override: --set inference.ensemble_size=3", ""]
    body = []
    notes = _comments(Config)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value):  # a top-level setting (`pipeline`)
            body += [f"# {note}" for note in notes.get(f.name, [])] + [f"{f.name}: {_scalar(value)}", ""]
            continue
        body.append(f"{f.name}:")
        body += _section(value, 1)
        body.append("")
    return "\n".join(head + body)
