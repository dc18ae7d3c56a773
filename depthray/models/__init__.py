"""Depth models: the interface, the Marigold engine, loading and the tiny-model builder."""

from depthray.models.base import DepthModel

__all__ = ["DepthModel", "load_model"]


def __getattr__(name):
    if name == "load_model":
        from depthray.models.loading import load_model

        return load_model
    raise AttributeError(f"module 'depthray.models' has no attribute {name!r}")
