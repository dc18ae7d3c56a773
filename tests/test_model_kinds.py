"""The model kinds a labelling team picks in 2026 (docs/models.md), each built offline in its
published layout with random weights: transformers depth models (Depth Anything layout),
end-to-end fine-tuned single-step Marigold, and the augmentation ensembles that give these
deterministic models an uncertainty. Each kind also runs through the real job on local Ray."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from depthray import augment
from depthray.config import ConfigError, config_from_dict
from depthray.models.loading import load_model
from depthray.predict import predict_image

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny_da_dir(tmp_path_factory):
    from depthray.models.hf_depth import build_tiny_depth_anything

    return build_tiny_depth_anything(tmp_path_factory.mktemp("hf") / "tiny-depth-anything")


@pytest.fixture(scope="module")
def tiny_e2e_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Marigold checkpoint under the published e2e-ft name (same layout)."""
    out = tmp_path_factory.mktemp("e2e") / "marigold-e2e-ft-depth"
    shutil.copytree(tiny_model_dir, out)
    return out


def _scene(h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- transformers backend
def test_transformers_model_declares_disparity_and_keeps_the_interface(tiny_da_dir):
    from transformers import pipeline
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    model = load_model({"kind": "transformers", "path": str(tiny_da_dir), "device": "cpu"})
    assert type(model).__name__ == "TransformersDepthModel"
    assert model.output_space == "disparity" and model.deterministic
    # DPT's rule: the width's scale (56/60) is nearer 1 than the height's, multiples of 14
    assert model.processing_resolution == 56 and model.view_size(40, 60) == (42, 56)
    views = torch.randint(0, 256, (3, 3, 40, 60)).float() / 255  # exact uint8 images for upstream
    out = model(views, [0, 1, 2])
    assert out.shape == (3, 40, 60) and out.dtype == torch.float32
    # Each member is min-max normalised (then clamped, so only the span can fail): it spans [0,1].
    torch.testing.assert_close(out.amin(dim=(1, 2)), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.amax(dim=(1, 2)), torch.ones(3), atol=1e-6, rtol=0)
    assert torch.allclose(model(views[:1], [7])[0], out[0], atol=1e-5)  # seeds change nothing
    # A view handed over as it is, against transformers' own pipeline on the same pixels as an
    # image (DPT's PIL processor: torchvision has no build here; tests/conformance has the rest)
    pipe = pipeline("depth-estimation", model=str(tiny_da_dir),
                    image_processor=DPTImageProcessorPil.from_pretrained(tiny_da_dir))
    seen = []
    for net in (pipe.model, model.net):
        net.register_forward_pre_hook(lambda _m, _a, kw: seen.append(tuple(kw["pixel_values"].shape)), with_kwargs=True)
    image = (views[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    ref = pipe(Image.fromarray(image))["predicted_depth"].flatten().double()
    mine = model(views[:1], [0])[0].flatten().double()
    assert seen == [(1, 3, 42, 56), (1, 3, 42, 56)]  # upstream's input size, then depthray's
    # relative disparity both: a positive least-squares fit at issue #23's bound (0.99)
    assert torch.corrcoef(torch.stack([mine, ref]))[0, 1] >= 0.99


def test_transformers_output_space_must_be_known(tiny_da_dir, tmp_path):
    from depthray.models.hf_depth import checkpoint_output_space

    class Cfg:
        model_type = "some_new_net"

    with pytest.raises(ValueError, match="output_space"):
        checkpoint_output_space(Cfg())
    assert checkpoint_output_space(Cfg(), "depth") == "depth"
    Cfg.model_type = "depth_pro"  # its network predicts inverse depth, kept as such
    assert checkpoint_output_space(Cfg()) == "disparity"
    for refused in ("zoedepth", "glpn"):
        Cfg.model_type = refused
        with pytest.raises(ValueError, match="not supported"):
            checkpoint_output_space(Cfg(), "depth")
    # a declaration may confirm a known family's space, never invert it
    model = load_model({"kind": "transformers", "path": str(tiny_da_dir), "device": "cpu",
                        "options": {"output_space": "disparity"}})
    assert model.output_space == "disparity"
    with pytest.raises(ValueError, match="contradicts"):
        load_model({"kind": "transformers", "path": str(tiny_da_dir), "device": "cpu",
                    "options": {"output_space": "depth"}})
    with pytest.raises(ConfigError, match="output_space"):
        config_from_dict({"model": {"kind": "transformers", "options": {"output_space": "inverse"}}})
    with pytest.raises(ConfigError, match="model.kind"):
        config_from_dict({"model": {"kind": "depth-anything"}})
    (tmp_path / "nopre").mkdir()
    shutil.copy(tiny_da_dir / "config.json", tmp_path / "nopre")
    with pytest.raises(FileNotFoundError, match="preprocessor_config"):
        load_model({"kind": "transformers", "path": str(tmp_path / "nopre"), "device": "cpu"})


@pytest.mark.parametrize("kind", ["transformers", "marigold", "marigold-e2e"])
def test_auto_dtype_on_a_gpu_is_what_the_rows_record(kind, tiny_da_dir, tiny_model_dir, tiny_e2e_dir, monkeypatch):
    """Without a GPU: the loader is told its device is CUDA and stopped when it asks for the
    network's weights; the dtype it asked for is the one `Config.settings("cuda")` records
    (the config hash and manifests of a GPU job)."""
    import diffusers
    import transformers

    from depthray.models import hf_depth, marigold

    class Asked(Exception):
        pass

    def stop(*_args, **kwargs):
        raise Asked(str(kwargs.get("dtype") or kwargs.get("torch_dtype")).removeprefix("torch."))

    if kind == "transformers":
        monkeypatch.setattr(hf_depth, "resolve_device", lambda _device: torch.device("cuda"))
        monkeypatch.setattr(transformers.AutoModelForDepthEstimation, "from_pretrained", staticmethod(stop))
        folder = tiny_da_dir
    else:
        monkeypatch.setattr(marigold, "pick_device", lambda _device: torch.device("cuda"))
        monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", staticmethod(stop))
        folder = tiny_e2e_dir if kind == "marigold-e2e" else tiny_model_dir
    with pytest.raises(Asked) as asked:
        load_model({"kind": kind, "path": str(folder)})
    recorded = config_from_dict({"model": {"kind": kind, "path": str(folder)}}).settings("cuda")
    assert str(asked.value) == recorded["model.dtype"] == {"transformers": "float16", "marigold": "bfloat16",
                                                                      "marigold-e2e": "bfloat16"}[kind]
    assert recorded["model.device"] == "cuda"


@pytest.mark.parametrize("kind", ["transformers", "marigold", "marigold-e2e"])
def test_each_kind_on_the_cpu_records_what_its_loaded_model_runs(kind, tiny_da_dir, tiny_model_dir, tiny_e2e_dir):
    """#27: one home per model kind. On the CPU each kind is really loaded with `dtype: auto`;
    the dtype and steps the model runs are what `Config.settings("cpu")` records and what
    `depthray plan` counts (models/kinds.py answers all three)."""
    from depthray.models.kinds import KINDS
    from depthray.plan import model_settings

    folder = {"transformers": tiny_da_dir, "marigold": tiny_model_dir, "marigold-e2e": tiny_e2e_dir}[kind]
    cfg = config_from_dict({"model": {"kind": kind, "path": str(folder), "device": "cpu"}})
    model = load_model(cfg.model)
    assert type(model).kind is KINDS[kind]
    assert str(model.dtype).removeprefix("torch.") == cfg.settings("cpu")["model.dtype"] == "float32"
    network = model.net if kind == "transformers" else model.unet  # one call per step (or forward)
    calls = []
    network.register_forward_hook(lambda *_: calls.append(1))
    r = model.processing_resolution
    model(torch.rand(1, 3, r, r), [0])  # one view, the model's default steps
    assert model_settings(cfg)[:2] == (r, len(calls))


def test_deterministic_models_ensemble_over_augmentations(tiny_da_dir):
    model = load_model({"kind": "transformers", "path": str(tiny_da_dir), "device": "cpu"})
    one = predict_image(_scene(), model, {"ensemble_size": 1})
    three = predict_image(_scene(), model, {"ensemble_size": 3})
    assert one.output_space == three.output_space == "disparity"
    assert one.members == "seeds" and three.members == "augmentations"
    assert float(one.uncertainty.max()) == 0.0  # one member: no spread
    assert float(three.uncertainty.mean()) > 0.0  # augmentations differ, so members do
    assert three.depth.shape == (40, 60)


def test_augmentations_are_undone():
    ramp = torch.linspace(0, 1, 64)[None, None, :].expand(1, 48, 64).contiguous()  # [1,h,w]
    view = ramp[:, None].expand(1, 3, 48, 64)
    for m in range(10):
        aug = augment.augmentation(m)
        assert aug == augment.Augmentation() if m == 0 else aug != augment.Augmentation()
        seen = augment.apply(view, aug)
        assert seen.shape == view.shape
        back = augment.undo(seen[:, 0], aug)  # a model that returns its input
        assert torch.allclose(back[:, 2:-2, 2:-2], ramp[:, 2:-2, 2:-2], atol=0.03), m
    assert len({augment.augmentation(m) for m in range(16)}) == 16


# ---------------------------------------------------------------- end-to-end Marigold
def test_e2e_checkpoint_is_recognised_and_runs_single_step_zero_noise(tiny_e2e_dir, tiny_model_dir):
    from diffusers import DDIMScheduler

    from depthray.models.marigold_e2e import MarigoldE2EModel, is_end_to_end

    assert is_end_to_end("GonzaloMG/marigold-e2e-ft-depth") and not is_end_to_end(str(tiny_model_dir), tiny_model_dir)
    model = load_model({"path": str(tiny_e2e_dir), "device": "cpu"})  # kind marigold, recognised by name
    assert isinstance(model, MarigoldE2EModel) and model.deterministic and model.timestep == 999
    forced = load_model({"kind": "marigold-e2e", "path": str(tiny_model_dir), "device": "cpu"})
    assert isinstance(forced, MarigoldE2EModel)
    views = torch.rand(2, 3, 32, 48)
    a, b = model(views, [0, 1]), model(views, [5, 9])
    assert torch.equal(a, b)  # zero noise: seeds change nothing
    # The authors' pipeline: the checkpoint's DDIM scheduler, one step (t=999) from a zero latent
    latent = model.encode(model.preprocess(views)[0])
    sched = DDIMScheduler.from_pretrained(tiny_e2e_dir, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction"
    zeros = torch.zeros_like(latent)
    text = model.empty_text_embedding.expand(2, -1, -1)
    pred = model.unet(torch.cat([latent, zeros], 1), 999, encoder_hidden_states=text).sample
    sched.set_timesteps(1)
    assert int(sched.timesteps[0]) == 999
    x0 = sched.step(pred, 999, zeros).prev_sample
    assert torch.allclose(model.denoise(latent, torch.randn_like(latent), [0, 1]), x0, atol=1e-5)
    assert x0.abs().max() > 1e-3  # a real latent, not the zero start
    # ... and not what a noisy DDIM Marigold would make of the same checkpoint
    plain = load_model({"path": str(tiny_model_dir), "device": "cpu"})
    assert not torch.allclose(plain(views, [0, 1]), a, atol=1e-4)
    with pytest.raises(ValueError, match="single-step"):
        model(views, [0, 1], num_inference_steps=4)


# ---------------------------------------------------------------- through the real job
def _photos(root):
    (root / "a").mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 60), (48, 48), (36, 70)]):
        Image.fromarray(_scene(h, w, i)).save(root / "a" / f"img{i}.png")
    return root


# transformers through the Ray job (its library loads in the actor's process); e2e-ft as the
# same stage chain in this process: what the rows hold is the stages' work, not Ray's.
@pytest.mark.parametrize("kind,executor", [("transformers", "ray"), ("marigold-e2e", "local")])
def test_model_kinds_run_through_the_job(kind, executor, request, tmp_path, tiny_da_dir, tiny_e2e_dir):
    from depthray.io.codecs import decode_depth_png16, decode_uncertainty_png16
    from depthray.job.driver import run_job

    if executor == "ray":
        request.getfixturevalue("ray_session")
    path = tiny_da_dir if kind == "transformers" else tiny_e2e_dir
    cfg = config_from_dict({
        "input": {"url": str(_photos(tmp_path / "photos"))}, "output": {"url": str(tmp_path / "out")},
        "model": {"kind": kind, "path": str(path), "processing_resolution": 56 if kind == "transformers" else 64},
        "inference": {"ensemble_size": 3}, "compute": {"images_per_batch": 2, "executor": executor},
    }, require_io=True)
    summary = run_job(cfg)
    assert (summary["images"], summary["errors"]) == (3, 0)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["key"] for r in rows) == ["img0", "img1", "img2"]
    for r in rows:
        meta = json.loads(r["meta"])
        assert meta["output_space"] == ("disparity" if kind == "transformers" else "depth")
        assert meta["ensemble_members"] == "augmentations"
        assert r["ensemble_size"] == 3 and r["config_hash"] == cfg.hash()
        depth = decode_depth_png16(r["depth"])
        assert depth.shape == (r["height"], r["width"]) and depth.max() > 0.5
        assert decode_uncertainty_png16(r["uncertainty"], r["uncertainty_scale"]).mean() > 0
    if kind == "transformers":  # a disparity label is never scored as depth
        from depthray.evaluate import evaluate

        (tmp_path / "gt").mkdir()
        for r in rows:
            np.save(tmp_path / "gt" / f"{r['key']}.npy", np.full((r["height"], r["width"]), 2.0, np.float32)
                    + np.linspace(0, 1, r["width"], dtype=np.float32)[None])
        as_depth = evaluate(str(tmp_path / "out"), str(tmp_path / "gt"), space="depth")
        assert len(as_depth.rows) == 3 and all(row.metrics is None for row in as_depth.rows)
        assert all("holds disparity" in row.error for row in as_depth.rows)
        as_disp = evaluate(str(tmp_path / "out"), str(tmp_path / "gt"), space="disparity")
        assert all(row.metrics is not None for row in as_disp.rows)


