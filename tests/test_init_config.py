"""`depthray init` writes a config naming every key (#18 item 14), and `run --help` says so."""

from __future__ import annotations

import dataclasses

from depthray.cli import build_parser, main
from depthray.config import Config, load_config
from depthray.config_build import flatten


def test_init_writes_every_key_and_loads(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    assert main(["init", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 0
    text = path.read_text()
    cfg = load_config(path)  # valid as written, input and output required
    assert cfg.input.url == str(tmp_path / "in") and cfg.output.url == str(tmp_path / "out")
    assert cfg.to_dict() == {**Config().to_dict(), "input": {**dataclasses.asdict(Config().input), "url": cfg.input.url},
                             "output": {**dataclasses.asdict(Config().output), "url": cfg.output.url}}
    for key in flatten(Config().to_dict()):  # a section's keys indented, a top-level one (pipeline) not
        assert (f"  {key.rsplit('.', 1)[-1]}:" if "." in key else f"\n{key}:") in text, key
    assert "# glob, brace range" in text and "ambiguous_image" in text  # the meanings come along
    assert main(["init", str(path)]) == 2  # never overwrites


def test_run_help_says_where_keys_are_documented():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    assert "depthray init" in run.format_help() and "depthray/config.py" in run.format_help()
