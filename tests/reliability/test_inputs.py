"""Data as teams have it (#18), through real jobs (test-double model, real files): the right
image, the right key, the right orientation; column mistakes stop the job before Ray starts;
folders are cut into stable shards; `_errors/` always reads. What inputs become is the stage
chain's work, so those jobs run it locally; Ctrl-C and the quiet terminal are real Ray jobs."""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from depthray.io.records import ERRORS
from depthray.io.tar_samples import tar_bytes as tar_of
from depthray.job.driver import run_job
from depthray.job.ledger import summary_lines
from tests.reliability.conftest import (
    assert_exactly_once,
    double_model,
    enc,
    job_config,
    local_job_config,
    noise_rgb,
    read_outputs,
)

pytestmark = pytest.mark.timeout(300)

RNG = np.random.default_rng(18)

rgb = functools.partial(noise_rgb, RNG)  # rgb(h, w): noise images, this module's stream


def tar_members(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    out = {}
    for p in fs.glob(f"{root}/*.parts/*.tar"):  # a folder of parts per shard
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(p))) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def test_webdataset_passthrough_orientation_and_member_choice(tmp_path):
    """Items 1, 2, 12: the passthrough opens (with or without EXIF handling) in the depth's
    orientation; the photo is labelled, not the mask beside it; an ambiguous sample is an
    error row; `_errors/` reads as 0+ rows with the schema."""
    rotated = rgb(24, 40)
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed turned 90°: 40 high, 24 wide
    rotated_bytes = enc(rotated, "JPEG", exif=exif)
    plain_bytes = enc(rgb(24, 40), "JPEG")
    photo, mask = enc(rgb(16, 16), "JPEG"), enc(rgb(16, 16), "PNG")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "000.tar").write_bytes(tar_of([
        ("rot.jpg", rotated_bytes), ("plain.jpg", plain_bytes),
        ("left.seg.png", mask), ("left.jpg", photo), ("left.json", b"{}"),
        ("two.jpg", photo), ("two.png", mask),
    ]))
    out = tmp_path / "out"
    cfg = local_job_config(str(tmp_path / "in" / "*.tar"), str(out), double_model(),
                     output={"format": "webdataset", "include_image": True})
    summary = run_job(cfg)
    fs = fsspec.filesystem("file")
    outs, errors = read_outputs(fs, str(out), "webdataset")
    assert_exactly_once({"000": {"rot", "plain", "left", "two"}}, outs, errors)
    assert {e["key"]: e["error"] for e in errors} == {"two": "ambiguous_image"}
    members = tar_members(fs, str(out))
    depth = Image.open(io.BytesIO(members["rot.depth.png"]))
    raw = Image.open(io.BytesIO(members["rot.jpg"]))  # as a reader that ignores EXIF opens it
    assert depth.size == raw.size == (24, 40)
    assert raw.getexif().get(0x0112, 1) == 1
    assert members["plain.jpg"] == plain_bytes  # orientation 1: byte-identical
    assert members["left.jpg"] == photo and "left.png" not in members
    meta = json.loads(members["left.json"])
    assert meta["unlabelled_members"] == ["seg.png"] and meta["image_member"] == "jpg"
    assert summary["errors"] == 1
    # 2: the summary (returned, in _jobs/, printed) counts the mask left beside the chosen photo
    assert summary["image_members_unlabelled"] == {"seg.png": 1}
    assert json.loads(Path(summary["summary_path"]).read_text())["image_members_unlabelled"] == {"seg.png": 1}
    assert "1 image member(s) of WebDataset samples not labelled (1 .seg.png)" in "\n".join(summary_lines(summary))
    # 12: `_errors/` is there with its schema even where nothing failed (second output)
    cfg2 = local_job_config(str(tmp_path / "in" / "*.tar"), str(tmp_path / "out2"), double_model(),
                      input={"image_member": ["jpg"]})
    run_job(cfg2)
    table = pq.read_table(str(tmp_path / "out2" / "_errors"))
    assert table.num_rows == 0 and table.schema.names == ERRORS.names


