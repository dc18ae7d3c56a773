"""Marigold against diffusers' `MarigoldDepthPipeline` called the way its users call it: a
list of equal-size PIL images, its own `batch_size`, `ensemble_size`, and the starting
latents passed through its public `latents=` argument (the documented way to make a
diffusers run reproducible). depthray runs the same images through `predict_images`, the
path jobs use (tiling off: diffusers has none). depthray's member noise is what both get:
for view 0 of every image, member m starts from `initial_noise(member_seed(seed, 0, m))`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import depthray
from depthray.models.marigold import initial_noise
from depthray.predict import member_seed

RES = 64
SEED = 5


def _photos(n: int, h: int, w: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin((4 + i) * x), np.cos(3 * y + i), np.sin(2 * (x + y))], axis=-1) * 90 + 128
        out.append(np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def _processing_size(h: int, w: int) -> tuple[int, int]:
    """What diffusers' MarigoldImageProcessor resizes to (int of the scaled sides), padded to 8."""
    ph, pw = int(h * RES / max(h, w)), int(w * RES / max(h, w))
    return -(-ph // 8) * 8, -(-pw // 8) * 8


def _diffusers(folder, photos, ensemble_size: int, steps: int, batch_size: int) -> np.ndarray:
    from diffusers import MarigoldDepthPipeline

    pipe = MarigoldDepthPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    h, w = _processing_size(*photos[0].shape[:2])
    seeds = [member_seed(SEED, 0, m) for m in range(ensemble_size)] * len(photos)
    latents = initial_noise(seeds, (4, h // 8, w // 8))  # [N*E,4,h/8,w/8], image-major as diffusers repeats
    out = pipe([Image.fromarray(p) for p in photos], num_inference_steps=steps, ensemble_size=ensemble_size,
               processing_resolution=RES, batch_size=batch_size, latents=latents, output_type="np")
    return out.prediction[..., 0]  # [N,H,W]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": RES})


@pytest.mark.parametrize("size,steps", [((48, 64), 1), ((70, 100), 4), ((90, 51), 2), ((45, 80), 1)])
def test_one_member_equals_diffusers_pipeline(tiny_model_dir, model, size, steps):
    """One member: depthray's label is diffusers' prediction to float32 accuracy, for 4:3,
    10:7 (resized: the processing size is diffusers' int() of the scaled side), portrait and
    16:9 images, three per call with diffusers' batch_size 2."""
    photos = _photos(3, *size)
    ref = _diffusers(tiny_model_dir, photos, 1, steps, batch_size=2)
    cfg = {"ensemble_size": 1, "seed": SEED, "num_inference_steps": steps, "tiling": {"mode": "off"}}
    ours = np.stack([r.depth for r in depthray.predict_images(photos, model, cfg)])
    assert ours.shape == ref.shape == (3, *size)
    assert min(float(r.std()) for r in ref) > 1e-3, "a constant map would make this meaningless"
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def _diffusers_with_alignment(folder, photos, ensemble_size: int, reduction: str, swap_in_ours: bool):
    """diffusers' pipeline with several members; returns its predictions [N,H,W] and, per image,
    (the members it aligned [E,h,w], the (s, t) it used in its raw-member parameterisation).
    swap_in_ours: its BFGS step returns depthray's closed-form alignment instead (the one part
    depthray does differently, docs/ensembling.md); otherwise BFGS runs and is recorded."""
    from types import SimpleNamespace
    from unittest import mock

    import scipy.optimize

    from tests.test_ensemble_diffusers import _ours_as_diffusers_params

    real, seen = scipy.optimize.minimize, []

    def minimize(fun, x0, *args, **kwargs):
        members = fun.keywords["depth"][:, 0].double()  # [E,h,w] what diffusers aligns
        params = _ours_as_diffusers_params(members) if swap_in_ours else real(fun, x0, *args, **kwargs).x
        seen.append((members, np.asarray(params, dtype=np.float64)))
        return SimpleNamespace(x=params)

    from diffusers import MarigoldDepthPipeline

    pipe = MarigoldDepthPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    h, w = _processing_size(*photos[0].shape[:2])
    seeds = [member_seed(SEED, 0, m) for m in range(ensemble_size)] * len(photos)
    latents = initial_noise(seeds, (4, h // 8, w // 8))
    with mock.patch("scipy.optimize.minimize", minimize):
        out = pipe([Image.fromarray(p) for p in photos], num_inference_steps=1, ensemble_size=ensemble_size,
                   processing_resolution=RES, batch_size=4, latents=latents, output_type="np",
                   ensembling_kwargs={"reduction": reduction})
    return out.prediction[..., 0], seen


@pytest.mark.parametrize("e", [3, 5])
@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_several_members_equal_diffusers_pipeline_given_its_alignment(tiny_model_dir, model, reduction, e):
    """Several members through diffusers' own pipeline with its alignment solver's answer
    replaced by depthray's closed form (the one documented difference): everything else
    (members, fusion, normalisation, resize) is diffusers', and depthray's label equals it to
    1e-4. Odd E: diffusers' torch.median is the true median there."""
    photos = _photos(2, 48, 64)
    ref, seen = _diffusers_with_alignment(tiny_model_dir, photos, e, reduction, swap_in_ours=True)
    assert len(seen) == 2  # one alignment per image: the swap took effect
    cfg = {"ensemble_size": e, "seed": SEED, "ensemble_reduction": reduction, "num_inference_steps": 1,
           "tiling": {"mode": "off"}}
    ours = np.stack([r.depth for r in depthray.predict_images(photos, model, cfg)])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_several_members_against_diffusers_own_bfgs(tiny_model_dir, model, reduction):
    """diffusers untouched (BFGS, two iterations): the labels differ only through the
    alignment, pixel by pixel within how far the two alignments place the members (A_i ours,
    B_i diffusers', in output units): max_i |A_i - B_i| for the median, mean_i for the mean
    (both reductions are 1-Lipschitz; tests/test_ensemble_diffusers.py derives it), the same
    way round, and with the mean the same map (correlation >= 0.99). The median picks one
    member per pixel, so where BFGS stops short of convergence (it differs by CPU) picks flip
    by the members' spread: measured 0.993-0.998 here, bounded only by the pixel-wise bound.
    Which alignment is better is scored on diffusers' own cost in
    tests/test_ensemble_diffusers.py."""
    from tests.test_ensemble_diffusers import _members_in_output_units, _ours_as_diffusers_params

    photos = _photos(2, 48, 64)
    ref, seen = _diffusers_with_alignment(tiny_model_dir, photos, 5, reduction, swap_in_ours=False)
    cfg = {"ensemble_size": 5, "seed": SEED, "ensemble_reduction": reduction, "num_inference_steps": 1,
           "tiling": {"mode": "off"}}
    ours = [r.depth for r in depthray.predict_images(photos, model, cfg)]
    for o, r, (members, bfgs) in zip(ours, ref, seen):
        a = _members_in_output_units(members, _ours_as_diffusers_params(members), reduction)
        b = _members_in_output_units(members, bfgs, reduction)
        moved = (a - b).abs()
        bound = (moved.amax(dim=0) if reduction == "median" else moved.mean(dim=0)).numpy()
        diff = np.abs(o - r)
        corr = float(np.corrcoef(o.ravel(), r.ravel())[0, 1])
        print(f"{reduction}: corr {corr:.4f}, mean |diff| {diff.mean():.4f}, mean bound {bound.mean():.4f}")
        assert float((diff - bound).max()) <= 1e-4
        assert corr > 0, corr  # the same way round: a flipped label correlates at about -1
        if reduction == "mean":  # the mean moves by the average member move: the same map
            assert corr >= 0.99, corr
