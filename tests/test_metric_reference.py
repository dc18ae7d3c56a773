"""pipelines/metric_depth.py with a metric depth model as the reference (`metric.reference_model`,
#29): the infer actor runs the model on each image, the metric stage aligns the relative label
to its map (docs/metric.md).

References are upstream's own: the map the job computes is what transformers'
`pipeline("depth-estimation", model=folder)` returns for the same image (its
`predicted_depth`, post-processed to the image size), and for Depth Pro, whose transformers
processor needs torchvision (no build for this CPU torch), the authors' inference
(apple/ml-depth-pro, as tests/conformance/test_transformers.py writes it out) around
transformers' network. Checkpoints: tiny random-weight ones built with transformers' config
classes (depthray/models/hf_tiny.py). ZoeDepth's post-processing needs torchvision too: it is
accepted as a metric family but not run here.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from depthray.cli import main
from depthray.config import config_from_dict
from depthray.io import records
from depthray.io.codecs import decode_depth_png16
from depthray.io.metric_labels import decode_metric_png16
from depthray.io.metric_reference import align_reference_batch
from depthray.io.tar_samples import tar_bytes
from depthray.metric_align import align_to_reference
from depthray.metric_config import MetricConfig
from depthray.models import hf_tiny
from depthray.models.hf_metric import MetricReference
from depthray.samples import make_scene
from tests.conformance.test_transformers import authors_depth_pro

# (key, height, width): sizes the processors treat differently (landscape, portrait, odd)
IMAGES = [("yard1", 96, 128), ("street2", 75, 113), ("indoor3", 128, 96)]
DOUBLE = {"factory": "tests.reliability.doubles:make_log_depth"}  # relative labels (a test double)


def scene_png(key: str, h: int, w: int) -> bytes:
    family, seed = key.rstrip("0123456789"), int(key[-1])
    buf = io.BytesIO()
    Image.fromarray(make_scene(h, w, seed=seed, family=family)[0]).save(buf, format="PNG")
    return buf.getvalue()


def rgb(data: bytes) -> np.ndarray:
    """The image as the job decodes it."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch
    from transformers import AutoModelForDepthEstimation

    root = tmp_path_factory.mktemp("metric-ref")
    found = {"da_metric": hf_tiny.build_tiny_depth_anything(root / "da-metric", seed=1, metric=True),
             "depth_pro": hf_tiny.build_tiny_depth_pro(root / "depth-pro"),
             "da_relative": hf_tiny.build_tiny_depth_anything(root / "da-relative"),
             "dpt": hf_tiny.build_tiny_dpt(root / "dpt")}
    # Depth Pro without its field-of-view head: only its config is read before Ray
    no_fov = root / "depth-pro-no-fov"
    shutil.copytree(found["depth_pro"], no_fov)
    config = json.loads((no_fov / "config.json").read_text())
    (no_fov / "config.json").write_text(json.dumps({**config, "use_fov_model": False}))
    found["depth_pro_no_fov"] = no_fov
    # A metric model whose map holds no positive depth anywhere: sigmoid(-1e4) = 0 exactly
    dead = root / "da-dead"
    net = AutoModelForDepthEstimation.from_pretrained(found["da_metric"])
    with torch.no_grad():
        net.head.conv3.weight.zero_()
        net.head.conv3.bias.fill_(-1e4)
    net.save_pretrained(dead)
    shutil.copy(found["da_metric"] / "preprocessor_config.json", dead)
    found["dead"] = dead
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metric-ref-in")
    images = {key: scene_png(key, h, w) for key, h, w in IMAGES}
    (folder / "00000.tar").write_bytes(tar_bytes([(f"{k}.png", data) for k, data in images.items()]))
    return folder, images