def test_image_folder_shards_stable_and_skipped_counted(tmp_path):
    """Items 6, 7: shards of at most images_per_shard per folder, recursive, named from the
    root: an image added to the root later adds one shard and renames none (each key once);
    files that are not images are counted in the summary."""
    root = tmp_path / "photos"
    (root / "trip" / "day2").mkdir(parents=True)
    expected: dict[str, set[str]] = {}
    for i in range(5):
        (root / "trip" / f"p{i}.jpg").write_bytes(enc(rgb(16, 16), "JPEG"))
    (root / "trip" / "day2" / "q.png").write_bytes(enc(rgb(16, 16), "PNG"))
    (root / "trip" / "IMG_1.heic").write_bytes(b"not readable here")
    (root / "trip" / "notes.txt").write_text("x")
    expected = {"trip/chunk-00000": {"p0", "p1"}, "trip/chunk-00001": {"p2", "p3"},
                "trip/chunk-00002": {"p4"}, "trip/day2/chunk-00000": {"q"}}
    out = tmp_path / "out"
    cfg = local_job_config(str(root), str(out), double_model(), input={"images_per_shard": 2})
    first = run_job(cfg)
    assert first["input_files_skipped"] == {"heic": 1, "txt": 1}
    assert first["shards_complete"] == 4
    (root / "cover.jpg").write_bytes(enc(rgb(16, 16), "JPEG"))
    second = run_job(cfg)
    assert second["shards_skipped"] == 4 and second["shards_complete"] == 1
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once({**expected, "chunk-00000": {"cover"}}, outs, errors)


def test_parquet_keys_unique_across_files_and_kept_columns(tmp_path):
    """Items 4, 5: no key column -> the image struct's path, else "{shard}/{row}" (two files
    never collide); the source key/path and input.keep_columns ride along in every row."""
    (tmp_path / "in").mkdir()
    img = enc(rgb(16, 16), "PNG")
    for name in ("a", "b"):
        pq.write_table(pa.table({"image": [img, img], "caption": [f"{name} one", f"{name} two"]}),
                       tmp_path / "in" / f"{name}.parquet")
    hf = pa.table({"image": [{"bytes": img, "path": "imgs/cat.png"}, {"bytes": img, "path": "imgs/dog.png"}],
                   "caption": ["cat", "dog"]})
    pq.write_table(hf, tmp_path / "in" / "hf.parquet")
    out = tmp_path / "out"
    cfg = local_job_config(str(tmp_path / "in" / "*.parquet"), str(out), double_model(),
                     input={"keep_columns": ["caption"]})
    run_job(cfg)
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once({"a": {"a/00000000", "a/00000001"}, "b": {"b/00000000", "b/00000001"},
                         "hf": {"imgs/cat", "imgs/dog"}}, outs, errors)
    by_key = {r["key"]: r["meta"] for r in outs}
    assert by_key["b/00000001"]["columns"] == {"caption": "b two"} and by_key["b/00000001"]["source_row"] == 1
    assert by_key["imgs/dog"]["source_path"] == "imgs/dog.png" and by_key["imgs/dog"]["columns"]["caption"] == "dog"
    table = pq.read_table(str(out), columns=["key", "caption"])  # a real column, as plain pyarrow reads it
    assert dict(zip(table["key"].to_pylist(), table["caption"].to_pylist()))["a/00000001"] == "a two"
    wds_out = tmp_path / "wds"
    run_job(local_job_config(str(tmp_path / "in" / "*.parquet"), str(wds_out), double_model(),
                       input={"keep_columns": ["caption"]}, output={"format": "webdataset"}))
    outs, _ = read_outputs(fsspec.filesystem("file"), str(wds_out), "webdataset")
    assert {r["key"]: r["meta"]["columns"]["caption"] for r in outs}["imgs/cat"] == "cat"


def test_any_key_fits_a_webdataset_output(tmp_path):
    """#26 item 1: keys of 300 characters, unicode, and ones that fill ustar's 100-byte name
    field all end as samples a stock `webdataset` reader opens, each key exactly once (the
    job used to abort on the first long name, every shard unfinished, on every re-run)."""
    import webdataset as wds

    keys = ["k" * 300, "ünïcødé/ключ 图" * 8, "a" * 84, "short"]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"key": keys, "image": [enc(rgb(16, 16), "PNG") for _ in keys]}),
                   tmp_path / "in" / "long.parquet")
    out = tmp_path / "out"
    summary = run_job(local_job_config(str(tmp_path / "in" / "*.parquet"), str(out), double_model(),
                                       input={"key_column": "key"}, output={"format": "webdataset"}))
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (1, 4, 0), summary
    tars = sorted(str(p) for p in out.glob("*.parts/*.tar"))
    seen = [json.loads(sample["json"])["key"] for sample in wds.WebDataset(tars, shardshuffle=False)]
    assert sorted(seen) == sorted(keys)
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out), "webdataset")
    assert_exactly_once({"long": set(keys)}, outs, errors)


