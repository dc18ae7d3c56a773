"""The inference stage: a Ray Data actor (or a local object) that predicts depth for batches
of decoded rows.

`__init__` loads the model once; `__call__` predicts. Around that: a batch that fails is
retried one image at a time, so one bad image becomes one error row instead of failing
its neighbours; GPU out-of-memory retries with fewer views per model call; a model call
past `compute.batch_timeout_s` ends the process so Ray restarts it (depthray/job/inflight.py
then narrows the batch down to the image that hangs or crashes).

With a metric reference model (pipelines/metric_depth.py, `metric.reference_model`) the
actor loads it too, on the same device, and runs it on each image right after the label,
inside the same watched call: its map in metres goes out in `reference_f32`, and an image
it fails on is an error row (`reference`), never a label without its reference.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import pyarrow as pa

from depthray.config import InferenceConfig, ModelConfig, StorageConfig
from depthray.metric_config import MetricConfig
from depthray.io import records, row_meta
from depthray.job.inflight import DEFAULT_GPU_BATCH_TIMEOUT_S, InFlight, WorkerCrashed, WorkerHung
from depthray.job.pool_watch import report_pool_member

log = logging.getLogger(__name__)


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeError older torch / other backends raise."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ReferenceFailed(RuntimeError):
    """The metric reference model failed on an image (the image's label is dropped with it)."""


class DepthPredictor:
    """Ray Data actor: loads the model once, predicts depth for batches of decoded rows.

    A batch that fails is retried one image at a time, so one bad image becomes one error
    record instead of failing its neighbours (or the job). A batch whose previous attempt
    killed the actor's process is also run one image at a time (see InFlight).
    """

    def __init__(self, model: ModelConfig, inference: InferenceConfig, storage: StorageConfig,
                 run_id: str = "", timeout_s: float | None = None, loaded=None,
                 reference: MetricConfig | None = None):
        """`loaded`: a model already in memory (`depthray plan --measure` passes a stand-in
        that records calls); else `model` is loaded. `reference`: the `metric:` section
        whose `reference_model` runs beside it (None: none)."""
        from depthray.io.fs import storage_options
        from depthray.models.loading import load_model

        self.model = loaded if loaded is not None else load_model(model, storage_options(model.path, storage))
        self.reference = None
        if reference is not None and reference.reference_model:
            from depthray.models.hf_metric import load_reference

            self.reference = load_reference(reference.reference_model, reference.reference_dtype,
                                            model.device, storage)
        self.inference = inference
        self.progress = None  # predict.Progress for the next batches (depthray predict sets it)
        self.run_id = run_id
        if timeout_s is None:
            on_gpu = getattr(getattr(self.model, "device", None), "type", "cpu") == "cuda"
            timeout_s = DEFAULT_GPU_BATCH_TIMEOUT_S if on_gpu else 0.0
        self.timeout_s = float(timeout_s)
        # Last, once the model is loaded: from now on this actor counts in the job summary's
        # pool sizes (a no-op outside a Ray actor).
        self.pool_heartbeat = report_pool_member(run_id)

    def _predict_watched(self, rows: list[dict], inflight: InFlight | None) -> list:
        """_predict under a watchdog: past timeout_s the call is taken for a hang, and the
        process ends (a thread cannot interrupt a CUDA or C call), so Ray restarts the actor
        and the retry runs image by image (see InFlight)."""
        if not self.timeout_s:
            return self._label(rows)
        import threading

        def hung() -> None:
            log.error("a model call on %d image(s) ran past compute.batch_timeout_s=%g s; "
                      "ending this worker so Ray restarts it", len(rows), self.timeout_s)
            if inflight is not None:
                inflight.mark_hung(self.timeout_s)
            os._exit(3)

        timer = threading.Timer(self.timeout_s, hung)
        timer.daemon = True
        timer.start()
        try:
            return self._label(rows)
        finally:
            timer.cancel()

    def _label(self, rows: list[dict]) -> list[tuple]:
        """(label, reference map in metres or None) for each of `rows`."""
        results = self._predict(rows)
        if self.reference is None:
            return [(res, None) for res in results]
        out = []
        for r, res in zip(rows, results):
            image = np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3)
            try:
                out.append((res, self.reference(image)))
            except Exception as e:
                raise ReferenceFailed(f"metric.reference_model {self.reference.name!r}: {type(e).__name__}: {e}") from e
        return out

    def _predict(self, rows: list[dict]) -> list:
        """Depth for `rows`; on GPU out-of-memory, retry with half the views per model call
        (down to 1) instead of failing the batch. The smaller size is kept for the calls
        that follow (the image-by-image retry, later batches): the GPU will not grow."""
        from depthray.predict import predict_images

        images = [np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3).copy() for r in rows]
        while True:
            try:
                return predict_images(images, self.model, self.inference, self.progress)
            except Exception as e:
                if not is_out_of_memory(e) or self.inference.batch_size <= 1:
                    raise
                _release_gpu_memory()
                smaller = max(1, self.inference.batch_size // 2)
                log.warning("out of memory with %d views per call on %d image(s); %d from now on",
                            self.inference.batch_size, len(images), smaller)
                self.inference = dataclasses.replace(self.inference, batch_size=smaller)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if not records.is_trailer(r) and r.get("error") is None]
        t0 = time.perf_counter()
        inflight = InFlight(self.run_id, todo) if todo else None
        try:
            if inflight is not None and inflight.retried:
                raise WorkerCrashed(f"attempt {inflight.state['attempt']}: a previous attempt "
                                    "of this batch killed its worker process")
            results = list(zip(todo, self._predict_watched(todo, inflight))) if todo else []
        except Exception as e:
            log.warning("batch of %d failed (%s); retrying one image at a time", len(todo), e)
            results = []
            for r in todo:
                skip = inflight.crashed(r) if inflight is not None else None
                if skip is not None:
                    results.append((r, skip))
                    continue
                if inflight is not None and inflight.retried:
                    inflight.working_on(r)
                try:
                    results.append((r, self._predict_watched([r], inflight)[0]))
                except Exception as e1:
                    results.append((r, e1))
        if inflight is not None:
            inflight.done()
        share = (time.perf_counter() - t0) / max(len(todo), 1)
        from depthray.predict import NonFiniteDepth

        out = [r for r in rows if records.is_trailer(r) or r.get("error") is not None]
        for r, res in results:
            if isinstance(res, Exception):
                reason = ("timeout" if isinstance(res, WorkerHung)
                          else "crashed" if isinstance(res, WorkerCrashed)
                          else "reference" if isinstance(res, ReferenceFailed)
                          else "non_finite" if isinstance(res, NonFiniteDepth) else "infer")
                out.append(records.error_row(r, "infer", reason, f"{type(res).__name__}: {res}"))
                continue
            res, reference = res
            # What the map holds (depth | disparity) and how its members differed: a reader must
            # never take a disparity map for depth.
            row_meta.put(r, output_space=res.output_space)
            if res.members != "seeds":
                row_meta.put(r, ensemble_members=res.members)
            r.update(depth_f32=res.depth.astype(np.float32).tobytes(),
                     uncertainty_f32=res.uncertainty.astype(np.float32).tobytes(),
                     num_views=res.num_views, ensemble_size=res.ensemble_size, infer_s=share,
                     reference_f32=None if reference is None else reference.astype(np.float32).tobytes())
            r.pop("pixels", None)
            out.append(r)
        return records.to_table(out, records.PREDICTED)
