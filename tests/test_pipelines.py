"""pipelines/: a labelling task declared as a list of the job package's stages (#29).

The default task is pipelines/depth.py; another is one copied file, run with `--pipeline`
or as `python FILE CONFIG`, through the real CLI and job (local executor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from depthray.cli import main
from depthray.config import config_from_dict
from depthray.job.stages import job_stages
from tests.reliability.conftest import double_model

ROOT = Path(__file__).resolve().parents[1]


def write_job(tmp_path: Path, make_tar, make_image) -> Path:
    (tmp_path / "in").mkdir()
    for s in range(2):
        (tmp_path / "in" / f"{s:05d}.tar").write_bytes(
            make_tar([(f"s{s}k{i}.jpg", make_image(24, 32, seed=10 * s + i)) for i in range(3)]))
    config = {"input": {"url": str(tmp_path / "in" / "*.tar")}, "output": {"url": str(tmp_path / "out")},
              "model": double_model(), "inference": {"ensemble_size": 3, "tiling": {"mode": "off"}},
              "compute": {"images_per_batch": 2, "executor": "local"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def manifests(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "_manifest").glob("*.json"))}


def test_the_default_task_is_pipelines_depth():
    import pipelines.depth

    cfg = config_from_dict({"input": {"url": "/in.tar"}, "output": {"url": "/out"}})
    got, declared = job_stages(cfg, "run"), pipelines.depth.stages(cfg, "run")
    assert [s.name for s in got] == ["read", "decode", "infer", "encode", "write"]
    assert [(s.name, s.fn, s.batch_size, s.actor_pool) for s in got] == \
        [(s.name, s.fn, s.batch_size, s.actor_pool) for s in declared]
    assert "pipeline" not in cfg.settings()  # the default's hash is the one outputs already hold


def test_python_pipelines_depth_py_is_a_plain_run(tmp_path, make_tar, make_image):
    """`python pipelines/depth.py CONFIG` runs the job; a plain `depthray run` afterwards
    finds every shard complete under its own settings (same config hash)."""
    config = write_job(tmp_path, make_tar, make_image)
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the test double's module
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / "depth.py"), str(config)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    first = manifests(tmp_path / "out")
    assert sorted(first) == ["00000", "00001"]
    assert main(["run", str(config)]) == 0
    assert manifests(tmp_path / "out") == first  # resumed: nothing redone


def test_a_task_copied_from_depth_py_runs_with_its_own_settings(tmp_path, make_tar, make_image, capsys):
    """A user's task: pipelines/depth.py copied and changed (here: one ensemble member
    whatever the config says), run with `--pipeline FILE`: its labels are written, its
    config hash is its own, so it never resumes into a plain depth output."""
    config = write_job(tmp_path, make_tar, make_image)
    text = (ROOT / "pipelines" / "depth.py").read_text()
    text = text.replace("def stages(cfg, run_id: str = \"\", device_kind: str | None = None) -> list:\n",
                        "def stages(cfg, run_id: str = \"\", device_kind: str | None = None) -> list:\n"
                        "    import dataclasses\n"
                        "    cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, ensemble_size=1))\n")
    assert "ensemble_size=1" in text
    mine = tmp_path / "one_member.py"
    mine.write_text(text)
    assert main(["run", str(config), "--pipeline", str(mine)]) == 0
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 6 and {r["ensemble_size"] for r in rows} == {1}
    hashes = {m["config_hash"] for m in manifests(tmp_path / "out").values()}
    plain = config_from_dict(yaml.safe_load(config.read_text()))
    assert len(hashes) == 1 and plain.hash("cpu") not in hashes
    capsys.readouterr()
    assert main(["run", str(config)]) == 2  # the plain task refuses the other task's output
    assert "config" in capsys.readouterr().err


def test_a_pipeline_that_does_not_load_is_refused_before_anything_runs(tmp_path, make_tar, make_image, capsys):
    config = write_job(tmp_path, make_tar, make_image)
    assert main(["run", str(config), "--pipeline", "no_such_task"]) == 2
    assert "pipeline 'no_such_task'" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def stages(cfg, run_id='', device_kind=None):\n    return ['read']\n")
    assert main(["run", str(config), "--pipeline", str(broken)]) == 2
    assert "list of Stage" in capsys.readouterr().err
    assert not (tmp_path / "out" / "_manifest").exists() or not list((tmp_path / "out" / "_manifest").iterdir())
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
