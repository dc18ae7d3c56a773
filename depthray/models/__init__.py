"""Depth models: the interface, the model kinds, the engines, loading and the tiny-model builder.

Nothing is imported eagerly: `depthray.models.kinds` is read by the config, which must not
pull torch in."""

__all__ = ["DepthModel", "load_model"]


def __getattr__(name):
    if name == "load_model":
        from depthray.models.loading import load_model

        return load_model
    if name == "DepthModel":
        from depthray.models.base import DepthModel

        return DepthModel
    raise AttributeError(f"module 'depthray.models' has no attribute {name!r}")
