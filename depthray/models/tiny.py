"""Random-weight Marigold checkpoints with the exact architecture, built locally.

``tiny`` has Marigold's layout and code path (8-channel-input SD2-style UNet with linear
attention projections, 4-level VAE with scale factor 8, CLIP text encoder + tokenizer,
DDIM or LCM scheduler, diffusers ``model_index.json``) at toy widths, for tests and the
offline demo. ``sd2`` has Stable Diffusion 2's real widths, so GPU timings carry the real
FLOPs. Their depth is meaningless: the weights are random. Nothing is downloaded.

    python -m depthray.models.tiny OUT_DIR [--preset tiny|sd2] [--scheduler ddim|lcm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PRESETS = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
            cross_attention_dim=32,
        ),
        vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        processing_resolution=768,
    ),
    # Stable Diffusion 2 (the base of Marigold): UNet 865M, VAE 84M, OpenCLIP-H text encoder.
    "sd2": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=(5, 10, 20, 20),
            norm_num_groups=32,
            cross_attention_dim=1024,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        processing_resolution=768,
    ),
}

# Marigold v1-1's scheduler settings (trailing timesteps, v-prediction).
DDIM_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=False,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tiny_clip_vocab() -> tuple[dict[str, int], str]:
    """A byte-level vocabulary: every byte alone and word-final, plus CLIP's specials."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, "#version: 0.2\n"


def _calibrate_latent_scale(vae, size: int = 64) -> None:
    """Set the VAE's scaling_factor so image latents have unit variance, as SD's 0.18215 does.

    A random VAE's latents are tiny; scaled by SD's factor they would vanish next to the
    unit-variance depth noise and the UNet's output would barely depend on the image.
    """
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, size, size, generator=gen) * 2 - 1
    with torch.no_grad():
        std = float(vae.encode(images).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))


def build_components(preset: str = "tiny", scheduler: str = "ddim", seed: int = 0) -> dict:
    """Instantiate random-weight Marigold components (not saved)."""
    from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=96,
        in_channels=8,  # image latent + noisy depth latent
        out_channels=4,
        use_linear_projection=True,  # as SD2
        **p["unet"],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=768,
        scaling_factor=0.18215,
        **p["vae"],
    )
    _calibrate_latent_scale(vae)
    vocab, merges = _tiny_clip_vocab()
    text_cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_act="gelu",
        projection_dim=p["text"]["hidden_size"],
        **p["text"],
    )
    text_encoder = CLIPTextModel(text_cfg)
    if scheduler == "ddim":
        sched = DDIMScheduler(**DDIM_CONFIG)
        steps = 4
    elif scheduler == "lcm":
        cfg = {k: v for k, v in DDIM_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
        cfg["prediction_type"] = "v_prediction"
        sched = LCMScheduler(**cfg)
        steps = 1
    else:
        raise ValueError(f"scheduler must be ddim or lcm, got {scheduler!r}")
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=sched,
        vocab=vocab,
        merges=merges,
        default_denoising_steps=steps,
        default_processing_resolution=p["processing_resolution"],
    )


def _make_tokenizer(vocab: dict[str, int], merges: str, workdir: Path):
    from transformers import CLIPTokenizer

    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text(merges)
    return CLIPTokenizer(
        vocab_file=str(workdir / "vocab.json"),
        merges_file=str(workdir / "merges.txt"),
        model_max_length=77,
    )


def build_tiny_marigold(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    scheduler: str = "ddim",
    seed: int = 0,
    processing_resolution: int | None = None,
) -> Path:
    """Build a random-weight Marigold checkpoint and save it in diffusers layout.

    The folder appears complete or not at all (built in a temporary folder, then renamed).
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists():  # refused before diffusers' seconds of imports
        raise FileExistsError(f"{out} already holds a checkpoint")
    import diffusers
    from diffusers import MarigoldDepthPipeline

    diffusers.utils.logging.disable_progress_bar()
    c = build_components(preset, scheduler, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        tokenizer = _make_tokenizer(c["vocab"], c["merges"], tmp)
        pipe = MarigoldDepthPipeline(
            unet=c["unet"],
            vae=c["vae"],
            scheduler=c["scheduler"],
            text_encoder=c["text_encoder"],
            tokenizer=tokenizer,
            prediction_type="depth",
            scale_invariant=True,
            shift_invariant=True,
            default_denoising_steps=c["default_denoising_steps"],
            default_processing_resolution=processing_resolution or c["default_processing_resolution"],
        )
        ckpt = tmp / "checkpoint"
        pipe.save_pretrained(ckpt, safe_serialization=True)
        (ckpt / "DEPTHRAY_RANDOM_WEIGHTS.txt").write_text(
            f"Random weights (preset={preset}, scheduler={scheduler}, seed={seed}). "
            "Depth predicted by this model is meaningless; it exists for tests and demos.\n"
        )
        if out.exists():
            out.rmdir()  # only an empty folder may be replaced
        os.replace(ckpt, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_vae_decoder(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """A random-weight AutoencoderTiny (TAESD architecture) for `model.vae_decoder`.

    preset "sd2" has TAESD's real widths (for timing); "tiny" is a toy for tests.
    """
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    if preset == "tiny":
        taesd = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    else:
        taesd = AutoencoderTiny()
    taesd.save_pretrained(out_dir)
    return Path(out_dir)


def default_tiny_model_dir() -> Path:
    from depthray.models.checkpoints import default_cache_dir

    return default_cache_dir() / "models" / "tiny-marigold"


def ensure_tiny_model(path: str | os.PathLike | None = None) -> Path:
    """Return a tiny checkpoint folder, building it once if missing (safe to race)."""
    out = Path(path) if path is not None else default_tiny_model_dir()
    if (out / "model_index.json").exists():
        return out
    try:
        return build_tiny_marigold(out)
    except (FileExistsError, OSError):
        if (out / "model_index.json").exists():  # another process won the race
            return out
        raise


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--scheduler", choices=("ddim", "lcm"), default="ddim")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_tiny_marigold(args.out_dir, args.preset, args.scheduler, args.seed))


if __name__ == "__main__":
    main()
