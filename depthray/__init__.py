"""depthray: depth pseudo ground truth at scale with tiled, ensembled Marigold on Ray Data."""

__version__ = "0.1.0"

__all__ = ["load_model", "predict_image", "predict_images", "__version__"]


def __getattr__(name):
    # Lazy so `import depthray` (and the CLI's --help) stays fast: torch loads on first use.
    if name == "load_model":
        from depthray.models.loading import load_model

        return load_model
    if name in ("predict_image", "predict_images"):
        from depthray import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'depthray' has no attribute {name!r}")
