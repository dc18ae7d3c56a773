"""End-to-end fine-tuned Marigold (Garcia, Zeng et al., "Fine-Tuning Image-Conditional
Diffusion Models is Easier than You Think"; checkpoints such as GonzaloMG/marigold-e2e-ft-depth).

Same architecture and diffusers layout as Marigold, but fine-tuned end to end for one
deterministic step. Inference is the authors' (their Marigold `run.py` and pipeline), not
the checkpoint's scheduler class: a `DDIMScheduler` built from the checkpoint's scheduler
config with `timestep_spacing="trailing"` forced, the depth latent starting as zeros (no
noise), the processed image fed to the VAE at its own size (no padding to a multiple of 8,
unlike diffusers' Marigold pipeline), one step (t = num_train_timesteps - 1 = 999), decoded
and channel-averaged as Marigold, then each prediction min-max normalised to [0,1] at the
decoder's size and resized back.
`tests/conformance/test_e2e.py` holds this to a reference written from the authors' code.

Members of one view are identical (nothing is random), so `deterministic = True`:
predict.py ensembles such models over test-time augmentations (depthray/augment.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depthray.models.kinds import MARIGOLD_E2E, is_end_to_end  # noqa: F401 - where callers found it
from depthray.models.marigold import MarigoldDepthModel


class MarigoldE2EModel(MarigoldDepthModel):
    """Single-step, zero-noise Marigold with the depthray model interface."""

    deterministic = True
    kind = MARIGOLD_E2E

    def __init__(self, *args, **kwargs):
        from diffusers import DDIMScheduler

        super().__init__(*args, **kwargs)
        # The authors build DDIM from the checkpoint's scheduler config whatever class it names,
        # with trailing spacing forced, so one step always lands on the last training timestep.
        self.scheduler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        pred = self.scheduler.config.prediction_type
        if pred not in ("v_prediction", "epsilon", "sample"):
            raise ValueError(f"{self.name}: scheduler prediction_type {pred!r} is not one an "
                             "end-to-end checkpoint can be read with (v_prediction, epsilon, sample)")
        self.prediction_type = pred
        self.scheduler.set_timesteps(1)
        self.timestep = int(self.scheduler.timesteps[0])  # 999 for Marigold's 1000 training steps
        self.default_num_inference_steps = 1

    # The authors feed the VAE the processed image as it is (no padding to a multiple of 8)
    # and resize the decoder's output back.
    pad_to_vae_multiple = False

    def finish_members(self, depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The authors' single-prediction ending: each member min-max normalised to [0,1] (all
        zeros when constant) at the decoder's size, then resized to the view (bilinear,
        antialiased when shrinking)."""
        flat = depth.flatten(1)
        lo = flat.amin(dim=1).view(-1, 1, 1)
        rng = flat.amax(dim=1).view(-1, 1, 1) - lo
        depth = torch.where(rng > 0, (depth - lo) / rng.clamp_min(torch.finfo(depth.dtype).tiny),
                            torch.zeros_like(depth))
        shrink = depth.shape[-2] > size[0] or depth.shape[-1] > size[1]
        return F.interpolate(depth.unsqueeze(1), size, mode="bilinear", antialias=shrink)[:, 0]

    def steps(self, num_inference_steps: int | None) -> int:
        if num_inference_steps not in (None, 1):
            raise ValueError(f"{self.name} is an end-to-end single-step checkpoint: "
                             f"num_inference_steps={num_inference_steps} is not defined for it; use 1 or null")
        return 1

    @torch.no_grad()
    def denoise(self, image_latent: torch.Tensor, noise: torch.Tensor, seeds: list[int],
                num_inference_steps: int | None = None) -> torch.Tensor:
        """One UNet call from zeros at t=999 -> x0 [B,4,h,w] (`noise` and `seeds` are unused)."""
        self.steps(num_inference_steps)
        b = image_latent.shape[0]
        text = self.empty_text_embedding.expand(b, -1, -1)  # [B,2,D]
        latent = torch.zeros_like(image_latent)  # x_t = 0
        x = torch.cat([image_latent, latent], dim=1)  # [B,8,h,w]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # The authors' step: their DDIM (trailing) set to one step, its own step from the zero
        # latent, so prediction_type and alpha settings are the checkpoint's config.
        self.scheduler.set_timesteps(1, device=self.device)
        t = self.scheduler.timesteps[0]
        out = self.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]  # [B,4,h,w]
        return self.scheduler.step(out, t, latent).prev_sample
