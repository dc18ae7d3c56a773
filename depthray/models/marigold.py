"""The Marigold depth engine: diffusers' model classes, our own batched denoising loop.

Numerically it is diffusers' ``MarigoldDepthPipeline`` with ensemble_size=1 (a parity test
holds it to that); what differs is the batching. One call takes views from many images and
ensemble members at once: each distinct view is VAE-encoded once (members are repeats of
a view with other seeds) and its latent reused, the empty-prompt embedding is computed
once at load, and every member gets its own noise generator so results do not depend on
how requests were grouped into batches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from depthray.models.base import check_view_tensor, check_views
from depthray.models.checkpoints import checkpoint_defaults, resolve_checkpoint
from depthray.models.latent_cache import LatentCache
from depthray.models.kinds import MARIGOLD, ModelKind
from depthray.precision import resolve_device

log = logging.getLogger(__name__)

def pick_device(device: str = "auto") -> torch.device:
    return resolve_device(device)


def pick_dtype(dtype: str, device: torch.device, kind: ModelKind = MARIGOLD) -> torch.dtype:
    """auto: what the kind's entry in depthray/models/kinds.py says (bf16 on CUDA, float32 on CPU)."""
    return kind.torch_dtype(dtype, device.type)


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial depth latents [N,*shape], float32 on CPU, one generator per seed.

    Drawn on the CPU so the same seed gives the same noise on every device and batch.
    """
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
    return out


_STEP_TAG = 0x5EED57E9  # separates step streams from any other use of a SeedSequence on the seed


def step_seed(seed: int, step: int) -> int:
    """Seed of the noise one member's scheduler draws at one denoising step (multi-step LCM).

    A hash of (seed, step) through numpy's SeedSequence, not seed + k: member seeds are
    consecutive integers (predict.member_seed), so any small offset would give one member's
    step noise the next member's initial noise and correlate the ensemble.
    """
    state = np.random.SeedSequence([int(seed), _STEP_TAG, int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % (2**63)


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host -> device copy; to CUDA through pinned memory without blocking the host, so the
    copy overlaps the GPU work already queued (CUDA streams keep the order)."""
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device, dtype) if dtype is not None else x.to(device)


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device; cast only when needed (from_pretrained already loads in `dtype`)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.to(device).eval()


