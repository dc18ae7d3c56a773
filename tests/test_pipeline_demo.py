"""`depthray demo` end to end in a fresh process (the README's main command), and the
shipped configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from depthray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_demo_yaml_is_what_the_demo_runs():
    from depthray.demo import DEMO_CONFIG

    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()) == yaml.safe_load(DEMO_CONFIG)


@pytest.mark.timeout(300)
def test_depthray_demo_runs_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "depthray.cli", "demo", "--workdir", str(tmp_path / "demo"), "--num-cpus", "2"],
        env=env, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 written, 0 errors" in proc.stdout
    assert "preview (input | depth | uncertainty)" in proc.stdout
    table = pq.read_table(tmp_path / "demo" / "depth")
    assert table.num_rows == 12 and len(set(table.column("key").to_pylist())) == 12
    assert (tmp_path / "demo" / "preview" / "preview.png").stat().st_size > 0
    assert "<html" in (tmp_path / "demo" / "preview" / "preview.html").read_text().lower()
    assert "eval vs the scenes' ground truth: abs_rel" in proc.stdout
