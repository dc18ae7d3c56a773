"""One configuration per output (depthray/io/output_config.py): the first run records its
settings in `_jobs/config.json`; a run with other settings is refused naming them, even
when its shard names are new to the output, before Ray starts (or, when its device kind is
left to Ray, right after Ray resolves it and before any work). CPU float32 labels beside
GPU bfloat16 ones need `output.allow_mixed_devices: true`.

A "GPU run" here is the CPU test double with `model.device: cuda`: the settings (and so the
hash, `model.dtype` resolving to bfloat16) are a CUDA run's; the double computes on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from depthray.config import ConfigError
from depthray.job import driver
from depthray.job.driver import run_job
from tests.reliability.conftest import double_model, job_config, local_job_config
from tests.reliability.test_crashes import write_shards

pytestmark = pytest.mark.timeout(300)
GPU_DOUBLE = {**double_model(), "device": "cuda"}  # a CUDA run's settings; computes on the CPU


def _inputs(tmp_path: Path, make_image) -> tuple[str, str]:
    """Two inputs whose shard names differ (00000-00001 and 00010-00011)."""
    write_shards(tmp_path / "a", make_image, shards=2, per=2)
    write_shards(tmp_path / "b", make_image, shards=2, per=2)
    for i in range(2):
        (tmp_path / "b" / f"{i:05d}.tar").rename(tmp_path / "b" / f"{10 + i:05d}.tar")
    return str(tmp_path / "a" / "*.tar"), str(tmp_path / "b" / "*.tar")


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
            and p.name not in ("lease.json", ".lease.json.lock")}


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started: the refusal came too late")


def test_other_settings_with_new_shard_names_are_refused_before_ray(tmp_path, make_image,
                                                                     monkeypatch, capsys):
    a, b = _inputs(tmp_path, make_image)
    out = tmp_path / "out"
    first = local_job_config(a, str(out), double_model())
    assert run_job(first)["shards_complete"] == 2
    record = json.loads((out / "_jobs" / "config.json").read_text())
    assert record["config_hash"] == first.hash("cpu") and record["hashes"] == {first.hash("cpu"): "cpu"}
    assert (record["settings"]["model.device"], record["settings"]["model.dtype"]) == ("cpu", "float32")
    monkeypatch.setattr(driver, "init_ray", _no_ray)
    before = _files(out)
    with pytest.raises(ConfigError, match=r"inference.ensemble_size: 1 -> 2"):
        run_job(job_config(b, str(out), double_model(), inference={"ensemble_size": 2}))
    # As `depthray run` has it: exit 2, one line naming the setting.
    config = tmp_path / "other.yaml"
    config.write_text(yaml.safe_dump({"input": {"url": b}, "output": {"url": str(out)}, "model": double_model(),
                                      "inference": {"ensemble_size": 2, "tiling": {"mode": "off"}}}))
    from depthray.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["run", str(config)]) == 2
    assert "inference.ensemble_size: 1 -> 2" in capsys.readouterr().err
    # `depthray status` reads the same record and says what `depthray run` would do.
    assert cli_main(["status", str(config)]) == 1
    text = capsys.readouterr().out
    assert "refused `depthray run` would stop before any work" in text and "inference.ensemble_size: 1 -> 2" in text
    first_yaml = tmp_path / "first.yaml"
    first_yaml.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "inference": {
        "ensemble_size": 1, "tiling": {"mode": "off"}}}))
    assert cli_main(["status", str(first_yaml), "--json"]) == 1  # b's shards are still to do
    st = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert st["output_config"] == {"config_hash": first.hash("cpu"), "hashes": {first.hash("cpu"): "cpu"},
                                   "refused": None}
    # GPU labels (bfloat16) beside CPU ones (float32), new shard names: refused, naming both.
    with pytest.raises(ConfigError, match=r"model.device: 'cpu' -> 'cuda'; model.dtype: 'float32' -> 'bfloat16'"
                                          r".*output.allow_mixed_devices"):
        run_job(job_config(b, str(out), GPU_DOUBLE))
    assert _files(out) == before, "a refused run changed the output"


def test_cpu_and_gpu_labels_mix_only_when_allowed(tmp_path, make_image):
    a, b = _inputs(tmp_path, make_image)
    out = tmp_path / "out"
    cpu = local_job_config(a, str(out), double_model(), output={"allow_mixed_devices": True})
    assert run_job(cpu)["shards_complete"] == 2
    gpu = local_job_config(b, str(out), GPU_DOUBLE, output={"allow_mixed_devices": True})
    assert run_job(gpu)["shards_complete"] == 2
    record = json.loads((out / "_jobs" / "config.json").read_text())
    assert record["hashes"] == {cpu.hash("cpu"): "cpu", gpu.hash("cuda"): "cuda"}
    rows = pq.read_table(str(out), columns=["source", "config_hash"]).to_pylist()
    assert {(r["source"], r["config_hash"]) for r in rows} == {
        ("00000", cpu.hash("cpu")), ("00001", cpu.hash("cpu")), ("00010", gpu.hash("cuda")), ("00011", gpu.hash("cuda"))}
    # A CPU run over the GPU-labelled shards skips them: complete, not "other settings".
    assert run_job(local_job_config(b, str(out), double_model(), output={"allow_mixed_devices": True}))[
        "shards_skipped"] == 2


def test_a_device_left_to_ray_is_checked_once_ray_resolved_it(ray_session, tmp_path, make_image):
    """The output was labelled on a GPU; a run with `device: auto` could be one too, so it is
    let through before Ray; Ray gives it CPU actors (float32): refused before any work."""
    a, b = _inputs(tmp_path, make_image)
    out = tmp_path / "out"
    assert run_job(job_config(a, str(out), GPU_DOUBLE))["shards_complete"] == 2
    before = _files(out)
    with pytest.raises(ConfigError, match=r"model.device: 'cuda' -> 'cpu'; model.dtype: 'bfloat16' -> 'float32'"):
        run_job(job_config(b, str(out), double_model()))
    assert _files(out) == before


def test_overwrite_with_other_settings_makes_them_the_outputs(tmp_path, make_image):
    a, b = _inputs(tmp_path, make_image)
    out = tmp_path / "out"
    run_job(local_job_config(a, str(out), double_model()))
    other = local_job_config(b, str(out), double_model(), inference={"ensemble_size": 2}, output={"overwrite": True})
    assert run_job(other)["shards_complete"] == 2
    assert json.loads((out / "_jobs" / "config.json").read_text())["config_hash"] == other.hash("cpu")
    with pytest.raises(ConfigError, match=r"inference.ensemble_size: 2 -> 1"):
        run_job(local_job_config(a, str(out), double_model()))  # the first settings are now the other ones