def test_a_run_whose_images_all_failed_is_not_a_success(tmp_path, capsys):
    """#26 item 8: through `depthray run`: every image an error row -> exit 4 naming the
    setting (was 0); `quality.max_error_fraction` fails a run at that fraction of errors;
    the error rows are committed either way, and a run that took no images is exit 0."""
    from depthray.cli import main as cli_main

    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"broken{i}.jpg").write_bytes(b"not an image")
    (tmp_path / "in" / "ok.jpg").write_bytes(enc(rgb(16, 16), "JPEG"))

    def run(out: str, *overrides: str) -> tuple[int, str]:
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"url": str(tmp_path / "in"), "images_per_shard": 8}, "output": {"url": str(tmp_path / out)},
            "model": double_model(), "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
            "compute": {"executor": "local"}}))
        capsys.readouterr()
        rc = cli_main(["run", str(config), *[a for o in overrides for a in ("--set", o)]])
        return rc, capsys.readouterr().err

    assert run("default")[0] == 0  # 2 of 3 failed: under the default (every image)
    rc, err = run("strict", "quality.max_error_fraction=0.5")
    assert rc == 4 and "2 of the 3 images" in err and "quality.max_error_fraction: 0.5" in err, err
    assert len(pq.read_table(tmp_path / "strict" / "_errors")) == 2  # committed all the same
    assert run("strict", "quality.max_error_fraction=0.5")[0] == 0  # nothing left to take: no errors now
    (tmp_path / "in" / "ok.jpg").unlink()
    rc, err = run("all-failed")
    assert rc == 4 and "2 of the 2 images" in err, err


def test_a_local_ray_without_a_cpu_for_its_tasks_is_refused_and_the_local_executor_runs(tmp_path):
    """#26 item 4: `depthray run --num-cpus 1` used to wait forever at "Starting execution"
    (the actor took the only CPU; read/decode/write tasks never ran). Through the real CLI:
    exit 2 within seconds naming the settings, no Ray started; with
    `compute.executor: local` the same machine runs the job."""
    import subprocess
    import sys

    from tests.reliability.conftest import REPO

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(enc(rgb(16, 16), "JPEG"))
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
        "model": double_model(), "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"num_cpus_per_actor": 0.5}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "depthray.cli", "run", str(config), "--num-cpus", "1", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    t0 = time.monotonic()
    refused = run()
    assert refused.returncode == 2 and time.monotonic() - t0 < 60, refused.stderr
    assert "compute.num_cpus_per_actor 0.5" in refused.stderr and "compute.executor: local" in refused.stderr
    assert "Starting execution" not in refused.stdout + refused.stderr
    assert not (tmp_path / "out" / "_manifest").exists()
    done = run("--set", "compute.executor=local")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "out" / "_manifest").glob("*.json"))) == 1


class _Served:
    """A folder served by a real `http.server` on a free 127.0.0.1 port (a new port per start)."""

    def __init__(self, folder: Path):
        import http.server
        import threading

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a: None
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_shards_are_named_by_path_and_a_changed_file_is_redone(tmp_path):
    """#26 items 2-3, through the job with a real HTTP server: a list file of HTTP shards
    names them by URL path, not host and port (`up/up/127.0.0.1_34429/...` before), so the
    same data from a restarted server on another port is the same shard: skipped, never
    labelled twice. A file replaced on the server (new size, new Last-Modified) is redone;
    its manifest had recorded size 0 and no ETag, so it counted as complete forever."""
    www = tmp_path / "www" / "data"
    www.mkdir(parents=True)
    expected = {}
    for s in range(2):
        (www / f"shard-{s}.tar").write_bytes(tar_of([(f"s{s}k{i}.jpg", enc(rgb(12, 16), "JPEG")) for i in range(2)]))
        expected[f"data/shard-{s}"] = {f"s{s}k{i}" for i in range(2)}
    listing = tmp_path / "shards.txt"
    out = tmp_path / "out"

    def run(served: _Served) -> dict:
        listing.write_text("".join(f"{served.url}/data/shard-{s}.tar\n" for s in range(2)))
        return run_job(local_job_config(str(listing), str(out), double_model()))

    first_server = _Served(tmp_path / "www")
    try:
        first = run(first_server)
    finally:
        first_server.stop()
    assert first["shards_complete"] == 2, first
    manifest = json.loads((out / "_manifest" / "data" / "shard-0.json").read_text())
    assert manifest["source_size"] == (www / "shard-0.tar").stat().st_size and manifest["source_etag"]
    second_server = _Served(tmp_path / "www")  # restarted: another port
    try:
        assert second_server.url != first_server.url
        again = run(second_server)
        assert (again["shards_skipped"], again["shards_complete"]) == (2, 0), again
        time.sleep(1.1)  # Last-Modified has one-second resolution
        (www / "shard-1.tar").write_bytes(tar_of([(f"s1k{i}.jpg", enc(rgb(12, 16), "JPEG")) for i in range(3)]))
        expected["data/shard-1"] = {f"s1k{i}" for i in range(3)}
        changed = run(second_server)
    finally:
        second_server.stop()
    assert (changed["shards_skipped"], changed["shards_complete"]) == (1, 1), changed
    assert "input changed" in changed["shards_redone"]["data/shard-1"], changed["shards_redone"]
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once(expected, outs, errors)


