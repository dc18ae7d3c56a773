"""Config errors through the real CLI (`depthray run`): one clear message on stderr, exit
status 2, no traceback, nothing written, and no inference started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.reliability.conftest import REPO, double_model

# no_ray: run_job must raise before it starts a Ray, so none may be running here
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_ray")]


def cli_run(tmp_path: Path, cfg: dict, *sets: str) -> subprocess.CompletedProcess:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "depthray.cli", "run", str(config), "--address", "local"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=100)


def base(tmp_path: Path, make_image) -> dict:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(make_image(16, 16))
    return {"input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
            "model": double_model(die_once_marker=str(tmp_path / "model-ran"))}


def check(res: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("depthray: ")]
    assert len(lines) == 1, err  # one message (it may list several problems below it)
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "model-ran").exists()  # no model was ever called
    assert not (tmp_path / "out" / "_manifest").exists()
    return err


def test_unknown_key_and_wrong_type_in_one_message(tmp_path, make_image):
    res = cli_run(tmp_path, base(tmp_path, make_image), "input.bogus=1", "inference.ensemble_size=lots")
    check(res, tmp_path, "input.bogus: unknown key", "inference.ensemble_size: expected int, got 'lots'")


def test_unreachable_input_through_the_cli(tmp_path, make_image):
    cfg = base(tmp_path, make_image)
    cfg["input"]["url"] = str(tmp_path / "nowhere")
    check(cli_run(tmp_path, cfg), tmp_path, str(tmp_path / "nowhere"), "neither a shard file nor a folder")


@pytest.mark.parametrize("case", ["empty_glob", "output_inside_input", "unreachable_endpoint"])
def test_io_problems_are_reported_before_any_work(tmp_path, make_image, monkeypatch, case):
    """run_job raises ConfigError before it touches Ray (no Ray is running here at all)."""
    import ray

    from depthray.config import ConfigError, config_from_dict
    from depthray.job.driver import run_job

    data = base(tmp_path, make_image)
    needles = {
        "empty_glob": ["nothing matches", str(tmp_path / "in" / "*.tar")],
        "output_inside_input": ["overlaps input.url", str(tmp_path / "in" / "depth")],
        # a refused TCP connection is named at once, before any client retries
        "unreachable_endpoint": ["s3://some-bucket/in/*.tar", "cannot connect to the storage endpoint",
                                 "127.0.0.1:9"],
    }[case]
    if case == "empty_glob":
        data["input"]["url"] = str(tmp_path / "in" / "*.tar")
    elif case == "output_inside_input":
        data["output"]["url"] = str(tmp_path / "in" / "depth")
    else:
        data["input"]["url"] = "s3://some-bucket/in/*.tar"
        data["storage"] = {"endpoint_url": "http://127.0.0.1:9", "retries": 1}
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    cfg = config_from_dict(data, require_io=True)
    assert not ray.is_initialized()
    with pytest.raises(ConfigError) as err:
        run_job(cfg)
    assert not ray.is_initialized()
    for n in needles:
        assert n.lower() in str(err.value).lower(), (n, str(err.value))
    assert not (tmp_path / "model-ran").exists()


def test_ray_that_fails_to_start_is_one_line_exit_2(tmp_path, make_image):
    """A Ray that cannot start (here: a local Ray refused for -1 CPUs; on a loaded cluster
    a node start-up timeout) ends with the one-line error every other failure gets."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(base(tmp_path, make_image)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-m", "depthray.cli", "run", str(config), "--num-cpus", "-1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
    check(res, tmp_path, "Ray did not start")


def test_steps_an_end_to_end_checkpoint_cannot_run_are_exit_2_before_ray(tmp_path, make_image, tiny_model_dir):
    """`inference.num_inference_steps: 4` with an end-to-end (single-step) checkpoint used to
    start Ray, turn every image into an `infer` error row and exit 0: now one line, exit 2,
    before any work."""
    cfg = base(tmp_path, make_image)
    cfg["model"] = {"kind": "marigold-e2e", "path": str(tiny_model_dir)}
    check(cli_run(tmp_path, cfg, "inference.num_inference_steps=4"), tmp_path,
          "inference.num_inference_steps: 4", "exactly one step")


@pytest.mark.parametrize("model", [{"kind": "marigold", "path": "GonzaloMG/marigold-e2e-ft-depth"},
                                   {"kind": "transformers", "path": "depth-anything/Depth-Anything-V2-Small-hf"}])
def test_steps_refused_by_kind_and_by_published_name(tmp_path, make_image, model):
    """The same refusal for a published e2e-ft name under `kind: marigold` (run as e2e by its
    name) and for a transformers model (no steps at all), without downloading either; one
    step is what an e2e checkpoint runs, so 1 passes the check."""
    import ray

    from depthray.config import ConfigError, config_from_dict
    from depthray.job.checks import check_steps

    data = base(tmp_path, make_image)
    data["model"] = model
    data["inference"] = {"num_inference_steps": 2}
    with pytest.raises(ConfigError, match="inference.num_inference_steps: 2"):
        check_steps(config_from_dict(data, require_io=True))
    data["inference"] = {"num_inference_steps": 1}
    if model["kind"] == "transformers":
        with pytest.raises(ConfigError, match="no denoising steps"):
            check_steps(config_from_dict(data, require_io=True))
    else:
        check_steps(config_from_dict(data, require_io=True))
    assert not ray.is_initialized()


def test_local_executor_runs_and_commits_without_starting_ray(tmp_path, make_image):
    """`compute.executor: local` labels and commits in this process: no Ray is started (this
    module runs with none), the shard is committed with its manifest, a re-run skips it."""
    import ray

    from depthray.config import config_from_dict
    from depthray.job.driver import run_job

    data = base(tmp_path, make_image)
    data["model"] = double_model()
    data["compute"] = {"executor": "local"}
    cfg = config_from_dict(data, require_io=True)
    summary = run_job(cfg)
    assert (summary["images"], summary["errors"], summary["shards_complete"]) == (1, 0, 1), summary
    assert not ray.is_initialized()
    assert run_job(cfg)["shards_skipped"] == 1
