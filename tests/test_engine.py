"""The Marigold engine: it is Marigold (parity with diffusers), loads from every kind of path,
is deterministic by seed, and batches without changing results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import depthray
from depthray.models.marigold import MarigoldDepthModel, initial_noise

RES = 64


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES})


def _views(n: int, h: int = 50, w: int = 70, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size,steps", [((50, 70), 4), ((96, 40), 2), ((64, 64), 1)])
def test_matches_diffusers_marigold_pipeline(tiny_model_dir, model, size, steps):
    from diffusers import MarigoldDepthPipeline

    pipe = MarigoldDepthPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    image = _views(1, *size, seed=1)
    processed, _ = model.preprocess(image)
    noise = initial_noise([7], (4, processed.shape[-2] // 8, processed.shape[-1] // 8))

    ours = model(image, [7], num_inference_steps=steps)  # [1,h,w]
    ref = pipe(image, processing_resolution=RES, ensemble_size=1, latents=noise,
               num_inference_steps=steps, output_type="pt").prediction  # [1,1,h,w]

    assert ours.shape == (1, *size)
    assert ours.std() > 1e-4, "a constant output would make parity meaningless"
    torch.testing.assert_close(ours[0], ref[0, 0].float(), atol=1e-5, rtol=1e-5)


def test_checkpoint_defaults_come_from_model_index(tiny_model_dir):
    m = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir)})
    assert m.processing_resolution == 768
    assert m.default_num_inference_steps == 4
    assert m.empty_text_embedding.shape[:2] == (1, 2)  # "" -> [BOS, EOS]


def test_deterministic_by_seed_and_independent_of_batching(model):
    views = _views(3)
    a = model(views, [1, 2, 3])
    b = model(views, [1, 2, 3])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The same (view, seed) alone or inside a larger batch gives the same member.
    alone = model(views[1:2], [2])
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=1e-5)
    # Another seed gives another member.
    other = model(views[1:2], [99])
    assert (other[0] - a[1]).abs().max() > 1e-3


def test_members_of_a_view_are_encoded_once(tiny_model_dir):
    m = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES})
    calls = []
    real_encode = m.encode
    m.encode = lambda images: calls.append(images.shape[0]) or real_encode(images)
    v = _views(2)
    batch = torch.cat([v[0:1].repeat(4, 1, 1, 1), v[1:2].repeat(3, 1, 1, 1)])  # 7 members, 2 views
    out = m(batch, list(range(7)))
    assert calls == [2]
    assert out.shape == (7, 50, 70)
    # A later call with members of the same views hits the latent cache: no encode at all.
    m(v[0:1].repeat(2, 1, 1, 1), [10, 11])
    assert calls == [2]


def test_predict_views_equals_one_view_per_member(model):
    """The distinct-views entry point (what predict.py uses) gives the members __call__
    gives for the same (view, seed) pairs, also when split into model batches."""
    v = _views(2)
    index, seeds = [0, 0, 1, 0, 1], [5, 6, 7, 8, 9]
    plain = model(v[index], seeds)
    torch.testing.assert_close(model.predict_views(v, index, seeds).cpu(), plain, atol=1e-5, rtol=1e-5)
    model.max_batch_size = 2
    try:
        torch.testing.assert_close(model.predict_views(v, index, seeds).cpu(), plain, atol=1e-5, rtol=1e-5)
    finally:
        model.max_batch_size = None
    with pytest.raises(ValueError, match="index must point into the 2 views"):
        model.predict_views(v, [0, 2], [1, 2])
    with pytest.raises(ValueError, match="one seed per member"):
        model.predict_views(v, [0, 1], [1])


def test_output_at_view_size(model):
    out = model(_views(2, 37, 91), [0, 1])
    assert out.shape == (2, 37, 91)
    assert out.dtype == torch.float32
    # Clamped to [0,1] by the engine, so a range check could not fail; a map that the clamp
    # flattened (a broken decode scale) could.
    assert all(float(m.std()) > 1e-3 for m in out)


def test_model_interface_validates_arguments(model):
    with pytest.raises(ValueError, match="one seed per view"):
        model(_views(2), [1])
    with pytest.raises(ValueError, match=r"\[N,3,h,w\]"):
        model(torch.rand(2, 4, 8, 8), [1, 2])


def test_load_from_s3_url(tiny_model_dir, s3_bucket, s3_endpoint, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(tiny_model_dir), f"{s3_bucket}/models/tiny", recursive=True)
    spec = {"kind": "marigold", "path": f"s3://{s3_bucket}/models/tiny", "processing_resolution": RES,
            "cache_dir": str(tmp_path / "cache")}
    remote = depthray.load_model(spec)
    local = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES})
    views = _views(1)
    torch.testing.assert_close(remote(views, [5]), local(views, [5]), atol=0, rtol=0)
    # The copy is cached: the second load does not need the bucket any more.
    fs.rm(f"{s3_bucket}/models/tiny", recursive=True)
    again = depthray.load_model(spec)
    assert isinstance(again, MarigoldDepthModel)


def test_load_errors_are_clear(tmp_path, s3_bucket):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        depthray.load_model({"kind": "marigold", "path": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        depthray.load_model({"kind": "marigold", "path": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="nothing at that URL"):
        depthray.load_model({"kind": "marigold", "path": f"s3://{s3_bucket}/nope",
                             "cache_dir": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="model.kind: must be one of .*'zoedepth'"):
        depthray.load_model({"kind": "zoedepth", "path": str(tmp_path)})


class ConstantModel:
    processing_resolution = 32

    def __init__(self, value: float = 0.5):
        self.value = value

    def __call__(self, views, seeds):
        return torch.full((views.shape[0], *views.shape[-2:]), self.value)


def test_load_factory_model():
    m = depthray.load_model({"factory": "tests.test_engine:ConstantModel", "options": {"value": 0.25}})
    assert float(m(_views(1), [0]).mean()) == 0.25
    with pytest.raises(ImportError, match="no attribute"):
        depthray.load_model({"factory": "tests.test_engine:Nope"})


def test_variant_and_dtype(tiny_model_dir, tmp_path):
    """fp16 weight files (variant) load; bf16 compute gives a close answer to float32."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.to(torch.float16).save_pretrained(tmp_path / "unet_fp16", variant="fp16")
    saved = list((tmp_path / "unet_fp16").glob("*.fp16.safetensors"))
    assert saved, "variant weights were not written"
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    shutil.copy(saved[0], ckpt / "unet" / saved[0].name)
    for sub in ("vae", "text_encoder"):
        for f in (ckpt / sub).glob("*.safetensors"):
            shutil.copy(f, f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    m16 = depthray.load_model({"kind": "marigold", "path": str(ckpt), "variant": "fp16",
                               "dtype": "float32", "processing_resolution": RES})
    mbf = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "dtype": "bfloat16",
                               "processing_resolution": RES})
    m32 = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES})
    assert mbf.unet.dtype == torch.bfloat16
    v = _views(1)
    ref = m32(v, [3])
    # fp16-rounded weights and bf16 compute are approximations of the float32 result.
    assert float((m16(v, [3]) - ref).abs().mean()) < 0.02
    assert float((mbf(v, [3]) - ref).abs().mean()) < 0.05
    assert np.isfinite(mbf(v, [3]).numpy()).all()