def test_gzipped_tar_shards_are_webdataset_shards(tmp_path):
    """#26 item 10: `.tar.gz` / `.tgz` shards were refused by `format: auto` ("cannot tell
    the format"); they are read as they stream, named without their extension."""
    import gzip

    (tmp_path / "in").mkdir()
    expected = {}
    for name in ("a.tar.gz", "b.tgz"):
        stem = name.split(".")[0]
        data = tar_of([(f"{stem}{i}.jpg", enc(rgb(12, 16), "JPEG")) for i in range(2)])
        (tmp_path / "in" / name).write_bytes(gzip.compress(data))
        expected[stem] = {f"{stem}{i}" for i in range(2)}
    out = tmp_path / "out"
    summary = run_job(local_job_config(str(tmp_path / "in"), str(out), double_model()))
    assert (summary["shards_complete"], summary["images"], summary["errors"]) == (2, 4, 0), summary
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once(expected, outs, errors)


def test_an_output_prefix_holding_other_files_is_warned_about(tmp_path, caplog):
    """#26 item 10: writing into a prefix that holds other files used to say nothing (and
    the documented `pq.read_table(output)` then fails on them): a warning names them, and
    a re-run's own parts, manifests and errors never count as foreign."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(enc(rgb(16, 16), "JPEG"))
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "notes.txt").write_text("someone else's")
    (out / "old" / "table.parquet").write_bytes(b"PAR1")
    cfg = local_job_config(str(tmp_path / "in"), str(out), double_model())
    with caplog.at_level(logging.WARNING, logger="depthray"):
        run_job(cfg)
    warned = [r.getMessage() for r in caplog.records if "did not write" in r.getMessage()]
    assert len(warned) == 1 and "2 file(s)" in warned[0] and "notes.txt" in warned[0], warned
    (out / "notes.txt").unlink()
    (out / "old" / "table.parquet").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="depthray"):
        cfg.output.overwrite = True  # a run that finds only its own files: parts, manifests, errors
        run_job(cfg)
    assert not [r for r in caplog.records if "did not write" in r.getMessage()]


def test_wrong_columns_stop_before_ray(tmp_path, capsys):
    """Item 3: a wrong image_column or a misspelt key_column is exit 2 naming the columns
    that exist, found while planning (seconds, no Ray, nothing written)."""
    from depthray.cli import main as cli_main

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"img": [b"x"], "id": ["k"]}), tmp_path / "in" / "a.parquet")
    for section, message in ((({"image_column": "image"}), "input.image_column 'image'"),
                             ({"image_column": "img", "key_column": "ID"}, "input.key_column 'ID'")):
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({
            "input": {"url": str(tmp_path / "in" / "*.parquet"), **section},
            "output": {"url": str(tmp_path / "out")},
            "model": double_model(),
        }))
        capsys.readouterr()
        start = time.monotonic()
        rc = cli_main(["run", str(config)])
        err = capsys.readouterr().err
        assert rc == 2 and time.monotonic() - start < 10
        assert message in err and "columns: img, id" in err, err
        assert not (tmp_path / "out" / "_manifest").exists()


@pytest.mark.parametrize("model, message", [
    ({"path": "/no/such/checkpoint"}, "model.path '/no/such/checkpoint': no such folder"),
    ({"path": "EMPTY_DIR"}, "without model_index.json"),
    ({"path": "not a hub id"}, "not a hub id"),
    ({"path": "nosuchproto://bucket/model"}, "not a usable URL"),
    ({"kind": "marigld"}, "model.kind: must be one of marigold, marigold-e2e, transformers, got 'marigld'"),
    ({"factory": "tests.reliability.nonexistent:make"}, "cannot import 'tests.reliability.nonexistent'"),
    ({"factory": "tests.reliability.doubles:nothing"}, "has no callable 'nothing'"),
])
def test_bad_model_spec_is_one_line_before_ray(tmp_path, capsys, model, message):
    """Item 8: a bad model.path / kind / factory is exit 2, one line, in seconds (it used
    to surface 40-57 s later from inside Ray, four tracebacks, advising a re-run)."""
    from depthray.cli import main as cli_main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "000.tar").write_bytes(tar_of([("a.jpg", enc(rgb(16, 16), "JPEG"))]))
    (tmp_path / "EMPTY_DIR").mkdir()
    model = {k: (str(tmp_path / v) if v == "EMPTY_DIR" else v) for k, v in model.items()}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"input": {"url": str(tmp_path / "in")}, "output": {"url": str(tmp_path / "out")},
                                      "model": model}))
    capsys.readouterr()
    start = time.monotonic()
    rc = cli_main(["run", str(config)])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - start < 15, err
    assert message in err and "Traceback" not in err and "re-run" not in err, err
    assert len([ln for ln in err.splitlines() if ln.startswith("depthray:")]) == 1


def test_missing_config_file_is_one_line(tmp_path, capsys):
    from depthray.cli import main as cli_main

    rc = cli_main(["run", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.yaml: cannot read the config file" in err and "Traceback" not in err


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_stops_cleanly_and_resumes(ray_session, tmp_path, signame, code):
    """Item 9 (#18), and #26 item 9 for SIGTERM (how Kubernetes and spot schedulers stop a
    pod; Ray's own handler exited 15 with no summary): the signal to a real `depthray run`
    on Ray: exit 130 / 143, a summary written, the lease released, the committed shard count
    and the advice to re-run printed; the re-run finishes each key once."""
    import os
    import signal
    import subprocess
    import sys

    from tests.reliability.conftest import REPO

    (tmp_path / "in").mkdir()
    expected = {}
    for s in range(24):
        (tmp_path / "in" / f"{s:03d}.tar").write_bytes(
            tar_of([(f"s{s}k{i}.jpg", enc(rgb(12, 16), "JPEG")) for i in range(2)]))
        expected[f"{s:03d}"] = {f"s{s}k{i}" for i in range(2)}
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "in" / "*.tar")}, "output": {"url": str(out)},
        "model": double_model(sleep_s=0.5), "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 2}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "run.log"
    import ray

    # On the suite's Ray, as a job submitted to a running cluster (no Ray start of its own)
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "depthray.cli", "run", str(config), "--address", address],
                            cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "Starting execution" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(3)  # mid-job: the model sleeps 0.5 s a call, 24 calls
        assert proc.poll() is None, log.read_text()
        proc.send_signal(getattr(signal, signame))
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == code, text
    assert "re-run the same command to resume" in text and "KeyboardInterrupt" not in text, text
    summaries = [json.loads(p.read_text()) for p in (out / "_jobs").glob("2*.json")]
    assert len(summaries) == 1 and summaries[0]["interrupted"] is True
    assert summaries[0]["interrupted_by"] == signame and not (out / "_jobs" / "lease.json").exists()
    committed = summaries[0]["shards_complete"]
    assert committed == len(list((out / "_manifest").glob("*.json")))  # the count is exact
    assert committed < 24 and f"interrupted: {committed} shard(s) committed" in text
    second = run_job(job_config(str(tmp_path / "in" / "*.tar"), str(out), double_model(sleep_s=0.5),
                                compute={"images_per_batch": 2}))
    assert second["shards_skipped"] >= committed
    outs, errors = read_outputs(fsspec.filesystem("file"), str(out))
    assert_exactly_once(expected, outs, errors)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with-block ends: connections are refused


@pytest.mark.parametrize("verb", ["run", "status"])
def test_unreachable_storage_fails_fast_naming_the_url(tmp_path, capsys, s3_bucket, verb):
    """Item 10: a refused endpoint (closed 127.0.0.1 port) and a missing bucket (moto) are
    named within 5 s, for run and status; status never lists a missing bucket's shards as to do."""
    from depthray.cli import main as cli_main

    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_bucket}/in/000.tar", tar_of([("a.jpg", enc(rgb(16, 16), "JPEG"))]))
    closed = f"http://127.0.0.1:{_closed_port()}"
    cases = [
        ({"input": {"url": f"s3://{s3_bucket}/in/*.tar"}, "output": {"url": f"s3://{s3_bucket}/out"},
          "storage": {"endpoint_url": closed}}, closed),
        ({"input": {"url": f"s3://no-such-bucket-{s3_bucket}/in/*.tar"}, "output": {"url": str(tmp_path / "out")}},
         f"no-such-bucket-{s3_bucket}"),
        ({"input": {"url": f"s3://{s3_bucket}/in/*.tar"}, "output": {"url": f"s3://gone-{s3_bucket}/out"}},
         f"gone-{s3_bucket}"),
    ]
    for data, named in cases:
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump({**data, "model": double_model()}))
        capsys.readouterr()
        start = time.monotonic()
        rc = cli_main([verb, str(config)])
        took = time.monotonic() - start
        captured = capsys.readouterr()
        assert rc == 2 and took < 5, (took, captured)
        assert named in captured.err and "Traceback" not in captured.err, captured.err
        assert "to do" not in captured.out