def job(tmp, name: str, inputs, reference, executor: str = "local", model=None, **metric) -> str:
    config = {"input": {"url": str(inputs[0] / "*.tar")}, "output": {"url": str(tmp / name)},
              "model": model or DOUBLE, "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
              "compute": {"images_per_batch": 2, "executor": executor, "num_actors": 1},
              "metric": {"reference_model": str(reference) if reference else None, **metric}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def transformers_reference(folder) -> callable:
    """transformers' depth-estimation pipeline, as its users call it: image -> metres."""
    from transformers import pipeline

    pipe = pipeline("depth-estimation", model=str(folder))
    return lambda image: pipe(Image.fromarray(image))["predicted_depth"].float().numpy()


def assert_rows_are_the_fit_to(rows: dict, images: dict, reference, path) -> dict:
    """Each row's metric map and fit = align_to_reference(its stored label, its space,
    `reference(image)`), computed here; returns {key: meta.metric}."""
    metas = {}
    for key, row in rows.items():
        meta = json.loads(row["meta"])
        got = meta["metric"]
        assert got["source"] == "model" and got["reference_model"] == str(path) and got["unit"] == "m", got
        label = decode_depth_png16(row["depth"]).astype(np.float64)
        fit = align_to_reference(label, meta["output_space"], reference(rgb(images[key])), None,
                                 **MetricConfig().align_options())
        want = fit.to_meta()
        # The job's map is the pipeline's to float32 rounding (another process, other thread
        # counts reorder the network's sums), so the fit on the same seeded pixels agrees far
        # below 1e-4; a wrong space, sample or map moves it by percent.
        for k in ("points_total", "points_dropped", "points_used", "points_held_out", "verdict", "reasons"):
            assert got[k] == want[k], (key, k, got[k], want[k])
        for k in ("scale", "shift", "abs_rel", "delta1", "inlier_fraction", "coverage", "sigma"):
            assert (got[k] is None) == (want[k] is None), (key, k)
            if want[k] is not None:
                assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-9), (key, k)
        metric, expected = decode_metric_png16(row["metric_depth"]), fit.apply(label)
        stored = np.isfinite(expected) & (expected > 0)
        assert np.array_equal(np.isfinite(metric), stored), key
        # the PNG holds metres / png_scale in 16 bits: half a step of rounding, and 1e-4 of fit
        step = got["png_scale"] / 65535
        assert np.allclose(metric[stored], expected[stored], rtol=1e-4, atol=step), key
        metas[key] = got
    return metas


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, inputs, checkpoints, ray_session):
    """The model path on local Ray: relative labels from the test double, the tiny metric
    Depth Anything as the reference."""
    tmp = tmp_path_factory.mktemp("metric-ref-ray")
    code = main(["run", job(tmp, "out", inputs, checkpoints["da_metric"], executor="ray"), "--pipeline", "metric_depth"])
    return tmp, code, {r["key"]: r for r in pq.read_table(tmp / "out").to_pylist()}


@pytest.mark.parametrize("key,h,w", IMAGES, ids=[k for k, _, _ in IMAGES])
def test_depth_anything_metric_reference_is_the_transformers_pipeline(key, h, w, checkpoints, inputs):
    image = rgb(inputs[1][key])
    ours = MetricReference.from_pretrained(checkpoints["da_metric"], device="cpu")(image)
    theirs = transformers_reference(checkpoints["da_metric"])(image)
    assert ours.shape == theirs.shape == (h, w) and ours.dtype == np.float32
    # the same processor, network and post-processing in one process: equal to float32
    # rounding; a swapped resize kernel or target size moves these depths by > 1 %
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key,h,w", IMAGES, ids=[k for k, _, _ in IMAGES])
def test_depth_pro_reference_is_the_authors_inference(key, h, w, checkpoints, inputs):
    image = rgb(inputs[1][key])
    model = MetricReference.from_pretrained(checkpoints["depth_pro"], device="cpu")
    ours = model(image)
    pre = json.loads((checkpoints["depth_pro"] / "preprocessor_config.json").read_text())
    theirs = authors_depth_pro(model.net, image, (pre["size"]["height"], pre["size"]["width"]))
    assert ours.shape == theirs.shape == (h, w)
    # the same float32 operations, the normalisation's multiply-adds in another order (an ulp
    # of the network input) carried through the network; no W/f scaling, or a bicubic
    # resize, moves these depths by > 1 %
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_the_job_on_ray_aligns_each_label_to_the_pipeline_s_metric_map(ray_run, inputs, checkpoints):
    _, code, rows = ray_run
    assert code == 0 and set(rows) == {k for k, _, _ in IMAGES}
    metas = assert_rows_are_the_fit_to(rows, inputs[1], transformers_reference(checkpoints["da_metric"]),
                                       checkpoints["da_metric"])
    assert all(m["points_used"] > 1000 for m in metas.values())  # a dense fit: thousands of pixels
    assert "reference_f32" not in pq.read_table(ray_run[0] / "out").column_names  # it stays inside the job


