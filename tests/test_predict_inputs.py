"""`predict_image` through the real tiny Marigold: odd inputs, output contract, determinism."""

from __future__ import annotations

import numpy as np
import pytest

import depthray
from depthray.predict import image_to_tensor

CFG = {"ensemble_size": 3, "batch_size": 4, "seed": 0}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return depthray.load_model({"kind": "marigold", "path": str(tiny_model_dir), "processing_resolution": 64})


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        _rgb(45, 61),  # not a multiple of 8
        _rgb(8, 8),  # tiny
        _rgb(30, 7),  # tall and thin, smaller than the model
        _rgb(40, 50)[:, :, 0],  # gray HxW
        _rgb(40, 50)[:, :, :1],  # gray HxWx1
        np.concatenate([_rgb(40, 50), np.full((40, 50, 1), 128, np.uint8)], axis=2),  # RGBA
        (_rgb(40, 50).astype(np.uint16) * 257),  # 16-bit
        _rgb(40, 50).astype(np.float32) / 255.0,  # float in [0,1]
    ],
    ids=["odd-size", "8x8", "30x7", "gray", "gray1", "rgba", "uint16", "float"],
)
def test_odd_inputs_give_depth_at_input_size(model, image):
    res = depthray.predict_image(image, model, CFG)
    h, w = image.shape[:2]
    assert res.depth.shape == (h, w) and res.depth.dtype == np.float32
    assert res.uncertainty.shape == (h, w) and res.uncertainty.dtype == np.float32
    assert np.isfinite(res.depth).all() and np.isfinite(res.uncertainty).all()
    # The fused map is normalised to span [0,1] (it is clamped too, so only the span can fail),
    # and three members of a random model disagree somewhere.
    assert float(res.depth.max() - res.depth.min()) > 0.5
    assert float(res.uncertainty.max()) > 0.0
    assert res.ensemble_size == 3


def test_uint16_equals_uint8_scaled(model):
    img8 = _rgb(40, 50, seed=3)
    a = depthray.predict_image(img8, model, CFG)
    b = depthray.predict_image(img8.astype(np.uint16) * 257, model, CFG)
    np.testing.assert_allclose(a.depth, b.depth, atol=1e-5)


def test_deterministic_by_seed(model):
    img = _rgb(40, 50, seed=4)
    a = depthray.predict_image(img, model, CFG)
    b = depthray.predict_image(img, model, CFG)
    np.testing.assert_array_equal(a.depth, b.depth)
    c = depthray.predict_image(img, model, {**CFG, "seed": 1})
    assert np.abs(c.depth - a.depth).max() > 1e-4


def test_ensemble_members_disagree_so_uncertainty_is_positive(model):
    res = depthray.predict_image(_rgb(40, 50, seed=5), model, {**CFG, "ensemble_reduction": "mean"})
    assert res.uncertainty.mean() > 0
    single = depthray.predict_image(_rgb(40, 50, seed=5), model, {**CFG, "ensemble_size": 1})
    assert single.uncertainty.max() == 0.0


def test_batch_of_images_equals_one_by_one(model):
    images = [_rgb(40, 50, seed=6), _rgb(33, 64, seed=7), _rgb(40, 50, seed=8)]
    together = depthray.predict_images(images, model, CFG)
    for img, res in zip(images, together):
        alone = depthray.predict_image(img, model, CFG)
        np.testing.assert_allclose(res.depth, alone.depth, atol=1e-4)


def test_distinct_views_path_equals_the_plain_interface(model):
    """predict hands the model each view once plus a member index (predict_views; members
    stay on the model's device) when it can, plain __call__ otherwise: same depth either way."""

    class CallOnly:  # the bare model interface: __call__ and processing_resolution
        processing_resolution = model.processing_resolution

        def __call__(self, views, seeds, num_inference_steps=None):
            return model(views, seeds, num_inference_steps)

    calls = []
    real = model.predict_views
    model.predict_views = lambda views, index, seeds, **kw: calls.append((views.shape[0], len(index))) or real(
        views, index, seeds, **kw)
    cfg = {**CFG, "tiling": {"mode": "on", "working_resolution": 128}}
    try:
        images = [_rgb(40, 50, seed=9), _rgb(64, 48, seed=10)]
        a = depthray.predict_images(images, model, cfg)
    finally:
        del model.predict_views
    assert calls and all(u <= n for u, n in calls)
    assert sum(u for u, _ in calls) < sum(n for _, n in calls), "a view was passed once per member"
    assert sum(n for _, n in calls) == sum(r.num_views for r in a) * CFG["ensemble_size"]
    b = depthray.predict_images(images, CallOnly(), cfg)
    for x, y in zip(a, b):
        assert x.num_views > 1  # tiles too, not just the global view
        np.testing.assert_array_equal(x.depth, y.depth)
        np.testing.assert_array_equal(x.uncertainty, y.uncertainty)


def test_config_dict_is_validated(model):
    from depthray.config import ConfigError

    with pytest.raises(ConfigError, match="ensemble_sise"):
        depthray.predict_image(_rgb(16, 16), model, {"ensemble_sise": 3})


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((4, 4, 2), np.uint8), "HxW"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.full((4, 4, 3), 255.0, np.float32), "divide"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
    ],
)
def test_bad_images_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        image_to_tensor(bad)


def test_num_inference_steps_from_config_reaches_the_model(model):
    img = _rgb(40, 50, seed=9)
    one = depthray.predict_image(img, model, {**CFG, "ensemble_size": 1, "num_inference_steps": 1})
    default = depthray.predict_image(img, model, {**CFG, "ensemble_size": 1})
    assert not hasattr(model, "num_inference_steps"), "steps are a call argument, never model state"

    class OneStep:  # the same model, always called with one step whatever predict asks
        processing_resolution = model.processing_resolution

        def __call__(self, views, seeds):
            return model(views, seeds, num_inference_steps=1)

    direct = depthray.predict_image(img, OneStep(), {**CFG, "ensemble_size": 1})
    np.testing.assert_array_equal(one.depth, direct.depth)
    assert np.abs(one.depth - default.depth).max() > 1e-4


def test_steps_on_a_model_without_steps_is_a_clear_error():
    from tests.test_engine import ConstantModel

    with pytest.raises(ValueError, match="num_inference_steps"):
        depthray.predict_image(_rgb(16, 16), ConstantModel(), {"num_inference_steps": 2})