def test_run_is_quiet_by_default(tmp_path):
    """Item 14: a real `depthray run` with one image the model fails on and one unreadable
    file: no Ray warnings, worker output or tracebacks on the terminal, each failure counted
    once in the summary, and no progress line guesses the time left before a shard finished."""
    import re
    import subprocess
    import sys

    from tests.reliability.conftest import REPO

    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"p{i}.jpg").write_bytes(enc(rgb(16, 16), "JPEG"))
    (tmp_path / "in" / "black.png").write_bytes(enc(Image.new("RGB", (16, 16)), "PNG"))  # NaN depth
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "in"), "images_per_shard": 2}, "output": {"url": str(tmp_path / "out")},
        "model": double_model(nan_if_black=True), "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
        "compute": {"images_per_batch": 4}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_BACKEND_LOG_LEVEL", None)
    out = subprocess.run([sys.executable, "-m", "depthray.cli", "run", str(config), "--num-cpus", "2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "infer:non_finite': 1" in text and "decode:not_an_image': 1" in text, text  # each failure once
    assert not re.search(r"(WARNING|INFO) \S+\.py:\d+ -- ", text), text  # Ray's own log format
    for noise in ("Traceback", "core_worker.cc", "pid=", "retrying one image at a time"):
        assert noise not in text, text
    progress = [line for line in text.splitlines() if "progress: " in line]
    assert progress and not [line for line in progress if "progress: 0/" in line and "left" in line], progress
    help_text = subprocess.run([sys.executable, "-m", "depthray.cli", "run", "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--verbose" in help_text


def test_verbose_run_keeps_rays_own_output(monkeypatch):
    """Item 14: `depthray run --verbose` (or `depthray -v run`) starts Ray as before: worker
    output streamed here, Ray's warnings shown, its C++ log level untouched."""
    import ray

    from depthray.cli import build_parser
    from depthray.job.driver import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_BACKEND_LOG_LEVEL", raising=False)
    init_ray(num_cpus=2, quiet=False)
    assert calls[-1]["log_to_driver"] is True and calls[-1]["logging_level"] == logging.WARNING
    assert "RAY_BACKEND_LOG_LEVEL" not in os.environ
    init_ray(num_cpus=2, quiet=True)
    assert calls[-1]["log_to_driver"] is False and calls[-1]["logging_level"] == logging.ERROR
    assert os.environ["RAY_BACKEND_LOG_LEVEL"] == "fatal"
    # A local Ray starts without the dashboard unless compute.dashboard asks for it (#25):
    # its processes took a core for ~10 s of every start on a 2-core machine.
    assert all(c["include_dashboard"] is False for c in calls)
    init_ray(num_cpus=2, dashboard=True)
    assert calls[-1]["include_dashboard"] is True
    parse = build_parser().parse_args
    assert parse(["run", "job.yaml", "--verbose"]).ray_logs and parse(["-v", "run", "job.yaml"]).verbose
    assert not parse(["run", "job.yaml"]).ray_logs