def test_a_label_from_the_reference_itself_gets_its_metres_back(tmp_path, inputs, checkpoints):
    """The relative label made by the metric model itself (kind transformers, min-max
    normalised depth): an affine map of the reference, so the fit is ok and the metric map
    is the reference's metres (local executor)."""
    model = {"kind": "transformers", "path": str(checkpoints["da_metric"]), "device": "cpu"}
    path = job(tmp_path, "self", inputs, checkpoints["da_metric"], model=model)
    assert main(["run", path, "--pipeline", "metric_depth"]) == 0
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "self").to_pylist()}
    reference = transformers_reference(checkpoints["da_metric"])
    metas = assert_rows_are_the_fit_to(rows, inputs[1], reference, checkpoints["da_metric"])
    for key, meta in metas.items():
        assert meta["verdict"] == "ok", (key, meta["reasons"])
        truth = reference(rgb(inputs[1][key]))
        metric = decode_metric_png16(rows[key]["metric_depth"])
        ok = np.isfinite(metric) & (truth > 0)
        # depthray's views resample in float, the processor in uint8 (~1 grey level,
        # tests/conformance/test_transformers.py), and the label is stored in 16 bits
        assert np.median(np.abs(metric[ok] / truth[ok] - 1)) < 0.01, key


def test_a_disparity_label_from_a_relative_model_is_fitted_in_inverse_depth(tmp_path, inputs, checkpoints):
    """Detail from a relative model (Depth Anything relative: disparity labels), scale from
    the metric one: the fit is made in the label's space, 1/metric = s * label + t."""
    model = {"kind": "transformers", "path": str(checkpoints["da_relative"]), "device": "cpu"}
    assert main(["run", job(tmp_path, "disp", inputs, checkpoints["da_metric"], model=model), "--pipeline",
                 "metric_depth"]) == 0
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "disp").to_pylist()}
    metas = assert_rows_are_the_fit_to(rows, inputs[1], transformers_reference(checkpoints["da_metric"]),
                                       checkpoints["da_metric"])
    assert {m["space"] for m in metas.values()} == {"disparity"}


def test_the_job_with_depth_pro_aligns_to_the_authors_metres(tmp_path, inputs, checkpoints):
    path = job(tmp_path, "pro", inputs, checkpoints["depth_pro"])
    assert main(["run", path, "--pipeline", "metric_depth"]) == 0
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "pro").to_pylist()}
    net = MetricReference.from_pretrained(checkpoints["depth_pro"], device="cpu").net
    assert_rows_are_the_fit_to(rows, inputs[1], lambda image: authors_depth_pro(net, image, (128, 128)),
                               checkpoints["depth_pro"])


def test_a_reference_without_positive_depth_gives_low_confidence_rows_without_metres(tmp_path, inputs, checkpoints):
    path = job(tmp_path, "dead", inputs, checkpoints["dead"])
    assert main(["run", path, "--pipeline", "metric_depth"]) == 0
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "dead").to_pylist()}
    assert set(rows) == {k for k, _, _ in IMAGES}
    for key, row in rows.items():
        meta = json.loads(row["meta"])["metric"]
        assert meta["verdict"] == "low_confidence" and meta["scale"] is None, meta
        n = row["height"] * row["width"]
        assert meta["reasons"][0].startswith(f"{n} of {n} points dropped (100%: non-finite or <= 0 depth")
        assert any(r.startswith("0 valid points") for r in meta["reasons"]), meta["reasons"]
        assert meta["points_dropped"] == meta["points_total"] == row["height"] * row["width"]
        assert np.isnan(decode_metric_png16(row["metric_depth"])).all()  # no metres at all


