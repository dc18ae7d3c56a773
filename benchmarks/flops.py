"""Where Marigold's compute goes, per image, and what a GPU can do at best: FLOP arithmetic.

    python benchmarks/flops.py [--preset sd2|tiny | --checkpoint DIR] [--size 768x576]
                               [--settings 1x1,1x10,4x5] [--gpu-tflops 989] [--efficiency 0.5] [--json]

Counts the FLOPs of one VAE encode, one UNet evaluation and one VAE decode (full VAE and
TAESD) at the processing size, with torch's FlopCounterMode on the meta device: the real
module graphs at the real sizes, no weights and no compute, so it runs in a second on any
machine. Per image: 1 encode + members x steps UNet evaluations + members decodes (what
the engine does; tiling multiplies by views per image, see `depthray plan`).

The GPU columns are a compute bound, NOT a measurement: seconds = FLOPs / (peak x
efficiency). Use them to size a job before a GPU is at hand; measure with
`python benchmarks/run.py --device cuda --model sd2-random` (or `depthray plan --measure`)
when one is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_meta_modules(preset: str = "sd2", checkpoint: str | None = None) -> dict:
    """UNet, VAE and TAESD on the meta device (shapes only), from a preset or a checkpoint's configs."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    from depthray.models.tiny import PRESETS

    with torch.device("meta"):
        if checkpoint:
            root = Path(checkpoint)
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        else:
            p = PRESETS[preset]
            unet = UNet2DConditionModel(sample_size=96, in_channels=8, out_channels=4,
                                        use_linear_projection=True, **p["unet"])
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, **p["vae"])
        taesd = AutoencoderTiny()  # TAESD's real widths
    return {"unet": unet, "vae": vae, "taesd": taesd}


def count_flops(fn) -> int:
    """FLOPs of fn() (attention included: torch has no FLOP formula for the CPU flash
    kernel, so attention runs through the math backend while counting)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


def per_view_flops(modules: dict, height: int, width: int) -> dict[str, int]:
    """FLOPs of each stage for one view of height x width pixels (multiples of 8)."""
    unet, vae, taesd = modules["unet"], modules["vae"], modules["taesd"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // scale, width // scale
    meta = dict(device="meta")
    image = torch.empty(1, 3, height, width, **meta)
    latent = torch.empty(1, 4, h, w, **meta)
    text = torch.empty(1, 2, unet.config.cross_attention_dim, **meta)  # "" -> [BOS, EOS]
    unet_in = torch.empty(1, 8, h, w, **meta)
    return {
        "vae_encode": count_flops(lambda: vae.encode(image)),
        "unet": count_flops(lambda: unet(unet_in, 10, encoder_hidden_states=text)),
        "vae_decode": count_flops(lambda: vae.decode(latent)),
        "taesd_decode": count_flops(lambda: taesd.decode(latent)),
    }


def per_image(view: dict[str, int], steps: int, members: int, tiny_decoder: bool = False) -> dict[str, float]:
    decode = view["taesd_decode" if tiny_decoder else "vae_decode"]
    parts = {"encode": view["vae_encode"], "unet": members * steps * view["unet"], "decode": members * decode}
    total = sum(parts.values())
    return {"tflop": total / 1e12, **{f"{k}_share": v / total for k, v in parts.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="sd2", choices=("sd2", "tiny"))
    src.add_argument("--checkpoint", help="a diffusers Marigold folder (only its unet/vae configs are read)")
    ap.add_argument("--size", default="768x576", help="processed view WxH (768x576 = a 4:3 image at 768 px)")
    ap.add_argument("--settings", default="1x1,1x10,4x5", help="STEPSxMEMBERS, comma separated")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--efficiency", type=float, default=0.5, help="fraction of peak assumed for the bound")
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    args = ap.parse_args(argv)

    width, height = (int(v) for v in args.size.lower().split("x"))
    view = per_view_flops(build_meta_modules(args.preset, args.checkpoint), height, width)
    rate = args.gpu_tflops * args.efficiency
    rows = []
    for item in args.settings.split(","):
        steps, members = (int(v) for v in item.lower().split("x"))
        for tiny in (False, True):
            r = per_image(view, steps, members, tiny)
            seconds = r["tflop"] / rate
            rows.append({"steps": steps, "members": members, "decoder": "taesd" if tiny else "vae", **r,
                         "images_per_s_bound": 1 / seconds, "gpu_hours_per_million_bound": seconds * 1e6 / 3600})
    result = {"model": args.checkpoint or args.preset, "view": [width, height],
              "per_view_tflop": {k: v / 1e12 for k, v in view.items()},
              "gpu_tflops": args.gpu_tflops, "efficiency": args.efficiency, "per_image": rows}
    if not args.json:
        print(f"FLOPs per view at {width}x{height} ({result['model']}): "
              + ", ".join(f"{k} {v:.2f} TFLOP" for k, v in result["per_view_tflop"].items()))
        print(f"Compute bound at {args.efficiency:.0%} of {args.gpu_tflops:g} TFLOP/s (arithmetic, not a measurement):")
        print(f"  {'steps':>5} {'members':>7} {'decoder':>7} {'TFLOP/img':>9} {'enc':>5} {'unet':>5} {'dec':>5} "
              f"{'img/s':>7} {'GPU-h/1M':>9}")
        for r in rows:
            print(f"  {r['steps']:>5} {r['members']:>7} {r['decoder']:>7} {r['tflop']:>9.2f} {r['encode_share']:>5.0%} "
                  f"{r['unet_share']:>5.0%} {r['decode_share']:>5.0%} {r['images_per_s_bound']:>7.1f} "
                  f"{r['gpu_hours_per_million_bound']:>9.1f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