def test_augmentation_ensembles_rank_errors_of_a_deterministic_double():
    """benchmarks/augmentation_ranking.py at a small size: the uncertainty of augmentation
    ensembles ranks the double's resolution-limited errors (0.87 at the benchmark's size)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import augmentation_ranking as bench
    finally:
        sys.path.pop(0)
    row = bench.run_setting("detail", 12, (64, 96), 4, (0.0, 0.0), (0.0, 0.0), 0)
    assert row["spearman"] > 0.4 and row["abs_rel_dropped_25pct"] > row["abs_rel_kept_75pct"]


def test_plan_reads_the_model_kinds_settings(tiny_da_dir):
    from depthray.plan import model_settings

    cfg = config_from_dict({"model": {"kind": "transformers", "path": str(tiny_da_dir)}})
    assert model_settings(cfg)[:2] == (56, 1)  # preprocessor size, one forward
    cfg = config_from_dict({"model": {"kind": "transformers", "path": "org/remote"}})
    with pytest.raises(ValueError, match="processing_resolution"):
        model_settings(cfg)
    cfg = config_from_dict({"model": {"kind": "marigold-e2e", "path": "org/remote"}})
    assert model_settings(cfg)[1] == 1


class ToyEngine:
    """A model kind's engine as small as it gets: what `ModelKind.load` builds."""

    def __init__(self, folder, m):
        self.folder, self.processing_resolution = folder, m.processing_resolution or 32

    @classmethod
    def from_model_config(cls, folder, m):
        return cls(folder, m)

    def __call__(self, views, seeds):
        return views[:, 0]