def test_tiny_vae_decoder_option(tiny_model_dir, tmp_path):
    """model.vae_decoder swaps in an AutoencoderTiny for decoding; encoding keeps the full VAE."""
    from depthray.models.tiny import build_tiny_vae_decoder

    taesd = build_tiny_vae_decoder(tmp_path / "taesd")
    fast = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES,
                                "vae_decoder": str(taesd)})
    full = depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES})
    assert type(fast.vae_decoder).__name__ == "AutoencoderTiny"
    v = _views(2)
    a, b = fast(v, [1, 2]), full(v, [1, 2])
    assert a.shape == b.shape == (2, 50, 70)
    assert float((a - b).abs().max()) > 1e-3  # another decoder really ran


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="hub download failed"):
        depthray.load_model({"kind": "marigold", "path": "prs-eth/marigold-depth-v1-1"})


def test_lcm_checkpoint_runs_one_step_by_default(tmp_path):
    from depthray.models.tiny import build_tiny_marigold

    ckpt = build_tiny_marigold(tmp_path / "lcm", scheduler="lcm")
    m = depthray.load_model({"kind": "marigold", "path": str(ckpt), "processing_resolution": RES})
    assert type(m.scheduler).__name__ == "LCMScheduler" and m.default_num_inference_steps == 1
    v = _views(2)
    torch.testing.assert_close(m(v, [1, 2]), m(v, [1, 2]), atol=0, rtol=0)
    # multi-step LCM injects noise: still deterministic per seed
    a = m(v, [1, 2], num_inference_steps=2)
    torch.testing.assert_close(m(v[1:], [2], num_inference_steps=2)[0], a[1], atol=1e-5, rtol=1e-5)