class MarigoldDepthModel:
    """Marigold depth estimation with the depthray model interface (see models/base.py)."""

    kind = MARIGOLD  # its facts (dtype `auto`, steps, checkpoint marker): models/kinds.py

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler: Any,
        empty_text_embedding: torch.Tensor,
        *,
        processing_resolution: int,
        default_num_inference_steps: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_decoder: torch.nn.Module | None = None,
        name: str = "marigold",
        max_batch_size: int | None = None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _to(unet, self.device, dtype)
        self.vae = _to(vae, self.device, dtype)
        self.vae_decoder = _to(vae_decoder, self.device, dtype) if vae_decoder is not None else None
        self.scheduler = scheduler
        self.empty_text_embedding = empty_text_embedding.to(self.device, dtype)  # [1,T,D]
        self.processing_resolution = int(processing_resolution)
        # The checkpoint's default; a call may ask for other steps (a call argument, never
        # model state, so concurrent or nested callers cannot change each other's settings).
        self.default_num_inference_steps = int(default_num_inference_steps)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.name = name
        self.max_batch_size = max_batch_size
        self._cache = LatentCache()
        self.compiled = False
        # channels_last helps cuDNN convolutions on tensor cores; SDPA attention is the
        # default attention processor in diffusers on torch >= 2.
        self.channels_last = False
        self.set_channels_last(self.device.type == "cuda")

    def set_channels_last(self, on: bool) -> None:
        """Switch the UNet and VAE weights (and UNet inputs) to channels_last or back."""
        fmt = torch.channels_last if on else torch.contiguous_format
        for module in (self.unet, self.vae, self.vae_decoder):
            if module is not None:
                module.to(memory_format=fmt)
        self.channels_last = on

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile the UNet and both VAE halves (in place; the first call per shape is slow).

        The decoder matters as much as the UNet at 1-step settings: it runs at full
        resolution once per member, and compiling fuses its GroupNorm+SiLU and residual
        adds (on a 2-core CPU: UNet -11%, decoder -26%, see docs/performance.md).
        `dynamic=None` is PyTorch's automatic dynamic shapes: the first shape is compiled
        static, a second shape (another aspect ratio) compiles one shape-generic graph,
        so a dataset of mixed sizes does not recompile per size or hit the recompile limit
        (the UNet branches on latent sides divisible by its up-sampling factor, so there is
        one graph per divisibility class, at most four).
        """
        self.unet = torch.compile(self.unet, dynamic=None, backend=backend)
        for vae in (self.vae, self.vae_decoder):
            if vae is None:
                continue
            for part in ("encoder", "decoder"):
                if getattr(vae, part, None) is not None:
                    setattr(vae, part, torch.compile(getattr(vae, part), dynamic=None, backend=backend))
        self.compiled = True

    def clear_cache(self) -> None:
        """Forget the encoded views (benchmarks use it so repeated runs pay every encode)."""
        self._cache = LatentCache(self._cache.capacity)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_model_config(cls, folder: str | Path, m) -> "MarigoldDepthModel":
        """Built from the `model:` section's settings this engine takes (models/kinds.py loads it)."""
        return cls.from_pretrained(folder, dtype=m.dtype, variant=m.variant, device=m.device,
                                   processing_resolution=m.processing_resolution, vae_decoder=m.vae_decoder,
                                   compile=m.compile, name=m.path)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        dtype: str = "auto",
        variant: str | None = None,
        device: str = "auto",
        processing_resolution: int | None = None,
        vae_decoder: str | None = None,
        compile: bool = False,
        name: str | None = None,
    ) -> "MarigoldDepthModel":
        """Load a diffusers-layout Marigold checkpoint folder (unet, vae, scheduler, text)."""
        import diffusers

        from depthray.models.empty_prompt import empty_prompt_embedding

        # Loading progress bars would flood worker logs (one per actor start).
        diffusers.utils.logging.disable_progress_bar()

        folder = Path(folder)
        index_path = folder / "model_index.json"
        if not index_path.exists():
            raise FileNotFoundError(f"{folder}: no model_index.json; not a diffusers checkpoint")
        index = json.loads(index_path.read_text())
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev, cls.kind)
        kw = dict(torch_dtype=torch_dtype, variant=variant)

        # 1. Denoiser and autoencoder, with the classes the checkpoint names.
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        if unet.config.in_channels != 8:
            raise ValueError(f"{folder}: unet has {unet.config.in_channels} input channels; Marigold has 8")
        vae_cls = getattr(diffusers, index.get("vae", ["diffusers", "AutoencoderKL"])[1])
        vae = vae_cls.from_pretrained(folder, subfolder="vae", **kw)
        sched_cls = getattr(diffusers, index.get("scheduler", ["diffusers", "DDIMScheduler"])[1])
        scheduler = sched_cls.from_pretrained(folder, subfolder="scheduler")

        # 2. The empty-prompt embedding, once per checkpoint and machine (cached); the text
        # encoder is never kept.
        empty = empty_prompt_embedding(folder, variant)

        decoder = None
        if vae_decoder:
            decoder = diffusers.AutoencoderTiny.from_pretrained(resolve_checkpoint(vae_decoder),
                                                                torch_dtype=torch_dtype)

        defaults = checkpoint_defaults(folder)
        model = cls(
            unet,
            vae,
            scheduler,
            empty,
            processing_resolution=processing_resolution or defaults.processing_resolution,
            default_num_inference_steps=defaults.denoising_steps,
            device=dev,
            dtype=torch_dtype,
            vae_decoder=decoder,
            name=name or str(folder),
        )
        if compile:
            model.compile()
        log.info("loaded %s on %s (%s), %d px, %d steps", model.name, dev, torch_dtype,
                 model.processing_resolution, model.default_num_inference_steps)
        return model

    # ------------------------------------------------------------------ stages
    def preprocess(self, views: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[N,3,h,w] in [0,1] -> [N,3,PPH,PPW] in [-1,1] at processing res, and its padding."""
        x = views * 2.0 - 1.0
        h, w = x.shape[-2:]
        res = self.processing_resolution
        if res > 0:
            new_h, new_w = h * res // max(h, w), w * res // max(h, w)
            if new_h == 0 or new_w == 0:
                raise ValueError(f"extreme aspect ratio {w}x{h}: resizing to {res} px gives an empty side")
            x = F.interpolate(x, (new_h, new_w), mode="bilinear", antialias=True)  # [N,3,PH,PW]
        ph, pw = self.padding(h, w) if res > 0 else self.padding(*x.shape[-2:])
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")  # [N,3,PPH,PPW]
        return x, (ph, pw)

    # diffusers pads the processed image to a multiple of the VAE's factor with replicated
    # edges and crops the prediction back; a subclass whose authors feed the VAE the odd size
    # (e2e-ft) turns it off.
    pad_to_vae_multiple = True

    def padding(self, h: int, w: int) -> tuple[int, int]:
        """Padding preprocess() adds to an [h,w] view (computed without resizing anything)."""
        res = self.processing_resolution
        if res > 0:
            h, w = h * res // max(h, w), w * res // max(h, w)
        if not self.pad_to_vae_multiple:
            return 0, 0
        return -h % self.vae_scale_factor, -w % self.vae_scale_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,PPH,PPW] in [-1,1] -> image latents [B,4,h,w] (distribution mode, scaled)."""
        out = self.vae.encode(to_device(images, self.device, self.dtype))
        latent = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return latent * self.scaling_factor

    @torch.no_grad()
    def denoise(self, image_latent: torch.Tensor, noise: torch.Tensor, seeds: list[int],
                num_inference_steps: int | None = None) -> torch.Tensor:
        """DDIM/LCM steps on the depth latent: [B,4,h,w] x2 -> [B,4,h,w]."""
        b = image_latent.shape[0]
        text = self.empty_text_embedding.expand(b, -1, -1)  # [B,2,D]
        latent = to_device(noise, self.device, self.dtype)
        self.scheduler.set_timesteps(self.steps(num_inference_steps), device=self.device)
        for k, t in enumerate(self.scheduler.timesteps):
            # Stochastic schedulers (multi-step LCM) draw from one generator per member and
            # step: independent of batching, of the other members and of the other steps.
            gens = [torch.Generator().manual_seed(step_seed(s, k)) for s in seeds]
            x = torch.cat([image_latent, latent], dim=1)  # [B,8,h,w]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pred = self.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]  # [B,4,h,w]
            latent = self.scheduler.step(pred, t, latent, generator=gens).prev_sample
        return latent

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Depth latent [B,4,h,w] -> depth [B,PPH,PPW] in [0,1] (channel mean, clipped)."""
        vae = self.vae_decoder or self.vae
        img = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]  # [B,3,PPH,PPW]
        depth = img.mean(dim=1)  # [B,PPH,PPW]
        # An overflowing (float16) decoder gives +-inf: clamping first would turn it into a
        # valid-looking far or near pixel. Made NaN, it reaches predict.py's finiteness check
        # and the image becomes a `non_finite` error row instead of a label.
        nan = float("nan")
        depth = torch.nan_to_num(depth, nan=nan, posinf=nan, neginf=nan).clamp(-1.0, 1.0)
        return (depth + 1.0) / 2.0

    def finish_members(self, depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decoded, cropped members [B,PH,PW] -> [B,h,w] at the view's size, as diffusers'
        pipeline brings a prediction back (bilinear, no antialiasing)."""
        return F.interpolate(depth.unsqueeze(1), size, mode="bilinear")[:, 0]

    def steps(self, num_inference_steps: int | None) -> int:
        """Denoising steps of a call: the argument, else the checkpoint's default."""
        return int(num_inference_steps or self.default_num_inference_steps)

    # ------------------------------------------------------------------ interface
    def __call__(self, views: torch.Tensor, seeds: list[int], num_inference_steps: int | None = None) -> torch.Tensor:
        """One member per view: [N,3,h,w] in [0,1] + N seeds -> [N,h,w] float32 in [0,1] (CPU).

        Members repeat a view with other seeds; repeats are found here (cheap fingerprint,
        then an exact compare) so each distinct view is encoded once.
        """
        check_views(views, seeds)
        views = views.float().cpu()
        keys = [LatentCache.key(v) for v in views]
        first: list[int] = []  # row of each distinct view
        index: list[int] = []  # member -> distinct view
        for i, k in enumerate(keys):
            j = next((u for u, r in enumerate(first) if keys[r] == k and torch.equal(views[r], views[i])), None)
            if j is None:
                first.append(i)
                j = len(first) - 1
            index.append(j)
        return self.predict_views(views[first], index, seeds, num_inference_steps).cpu()

    def predict_views(self, views: torch.Tensor, index: list[int], seeds: list[int],
                      num_inference_steps: int | None = None) -> torch.Tensor:
        """Members of distinct views, left on the model's device.

        views: [U,3,h,w] in [0,1], each a different view; member n is views[index[n]] with
        seeds[n]. Returns [N,h,w] float32 in [0,1] on the model's device. What predict.py
        calls: a view crosses to the device and is encoded once however many members it
        has (no per-member copies or fingerprints on the host), and the members are
        ensembled and fused where they are, so only finished maps cross back.
        """
        if len(index) != len(seeds):
            raise ValueError(f"need one seed per member: {len(index)} members, {len(seeds)} seeds")
        check_view_tensor(views)
        if index and not 0 <= min(index) <= max(index) < views.shape[0]:
            raise ValueError(f"index must point into the {views.shape[0]} views, got {min(index)}..{max(index)}")
        views = views.float().cpu()
        n = len(index)
        step = self.max_batch_size or max(n, 1)
        outs = []
        for start in range(0, n, step):
            chunk = index[start : start + step]
            used = sorted(set(chunk))
            local = {u: k for k, u in enumerate(used)}
            outs.append(self._predict_batch(views[used], [local[u] for u in chunk],
                                            list(seeds[start : start + step]), num_inference_steps))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _predict_batch(self, views: torch.Tensor, index: list[int], seeds: list[int],
                       num_inference_steps: int | None) -> torch.Tensor:
        """views [U,3,h,w] distinct (CPU), member n = views[index[n]] -> [N,h,w] on the device."""
        h, w = views.shape[-2:]
        # 1. Distinct views already encoded by an earlier call come from the cache.
        keys = [LatentCache.key(v) for v in views]
        latents: dict[int, torch.Tensor] = {}
        to_encode: list[int] = []
        for u, k in enumerate(keys):
            cached = self._cache.get(k, views[u])
            if cached is not None:
                latents[u] = cached
            else:
                to_encode.append(u)
        # 2. Preprocess (on the device) + VAE-encode the new ones.  [U,3,PPH,PPW] -> [U,4,h/8,w/8]
        padding = self.padding(h, w)
        if to_encode:
            images, _ = self.preprocess(to_device(views[to_encode], self.device))
            enc = self.encode(images)
            for row, u in enumerate(to_encode):
                latents[u] = enc[row : row + 1]
                self._cache.put(keys[u], views[u].clone(), latents[u])
        image_latent = torch.cat([latents[u] for u in index])  # [B,4,h,w]
        # 3. Denoise from seeded noise.
        noise = initial_noise(seeds, tuple(image_latent.shape[1:]))  # [B,4,h,w]
        latent = self.denoise(image_latent, noise, seeds, num_inference_steps)
        # 4. Decode, unpad, back to the view size.
        depth = self.decode(latent).float()  # [B,PPH,PPW]
        ph, pw = padding
        depth = depth[:, : depth.shape[1] - ph, : depth.shape[2] - pw]  # [B,PH,PW]
        return self.finish_members(depth, (h, w)).clamp(0.0, 1.0)  # [B,h,w]