def test_an_image_the_reference_fails_on_is_an_error_row(checkpoints, inputs):
    """One image on which the reference model raises: that image is an `infer` error row
    (`reference`), its neighbours are labelled with their reference maps."""
    from depthray.job.predictor import DepthPredictor

    full = config_from_dict({"model": DOUBLE, "inference": {"ensemble_size": 1, "tiling": {"mode": "off"}},
                             "pipeline": "metric_depth", "metric": {"reference_model": str(checkpoints["da_metric"])}})
    cfg = full.metric
    predictor = DepthPredictor(full.model, full.inference, full.storage, reference=cfg)
    real = predictor.reference

    class FailsOnPortraits:  # failure injection around the real model
        name = real.name

        def __call__(self, image):
            if image.shape[0] > image.shape[1]:
                raise RuntimeError("injected failure")
            return real(image)

    predictor.reference = FailsOnPortraits()
    rows = []
    for key, h, w in IMAGES:
        rows.append({"source": "00000.tar", "key": key, "pixels": rgb(inputs[1][key]).tobytes(), "height": h,
                     "width": w})
    out = {r["key"]: r for r in predictor(records.to_table(rows, records.DECODED)).to_pylist()}
    bad = out["indoor3"]
    assert (bad["stage"], bad["error"]) == ("infer", "reference") and bad["depth_f32"] is None
    assert "injected failure" in bad["message"] and str(checkpoints["da_metric"]) in bad["message"]
    for key, h, w in IMAGES[:2]:
        assert out[key]["error"] is None
        assert np.array_equal(np.frombuffer(out[key]["reference_f32"], np.float32).reshape(h, w),
                              real(rgb(inputs[1][key])))
    aligned = {r["key"]: r for r in align_reference_batch(records.to_table(list(out.values()), records.PREDICTED),
                                                         cfg).to_pylist()}
    assert aligned["indoor3"]["error"] == "reference" and aligned["indoor3"]["metric_depth"] is None
    assert all(aligned[k]["metric_depth"] is not None and aligned[k]["reference_f32"] is None for k in ("yard1", "street2"))
    # a labelled row that reaches the metric stage without its map is an error row too
    lost = dict(out["yard1"], reference_f32=None)
    row = align_reference_batch(records.to_table([lost], records.PREDICTED), cfg).to_pylist()[0]
    assert (row["stage"], row["error"]) == ("metric", "no_reference")


@pytest.mark.parametrize("which,message", [
    ("da_relative", "depth_estimation_type 'relative' is not a metric depth model"),
    ("dpt", "'dpt' is not a metric depth model"),
    ("depth_pro_no_fov", "without its field-of-view head"),
])
def test_a_relative_reference_is_refused_before_the_job(which, message, tmp_path, inputs, checkpoints, capsys):
    path = job(tmp_path, "refused", inputs, checkpoints[which], executor="ray")
    assert main(["run", path, "--pipeline", "metric_depth"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(checkpoints[which]) in err
    assert not (tmp_path / "refused").exists()  # nothing written: refused before the output is leased


def test_one_source_exactly_and_its_settings_in_the_metric_task_s_hash(tmp_path, inputs, checkpoints, capsys):
    both = job(tmp_path, "both", inputs, checkpoints["da_metric"], member="lidar.png")
    assert main(["run", both, "--pipeline", "metric_depth"]) == 2
    assert "set one" in capsys.readouterr().err
    neither = job(tmp_path, "neither", inputs, None)
    assert main(["run", neither, "--pipeline", "metric_depth"]) == 2
    assert "metric.reference_model" in capsys.readouterr().err
    assert main(["run", job(tmp_path, "missing", inputs, tmp_path / "nowhere"), "--pipeline", "metric_depth"]) == 2
    assert "no such folder" in capsys.readouterr().err

    def hash_of(pipeline="metric_depth", **metric):
        return config_from_dict({"pipeline": pipeline, "metric": metric}).hash("cpu")

    da, pro = str(checkpoints["da_metric"]), str(checkpoints["depth_pro"])
    assert len({hash_of(reference_model=da), hash_of(reference_model=pro),
                hash_of(reference_model=da, reference_dtype="bfloat16"), hash_of(member="lidar.png")}) == 4
    assert hash_of(reference_model=da) == hash_of(reference_model=da, reference_dtype="float32")  # auto on CPU
    assert hash_of("depth", reference_model=da) == hash_of("depth")  # the plain task ignores it
    settings = config_from_dict({"pipeline": "metric_depth", "metric": {"member": "lidar.png"}}).settings("cpu")
    assert not any(k.startswith("metric.reference") for k in settings)  # LiDAR labels keep their hash


def test_zoedepth_is_a_metric_family_and_without_torchvision_says_what_it_needs(tmp_path):
    """ZoeDepth passes the check before Ray (its output is metres); its post-processing in
    transformers needs torchvision, and without it the reference refuses to load, naming it,
    before any weight loads (only its config is written here)."""
    from transformers import ZoeDepthConfig
    from transformers.utils import is_torchvision_available

    from depthray.job.checks import reference_problem

    ZoeDepthConfig().to_json_file(tmp_path / "config.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ZoeDepthImageProcessor"}))
    assert reference_problem(str(tmp_path)) is None
    if is_torchvision_available():
        pytest.skip("torchvision is installed: ZoeDepth's post-processing can run")
    with pytest.raises(ImportError, match="ZoeDepth's post-processing in transformers needs torchvision"):
        MetricReference.from_pretrained(tmp_path, device="cpu")