def test_a_new_model_kind_is_its_engine_plus_one_registration(tmp_path, monkeypatch):
    """#27 done-when: a kind is added by registering one `ModelKind` (here: at runtime, with a
    test engine); validation, the pre-run checks, what `dtype: auto` records, `depthray plan`
    and the loader all know it from that entry alone."""
    from depthray.job.checks import check_model
    from depthray.models.kinds import KINDS, ModelKind
    from depthray.plan import model_settings

    toy = ModelKind(name="toy", engine="tests.test_model_kinds:ToyEngine", auto_cuda_dtype="float16",
                    marker="toy.json", layout="toy", variants=False, steps="none",
                    plan_settings=lambda kind, m, res, steps: (res or 32, 1, "toy"))
    data = {"model": {"kind": "toy", "path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="model.kind"):
        config_from_dict(data)
    monkeypatch.setitem(KINDS, "toy", toy)  # the one registration line
    cfg = config_from_dict(data)
    with pytest.raises(ConfigError, match="toy.json"):
        check_model(cfg)  # a folder without the kind's marker
    (tmp_path / "toy.json").write_text("{}")
    check_model(cfg)
    assert cfg.settings("cuda")["model.dtype"] == "float16" and cfg.settings("cpu")["model.dtype"] == "float32"
    assert model_settings(cfg)[:2] == (32, 1)
    with pytest.raises(ConfigError, match="no denoising steps"):
        check_model(config_from_dict({**data, "inference": {"num_inference_steps": 2}}))
    model = load_model(cfg.model)
    assert isinstance(model, ToyEngine) and str(model.folder) == str(tmp_path)
