"""Engine benchmarks: depthray's engine against diffusers' MarigoldDepthPipeline, and the
measured effect of each engine feature (batching, encode-once, closed-form ensembling,
bf16, channels_last, torch.compile, tiny VAE decoder), plus UNet achieved TFLOP/s.

Every comparison runs both contenders in this process, interleaved, on the same inputs.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import interleave, median, sync

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched on torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


@dataclass
class EngineSettings:
    device: str
    dtype: str  # float32 | bfloat16 | float16
    resolution: int  # processing resolution (long side)
    ensemble_size: int
    steps: int
    batch_size: int  # views per model call (both engines)
    rounds: int
    # Weights' memory format on both sides; None: channels_last on CUDA (the engine's
    # default there), contiguous elsewhere.
    channels_last: bool | None = None

    def uses_channels_last(self) -> bool:
        return self.device.startswith("cuda") if self.channels_last is None else self.channels_last

    def inference(self) -> dict:
        return {"ensemble_size": self.ensemble_size, "batch_size": self.batch_size, "seed": 0,
                "num_inference_steps": self.steps, "tiling": {"mode": "off"}}


# ------------------------------------------------------------------------- loading
def load_engine(folder, s: EngineSettings, **kw):
    from depthray.models.marigold import MarigoldDepthModel

    model = MarigoldDepthModel.from_pretrained(folder, dtype=s.dtype, device=s.device,
                                               processing_resolution=s.resolution, **kw)
    model.set_channels_last(s.uses_channels_last())
    return model


def load_diffusers(folder, s: EngineSettings):
    from diffusers import MarigoldDepthPipeline

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[s.dtype]
    pipe = MarigoldDepthPipeline.from_pretrained(folder, torch_dtype=dtype).to(s.device)
    pipe.set_progress_bar_config(disable=True)
    # The same weight layout as the engine's, as diffusers' own speed-up guide sets it.
    fmt = torch.channels_last if s.uses_channels_last() else torch.contiguous_format
    pipe.unet.to(memory_format=fmt)
    pipe.vae.to(memory_format=fmt)
    return pipe


def weights_memory_format(*modules) -> str:
    """'channels_last' | 'contiguous' | 'mixed': the layout of the convolution weights
    whose two layouts differ (k x k kernels over more than one channel)."""
    seen = set()
    for module in modules:
        for w in module.parameters():
            if w.dim() == 4 and w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1:
                if w.is_contiguous(memory_format=torch.channels_last):
                    seen.add("channels_last")
                elif w.is_contiguous():
                    seen.add("contiguous")
                else:
                    seen.add("other")
    return seen.pop() if len(seen) == 1 else "mixed"


class UNetBatches:
    """Counts the batch size of every UNet call (a forward pre-hook): what each side
    actually puts in one model call, kept beside its timings."""

    def __init__(self, unet):
        self.unet, self.sizes = unet, Counter()

    def __enter__(self) -> "UNetBatches":
        self._handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.sizes[int(x.shape[0])] += 1

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _views(images: list[np.ndarray], model, device: str = "cpu") -> torch.Tensor:
    """The first image as a model view at processing resolution: [1,3,h,w] in [0,1]."""
    from depthray.predict import image_to_tensor
    from depthray.tiling import fit_long_side

    t = image_to_tensor(images[0])  # [3,H,W]
    size = fit_long_side(t.shape[1], t.shape[2], model.processing_resolution)
    return F.interpolate(t[None], size=size, mode="bilinear", antialias=True)  # [1,3,h,w]


# ------------------------------------------------------------------------- 1. vs diffusers
DIFFUSERS_CALL = ("one call per round over the whole set, as its users batch equal-size images: "
                  "pipe(list_of_images, batch_size=B, num_inference_steps=S, ensemble_size=E, "
                  "processing_resolution=R, output_uncertainty=E > 1, generator=seeded)")


def engine_vs_diffusers(model, pipe, images, s: EngineSettings, compiled=None, warmup: int = 1) -> dict:
    """Images/s of predict_images vs the diffusers pipeline called as its users call it:
    the whole list of equal-size images in one call, its own `batch_size` = the engine's
    views per model call, same members, steps, resolution, dtype and weight layout.
    With `compiled` (the same engine after model.compile()), it runs as a third contender
    in the same rounds; its first call (the compilation) is timed separately."""
    from PIL import Image

    from depthray.predict import predict_images

    if len({im.shape for im in images}) != 1:
        raise ValueError("diffusers batches only equal-size images: give the benchmark one size")
    pil = [Image.fromarray(im) for im in images]
    gen_device = s.device if s.device.startswith("cuda") else "cpu"

    def diffusers_run():
        pipe(pil, num_inference_steps=s.steps, ensemble_size=s.ensemble_size,
             processing_resolution=s.resolution, batch_size=s.batch_size,
             output_uncertainty=s.ensemble_size > 1,  # diffusers refuses it for one member
             generator=torch.Generator(device=gen_device).manual_seed(0))

    def engine_run(m):
        def run():
            m.clear_cache()  # diffusers re-encodes every call; so must we
            predict_images(images, m, s.inference())
        return run

    formats = {"depthray": weights_memory_format(model.unet, model.vae),
               "diffusers": weights_memory_format(pipe.unet, pipe.vae)}
    if formats["depthray"] != formats["diffusers"]:
        raise ValueError(f"the two sides hold their weights in different layouts: {formats}")
    contenders = {"depthray": engine_run(model), "diffusers": diffusers_run}
    out: dict = {}
    if compiled is not None:
        contenders["depthray_compiled"] = engine_run(compiled)
        sync(s.device)
        t0 = time.perf_counter()
        contenders["depthray_compiled"]()  # compiles for these shapes
        sync(s.device)
        out["compile_first_call_s"] = time.perf_counter() - t0
    with UNetBatches(model.unet) as ours, UNetBatches(pipe.unet) as theirs:
        t = interleave(contenders, s.rounds, s.device, warmup=warmup)
    calls = warmup + s.rounds
    ips = {name: len(images) / median(times) for name, times in t.items()}
    out.update(depthray_images_per_s=ips["depthray"], diffusers_images_per_s=ips["diffusers"],
               ratio=ips["depthray"] / ips["diffusers"], times_s=t, memory_format=formats,
               diffusers_call=DIFFUSERS_CALL, batch_size=s.batch_size, images=len(images),
               unet_batch_sizes={"depthray": {str(k): v / calls for k, v in sorted(ours.sizes.items())},
                                 "diffusers": {str(k): v / calls for k, v in sorted(theirs.sizes.items())}})
    if compiled is not None:
        out.update(compiled_images_per_s=ips["depthray_compiled"],
                   ratio_compiled=ips["depthray_compiled"] / ips["diffusers"])
    return out


# ------------------------------------------------------------------------- 2. ablations
def batching_effect(model, images, s: EngineSettings) -> dict:
    """All images in one predict_images call (members of several images share a model
    batch) vs one call per image (a batch never holds more than one image's members)."""
    from depthray.predict import predict_images

    cfg = s.inference()

    def across():
        model.clear_cache()
        predict_images(images, model, cfg)

    def per_image():
        model.clear_cache()
        for im in images:
            predict_images([im], model, cfg)

    t = interleave({"across_images": across, "per_image": per_image}, s.rounds, s.device)
    return {"speedup": median(t["per_image"]) / median(t["across_images"]), "times_s": t}


def encode_once_effect(model, images, s: EngineSettings) -> dict:
    """E members of one view: encoded once (members repeat the view) vs encoded E times
    (each member's copy differs in one pixel value, so each is a distinct view)."""
    e = s.ensemble_size
    view = _views(images, model)  # [1,3,h,w]
    seeds = list(range(e))
    counter = itertools.count(1)

    def batch(distinct: bool) -> torch.Tensor:
        # A fresh pixel value per call keeps the latent cache from helping either contender.
        k = next(counter)
        v = view.repeat(e, 1, 1, 1)  # [E,3,h,w]
        for m in range(e):
            v[m, 0, 0, 0] = ((k * e + (m if distinct else 0)) * 0.6180339887) % 1.0
        return v

    t = interleave({"encode_once": lambda: model(batch(False), seeds, num_inference_steps=s.steps),
                    "encode_each": lambda: model(batch(True), seeds, num_inference_steps=s.steps)},
                   s.rounds, s.device)
    return {"speedup": median(t["encode_each"]) / median(t["encode_once"]), "times_s": t}


def ensembling_effect(model, pipe, images, s: EngineSettings) -> dict:
    """Closed-form alignment (depthray.ensemble) vs diffusers' scipy BFGS ensembling, on
    the same E members at processing resolution; plus how far apart their results are."""
    from depthray.ensemble import ensemble_depth

    e = s.ensemble_size
    view = _views(images, model)
    members = model(view.repeat(e, 1, 1, 1), list(range(e)), num_inference_steps=s.steps).to(s.device)  # [E,h,w]

    def ours():
        return ensemble_depth(members[None], "median")

    def theirs():
        return pipe.ensemble_depth(members[:, None], True, True, output_uncertainty=True, reduction="median")

    # No warm-up call: neither has one-off costs worth one more (slow) scipy solve.
    t = interleave({"closed_form": ours, "scipy_bfgs": theirs}, s.rounds, s.device, warmup=0)
    a = ours().depth[0].float()
    b = theirs()[0][0, 0].float()
    return {"speedup": median(t["scipy_bfgs"]) / median(t["closed_form"]),
            "mean_abs_diff": float((a - b).abs().mean()), "times_s": t,
            "pixels": int(members.shape[-1] * members.shape[-2])}


def tiny_decoder_effect(model, decoder_dir, images, s: EngineSettings) -> dict:
    """Full VAE decoder vs AutoencoderTiny on the same depth latents: time and mean |diff|."""
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_pretrained(decoder_dir, torch_dtype=model.dtype).to(model.device).eval()
    view = _views(images, model)
    x, _ = model.preprocess(view.to(model.device))
    lat = model.encode(x).repeat(s.batch_size, 1, 1, 1)  # [B,4,h,w]
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    depth_lat = model.denoise(lat, noise, list(range(s.batch_size)), s.steps)

    def decode(dec):
        model.vae_decoder = dec
        try:
            return model.decode(depth_lat)
        finally:
            model.vae_decoder = None

    t = interleave({"full_vae": lambda: decode(None), "tiny_vae": lambda: decode(taesd)}, s.rounds, s.device)
    diff = (decode(taesd).float() - decode(None).float()).abs().mean()
    return {"speedup": median(t["full_vae"]) / median(t["tiny_vae"]), "mean_abs_diff": float(diff),
            "times_s": t}


# ------------------------------------------------------------------------- 3. UNet FLOPs
def peak_bf16_tflops(device: str) -> tuple[str, float | None]:
    if not device.startswith("cuda"):
        return "cpu", None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return name, peak
    return name, None


def unet_throughput(model, s: EngineSettings, rounds: int, latent: tuple[int, int] | None = None) -> dict:
    """FLOPs of one UNet call on a full batch (FlopCounterMode), its median time, TFLOP/s.
    `latent`: (h, w) of the latent; default square at the processing resolution (a compiled
    model is timed at the shape it was compiled for, so it does not recompile)."""
    from benchmarks.flops import count_flops

    h, w = latent or (s.resolution // model.vae_scale_factor,) * 2
    b = s.batch_size
    x = torch.randn(b, 8, h, w, device=model.device, dtype=model.dtype)  # [B,8,h,w]
    if getattr(model, "channels_last", False):
        x = x.contiguous(memory_format=torch.channels_last)
    text = model.empty_text_embedding.expand(b, -1, -1)  # [B,2,D]
    model.scheduler.set_timesteps(s.steps, device=model.device)
    t = model.scheduler.timesteps[0]

    @torch.no_grad()
    def call():
        return model.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]

    # Counted on one sample and scaled (every op is per sample): the math attention used
    # for counting would otherwise hold a full-batch attention matrix (~14 GB at SD2, 768 px).
    x1, text1 = x[:1], text[:1]
    flops = b * count_flops(lambda: model.unet(x1, t, encoder_hidden_states=text1, return_dict=False))
    times = interleave({"unet": call}, rounds, s.device)["unet"]
    tflops = flops / median(times) / 1e12
    name, peak = peak_bf16_tflops(s.device)
    return {"flops_per_call": flops, "batch": b, "latent": [h, w], "seconds_per_call": median(times),
            "achieved_tflops": tflops, "device_name": name, "bf16_peak_tflops": peak,
            "fraction_of_bf16_peak": (tflops / peak) if peak else None}


# ------------------------------------------------------------------------- 4. CUDA-only
def _model_batch(model, images, s: EngineSettings):
    view = _views(images, model)
    v = view.repeat(s.batch_size, 1, 1, 1)
    seeds = list(range(s.batch_size))
    return lambda: model(v, seeds, num_inference_steps=s.steps)


def dtype_effect(folder, bf16_model, images, s: EngineSettings) -> dict:
    """bf16 vs float32 weights/compute for one full batch of members; mean |diff| of depth."""
    fp32 = load_engine(folder, EngineSettings(**{**s.__dict__, "dtype": "float32"}))
    a, b = _model_batch(bf16_model, images, s), _model_batch(fp32, images, s)
    t = interleave({"bfloat16": a, "float32": b}, s.rounds, s.device)
    diff = float((a() - b()).abs().mean())
    del fp32
    torch.cuda.empty_cache()
    return {"speedup": median(t["float32"]) / median(t["bfloat16"]), "mean_abs_diff": diff, "times_s": t}


def channels_last_effect(folder, model, images, s: EngineSettings) -> dict:
    """The model (channels_last on CUDA) vs a second copy switched to contiguous layout."""
    other = load_engine(folder, s)
    other.set_channels_last(False)
    t = interleave({"channels_last": _model_batch(model, images, s),
                    "contiguous": _model_batch(other, images, s)}, s.rounds, s.device)
    del other
    torch.cuda.empty_cache()
    return {"speedup": median(t["contiguous"]) / median(t["channels_last"]), "times_s": t}


def ensemble_device_effect(images, s: EngineSettings, members: int = 10) -> dict:
    """Ensembling 10 members of one view at processing size on the CPU (where it ran before
    predict_views) vs on the model's device (where it runs now)."""
    from depthray.ensemble import ensemble_depth
    from depthray.tiling import fit_long_side

    h, w = fit_long_side(*images[0].shape[:2], s.resolution, upscale=True)
    cpu = torch.rand(1, members, h, w, generator=torch.Generator().manual_seed(0))  # [1,E,h,w]
    dev = cpu.to(s.device)
    t = interleave({"cpu": lambda: ensemble_depth(cpu, "median"),
                    "device": lambda: ensemble_depth(dev, "median")}, s.rounds, s.device)
    return {"speedup": median(t["cpu"]) / median(t["device"]), "cpu_s": median(t["cpu"]), "times_s": t}


def compile_effect(compiled, model, images, s: EngineSettings) -> dict:
    """The compiled engine vs the eager one on one full batch of members (same weights)."""
    run_c, run_e = _model_batch(compiled, images, s), _model_batch(model, images, s)
    t = interleave({"compiled": run_c, "eager": run_e}, s.rounds, s.device)
    return {"speedup": median(t["eager"]) / median(t["compiled"]),
            "mean_abs_diff": float((run_c() - run_e()).abs().mean()), "times_s": t}
