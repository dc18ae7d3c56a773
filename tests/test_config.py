"""Config is validated once, up front, with every problem in one message."""

from __future__ import annotations

import pytest

from depthray.config import ConfigError, apply_overrides, config_from_dict, load_config


def test_defaults_match_the_design():
    cfg = config_from_dict({})
    assert cfg.inference.ensemble_size == 5
    assert cfg.inference.ensemble_reduction == "median"
    assert cfg.inference.tiling.mode == "auto"
    assert cfg.model.kind == "marigold" and cfg.model.path == "prs-eth/marigold-depth-v1-1"


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"inference": {"ensemble_sise": 3, "batch_size": "8"}, "modell": {}})
    msg = str(e.value)
    assert "inference.ensemble_sise: unknown key" in msg
    assert "inference.batch_size: expected int" in msg
    assert "modell: unknown key" in msg


def test_choices_and_ranges():
    with pytest.raises(ConfigError, match="ensemble_reduction: must be one of median, mean"):
        config_from_dict({"inference": {"ensemble_reduction": "max"}})
    with pytest.raises(ConfigError, match="ensemble_size: must be >= 1"):
        config_from_dict({"inference": {"ensemble_size": 0}})
    with pytest.raises(ConfigError, match="input.url: required"):
        config_from_dict({}, require_io=True)
    with pytest.raises(ConfigError, match="compute.batch_timeout_s: must be >= 0"):
        config_from_dict({"compute": {"batch_timeout_s": -1}})
    assert config_from_dict({"compute": {"batch_timeout_s": 0}}).compute.batch_timeout_s == 0
    with pytest.raises(ConfigError, match="input.image_root: a folder path or URL, or null"):
        config_from_dict({"input": {"image_root": " "}})
    inp = config_from_dict({"input": {"format": "arrow", "image_root": "s3://b/imgs"}}).input
    assert (inp.format, inp.image_root) == ("arrow", "s3://b/imgs")


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("input: {url: /data/*.tar}\noutput: {url: /out}\ninference: {ensemble_size: 4}\n")
    cfg = load_config(p, ["inference.ensemble_size=2", "inference.tiling.overlap=0.5",
                          "model.processing_resolution=null"])
    assert cfg.inference.ensemble_size == 2
    assert cfg.inference.tiling.overlap == 0.5
    assert cfg.model.processing_resolution is None
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inference.seed"])


def test_int_accepted_for_float_and_hash_tracks_inference():
    a = config_from_dict({"inference": {"tiling": {"overlap": 0}}})
    assert isinstance(a.inference.tiling.overlap, float)
    b = config_from_dict({"inference": {"seed": 1}})
    assert a.hash() != b.hash()
    assert config_from_dict({}).hash() == config_from_dict({"output": {"url": "/elsewhere"}}).hash()


def test_yaml_on_off_words_for_tiling_mode(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("inference: {tiling: {mode: off}}\n")
    assert load_config(p, require_io=False).inference.tiling.mode == "off"
    assert load_config(None, ["inference.tiling.mode=on"], require_io=False).inference.tiling.mode == "on"
    with pytest.raises(ConfigError, match="expected bool"):
        config_from_dict({"output": {"overwrite": "yes"}})


def test_hash_resolves_auto_dtype_and_device_for_where_the_model_runs():
    """A CPU float32 run and a GPU bfloat16 run of `dtype: auto` give different depths, so
    they must not share a config hash; explicit settings hash the same wherever they run."""
    auto = config_from_dict({})
    assert auto.hash("cpu") != auto.hash("cuda")
    assert auto.hash() == auto.hash("cpu")
    explicit = config_from_dict({"model": {"dtype": "float32", "device": "cpu"}})
    assert explicit.hash("cuda") == explicit.hash("cpu") == auto.hash("cpu")
    gpu = config_from_dict({"model": {"dtype": "bfloat16", "device": "cuda:1"}})
    assert gpu.hash() == auto.hash("cuda")


def test_auto_dtype_is_recorded_as_each_kind_runs_it():
    """`dtype: auto` on a GPU runs bfloat16 for Marigold and float16 for the transformers
    backend (depthray/precision.py): the settings and hash of a GPU job say which ran, and an
    explicit setting of what `auto` ran hashes the same."""
    hf = {"kind": "transformers", "path": "org/depth"}
    assert config_from_dict({"model": hf}).settings("cuda")["model.dtype"] == "float16"
    assert config_from_dict({}).settings("cuda")["model.dtype"] == "bfloat16"
    assert config_from_dict({"model": hf}).settings("cpu")["model.dtype"] == "float32"
    fp16 = config_from_dict({"model": {**hf, "dtype": "float16", "device": "cuda"}})
    bf16 = config_from_dict({"model": {**hf, "dtype": "bfloat16", "device": "cuda"}})
    assert config_from_dict({"model": hf}).hash("cuda") == fp16.hash() != bf16.hash()


def test_an_output_labelled_before_a_label_fix_is_not_resumed_into_a_mix(tmp_path):
    """Fixes that change labels without a setting changing (Depth Pro's orientation, e2e-ft's
    normalisation) bump LABELS_VERSION, which is part of the settings: an output committed
    by the version before is refused, naming it, instead of being resumed into a mix of old
    and new labels; output.overwrite relabels it."""
    import json

    from depthray.config import LABELS_VERSION, ConfigError
    from depthray.job.checks import list_input_shards
    from depthray.job.driver import input_fingerprints, resume_shards

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(b"")
    data = {"input": {"url": f"{tmp_path}/in/", "format": "webdataset"}, "output": {"url": f"{tmp_path}/out"},
            "model": {"factory": "x:y"}}
    cfg = config_from_dict(data, require_io=True)
    before = {k: v for k, v in cfg.settings("cpu").items() if k != "labels"}
    assert cfg.settings("cpu")["labels"] == LABELS_VERSION >= 2
    (tmp_path / "out" / "_manifest").mkdir(parents=True)
    (tmp_path / "out" / "_manifest" / "a.json").write_text(json.dumps({
        "shard": "a", "status": "complete", "url": f"file://{tmp_path}/in/a.tar", "source_size": 0,
        "config_hash": "0123456789abcdef", "settings": before, "inputs": 0, "outputs": 0, "errors": 0,
        "parts": {}, "error_parts": {}}))
    shards = list_input_shards(cfg)
    with pytest.raises(ConfigError, match=f"labels: None -> {LABELS_VERSION}"):
        resume_shards(shards, cfg, input_fingerprints(shards, cfg.storage), "r1")
    cfg.output.overwrite = True
    assert [s.name for s in resume_shards(shards, cfg, input_fingerprints(shards, cfg.storage), "r2").todo] == ["a"]