def test_compile_keeps_results_and_handles_new_shapes(tiny_model_dir):
    """model.compile() traces UNet and VAE; results equal eager, and after a second aspect
    ratio one shape-generic graph serves further sizes (no recompile per image size).
    aot_eager runs dynamo's tracing and guards without inductor's C++ build (minutes here)."""
    from torch._dynamo.utils import counters

    cfg = {"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES}
    eager, compiled = depthray.load_model(cfg), depthray.load_model(cfg)
    torch._dynamo.reset()
    compiled.compile(backend="aot_eager")
    assert compiled.compiled and type(compiled.unet).__name__ == "OptimizedModule"
    assert type(compiled.vae.decoder).__name__ == "OptimizedModule"

    for size in [(48, 64), (64, 40)]:
        v = _views(2, *size)
        torch.testing.assert_close(compiled(v, [1, 2]), eager(v, [1, 2]), atol=1e-5, rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    # A third size with the second's latent parity (8x3 vs 8x5; the UNet branches on
    # divisibility by its up-sampling factor, so parity classes get a graph each).
    v = _views(2, 64, 24)
    torch.testing.assert_close(compiled(v, [3, 4]), eager(v, [3, 4]), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("steps", [4, 1])
def test_predict_images_matches_diffusers_marigold_pipeline(tiny_model_dir, model, steps):
    """The job's path (depthray.predict_images, one member, tiling off, the image's long side
    at the processing resolution so neither side resizes) is diffusers' pipeline with
    ensemble_size=1 fed the noise predict_images draws for member 0 of view 0."""
    from diffusers import MarigoldDepthPipeline

    from depthray.predict import member_seed

    pipe = MarigoldDepthPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    image = _views(1, 48, RES, seed=3)  # [1,3,48,64]
    seed = 11
    processed, _ = model.preprocess(image)
    noise = initial_noise([member_seed(seed, 0, 0)], (4, processed.shape[-2] // 8, processed.shape[-1] // 8))

    cfg = {"ensemble_size": 1, "seed": seed, "num_inference_steps": steps, "tiling": {"mode": "off"}}
    res = depthray.predict_images([image[0].permute(1, 2, 0).numpy()], model, cfg)[0]
    ref = pipe(image, processing_resolution=RES, ensemble_size=1, latents=noise,
               num_inference_steps=steps, output_type="pt").prediction  # [1,1,h,w]

    assert res.depth.shape == (48, RES) and res.num_views == 1
    assert res.depth.std() > 1e-4, "a constant output would make parity meaningless"
    torch.testing.assert_close(torch.from_numpy(res.depth), ref[0, 0].float(), atol=1e-5, rtol=1e-5)
    assert float(np.abs(res.uncertainty).max()) == 0.0  # one member: no spread, like diffusers


def test_multistep_lcm_noise_draws_are_all_independent(tmp_path, monkeypatch):
    """Every noise draw of a multi-step LCM job (each member's initial latent, each member's
    re-noise at each step) differs from every other: member seeds are consecutive, and a
    step generator seeded seed + 1 repeated the next member's initial noise."""
    import diffusers.schedulers.scheduling_lcm as lcm

    import depthray.models.marigold as marigold
    from depthray.models.tiny import build_tiny_marigold

    ckpt = build_tiny_marigold(tmp_path / "lcm", scheduler="lcm")
    m = depthray.load_model({"kind": "marigold", "path": str(ckpt), "processing_resolution": RES})
    draws: list[torch.Tensor] = []

    def record(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            draws.extend(out.detach().float().cpu().flatten(1))  # one row per member
            return out
        return wrapped

    monkeypatch.setattr(marigold, "initial_noise", record(marigold.initial_noise))
    monkeypatch.setattr(lcm, "randn_tensor", record(lcm.randn_tensor))
    e, steps = 4, 3
    cfg = {"ensemble_size": e, "seed": 0, "num_inference_steps": steps, "tiling": {"mode": "off"}}
    image = _views(1, 48, RES, seed=4)[0].permute(1, 2, 0).numpy()
    depthray.predict_images([image], m, cfg)

    # e initial latents + e re-noises at every step but the last.
    assert len(draws) == e + e * (steps - 1)
    x = torch.stack(draws)  # [D,4*h*w]
    x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)
    corr = (x @ x.T) / x.shape[1]  # [D,D]
    off = corr[~torch.eye(len(draws), dtype=torch.bool)]
    # 256 values per draw: independent draws correlate ~N(0, 1/16); equal ones at 1.
    assert float(off.abs().max()) < 0.4, corr
