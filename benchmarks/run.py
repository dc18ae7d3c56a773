"""depthray throughput benchmarks: one entry point, one table, one JSON line.

    python benchmarks/run.py [--quick | --smoke] [--device cpu|cuda] [--model tiny|sd2-random|PATH]

Sections (each contender pair runs interleaved in this process, warm-up excluded, medians):
 1. engine vs diffusers' MarigoldDepthPipeline: same weights, images, members, steps,
    resolution, dtype, device, weight layout and batch size; diffusers gets the whole list
    of equal-size images in one call with its own batch_size, as its users call it;
 2. what each engine feature buys: batching across images, encode-once, closed-form
    ensembling, tiny VAE decoder, torch.compile (not in smoke mode); on CUDA also bf16, channels_last;
 3. UNet FLOPs per call, achieved TFLOP/s and (CUDA) the fraction of the GPU's bf16 peak;
 4. the Ray job vs a plain loop over the same stages (steady state), start-up, and peak
    memory on 10x the images vs 1x;
 5. tiled inference cost per megapixel at two image sizes.
The last line printed is a JSON object with every number (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _common, _engine  # noqa: E402
from benchmarks._engine import EngineSettings  # noqa: E402
from benchmarks._job import JobSettings  # noqa: E402
from benchmarks._tiling import TileSettings  # noqa: E402



def presets(mode: str, device: str, dtype: str) -> dict:
    """Sizes per mode. full = the issue's settings (768 px, 4 members, 4 steps)."""
    cuda = device.startswith("cuda")
    if mode == "smoke":
        eng = EngineSettings(device, dtype, resolution=64, ensemble_size=3, steps=1, batch_size=6, rounds=1)
        return dict(images=1, image_size=(48, 64), engine=eng, ablation_rounds=1, compile=False,
                    job=JobSettings(1, 2, (40, 56), 32, 2, 2, device),
                    tiles=TileSettings(((96, 128), (192, 256)), 48, 2, 8, 1, device))
    if mode == "quick":
        eng = EngineSettings(device, dtype, resolution=384, ensemble_size=4, steps=4, batch_size=8, rounds=3)
        return dict(images=2, image_size=(480, 640), engine=eng, ablation_rounds=3, compile=True,
                    job=JobSettings(1, 10, (240, 320), 256, 2, 4, device),
                    tiles=TileSettings(((384, 512), (768, 1024)), 256, 2, 8, 1, device))
    eng = EngineSettings(device, dtype, resolution=768, ensemble_size=4, steps=4,
                         batch_size=16 if cuda else 8, rounds=5 if cuda else 3)
    job = JobSettings(4, 8, (480, 640), 768, 4, 8, device) if cuda else JobSettings(1, 10, (480, 640), 384, 4, 4, device)
    tiles = TileSettings(((1536, 2048), (3072, 4096)), 768, 4, 16, 3, device) if cuda else \
        TileSettings(((768, 1024), (1536, 2048)), 384, 4, 8, 1, device)
    return dict(images=8 if cuda else 2, image_size=(480, 640), engine=eng, ablation_rounds=eng.rounds, compile=True,
                job=job, tiles=tiles)


# ------------------------------------------------------------------------- sections
def engine_sections(args, folder: Path, p: dict, table: list) -> dict:
    s: EngineSettings = p["engine"]
    ab = EngineSettings(**{**s.__dict__, "rounds": p["ablation_rounds"]})
    images = _common.scene_images(p["images"], *p["image_size"])
    model = _engine.load_engine(folder, s)
    pipe = _engine.load_diffusers(folder, s)
    compiled = None
    if p["compile"] and not args.no_compile:
        compiled = _engine.load_engine(folder, s)
        compiled.compile()
    out: dict = {}

    # 1. depthray engine vs diffusers (and the compiled engine, in the same rounds)
    r = _engine.engine_vs_diffusers(model, pipe, images, s, compiled)
    out["engine_vs_diffusers"] = r["ratio"]
    out["engine_vs_diffusers_compiled"] = r.get("ratio_compiled")
    out["engine"] = {k: v for k, v in r.items() if k not in ("ratio", "ratio_compiled")}
    # Like-for-like only without ensembling (benchmarks/gpu.py: HEADLINE_CELLS): at more than
    # one member diffusers' time is mostly its scipy ensembling, which depends on the members.
    out["engine_vs_diffusers_cell"] = {"steps": s.steps, "members": s.ensemble_size,
                                       "headline": s.ensemble_size == 1}
    sizes = f"{p['images']} images {p['image_size'][1]}x{p['image_size'][0]}"
    if s.ensemble_size > 1:
        sizes += f"; {s.ensemble_size} members: ensembling-bound, not like-for-like"
    table += [("engine", "depthray images/s", f"{r['depthray_images_per_s']:.3f}", _common.spread(r["times_s"]["depthray"]) + " s/run"),
              ("engine", "diffusers images/s", f"{r['diffusers_images_per_s']:.3f}", _common.spread(r["times_s"]["diffusers"]) + " s/run"),
              ("engine", "engine_vs_diffusers", f"{r['ratio']:.2f}x", f"{sizes}; default engine (eager)")]
    if compiled is not None:
        table += [("engine", "compiled images/s", f"{r['compiled_images_per_s']:.3f}",
                   _common.spread(r["times_s"]["depthray_compiled"]) + f" s/run; first call {r['compile_first_call_s']:.0f} s"),
                  ("engine", "engine_vs_diffusers_compiled", f"{r['ratio_compiled']:.2f}x", f"{sizes}; model.compile: true")]

    # 2. ablations
    abl: dict = {}
    abl["batching_across_images"] = _engine.batching_effect(model, images, ab)
    abl["encode_once"] = _engine.encode_once_effect(model, images, ab)
    abl["closed_form_ensembling"] = _engine.ensembling_effect(model, pipe, images, ab)
    abl["tiny_vae_decoder"] = _engine.tiny_decoder_effect(model, args.vae_decoder or _common.tiny_decoder_dir(args.model), images, ab)
    if args.device.startswith("cuda"):
        abl["bf16_vs_fp32"] = _engine.dtype_effect(folder, model, images, ab) if s.dtype != "float32" else None
        abl["channels_last"] = _engine.channels_last_effect(folder, model, images, ab)
        abl["ensemble_on_device"] = _engine.ensemble_device_effect(images, ab)
    else:
        abl.update(bf16_vs_fp32=None, channels_last=None, ensemble_on_device=None)
    abl["torch_compile"] = _engine.compile_effect(compiled, model, images, ab) if compiled is not None else None
    notes = {"batching_across_images": "per-image calls / one call for all images",
             "encode_once": f"{s.ensemble_size} members: encode each / encode once",
             "closed_form_ensembling": "diffusers scipy BFGS / closed form",
             "tiny_vae_decoder": "full VAE decode / AutoencoderTiny",
             "bf16_vs_fp32": "fp32 / bf16 (one batch)", "channels_last": "contiguous / channels_last",
             "torch_compile": "eager / compiled",
             "ensemble_on_device": "10 members, one view: CPU / GPU"}
    for name, r in abl.items():
        if r is None:
            why = "not in smoke mode / --no-compile" if name == "torch_compile" else "CUDA only"
            table.append(("ablation", name, "n/a", why))
            continue
        extra = f"; mean |diff| {r['mean_abs_diff']:.4f}" if "mean_abs_diff" in r else ""
        extra += f"; compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
        table.append(("ablation", name, f"{r['speedup']:.2f}x", notes[name] + extra))
    out["ablations"] = abl

    # 3. UNet FLOPs
    u = _engine.unet_throughput(model, s, p["ablation_rounds"])
    out["unet"] = u
    peak = f"{100 * u['fraction_of_bf16_peak']:.1f}% of {u['bf16_peak_tflops']:.0f} bf16 peak" if u["fraction_of_bf16_peak"] else "no bf16 peak (CPU or unknown GPU)"
    table += [("unet", "GFLOP per call", f"{u['flops_per_call'] / 1e9:.1f}", f"batch {u['batch']}, latent {u['latent'][0]}x{u['latent'][1]}"),
              ("unet", "achieved TFLOP/s", f"{u['achieved_tflops']:.3f}", f"{u['device_name']}; {peak}")]
    if args.device.startswith("cuda"):
        out["gpu_throughput"] = gpu_throughput(model, images, s, table)
    del model, pipe, compiled
    return out


def gpu_throughput(model, images, s: EngineSettings, table: list) -> dict:
    """Images/s at 1 step with 1 and 10 members, and GPU-hours per million images."""
    from depthray.predict import predict_images

    out = {}
    for e in (1, 10):
        cfg = {**s.inference(), "ensemble_size": e, "num_inference_steps": 1}

        def run():
            model.clear_cache()
            predict_images(images, model, cfg)

        t = _common.median(_common.interleave({"run": run}, s.rounds, s.device)["run"])
        ips = len(images) / t
        gpu_h = _common.gpu_hours_per_million(ips)
        out[f"members_{e}"] = {"images_per_s": ips, "gpu_hours_per_million": gpu_h}
        table.append(("gpu", f"1 step, {e} members", f"{ips:.2f} img/s", f"{gpu_h:.1f} GPU-h per 1M images"))
    return out


def job_section(args, folder: Path, p: dict, table: list) -> dict:
    from benchmarks._job import job_benchmark

    js: JobSettings = p["job"]
    with tempfile.TemporaryDirectory(prefix="depthray-bench-") as tmp:
        r = job_benchmark(folder, Path(tmp), js)
    setting = f"{js.images}/{10 * js.images} images {js.image_size[1]}x{js.image_size[0]}, {js.resolution} px, {js.ensemble_size} members"
    table += [("job", "ray steady images/s", f"{r['ray_images_per_s']:.3f}", setting),
              ("job", "loop steady images/s", f"{r['loop_images_per_s']:.3f}", "same stage functions, no Ray"),
              ("job", "pipeline_vs_engine", f"{r['pipeline_vs_engine']:.2f}x", "steady state: (10x-1x) images / (10x-1x) s"),
              ("job", "start-up", f"{r['ray_startup_s']['ray_init']:.1f} s + {r['ray_startup_s']['job_fixed']:.1f} s",
               "ray.init + fixed job cost (actor, model load, fill/drain)"),
              ("job", "actor busy fraction", f"{r['actor_busy_fraction_10x']:.2f} / {r['actor_busy_fraction_steady']:.2f}",
               "infer seconds / wall: whole 10x run / steady state (10x-1x)"),
              ("job", "actor busy, active span", f"{r['actor_busy_fraction_active'] or float('nan'):.3f}",
               "infer seconds / the inference operator's first-task-start to last-task-end (10x run)"),
              ("job", "rss_growth", f"{r['rss_growth']:.2f}", f"peak PSS {r['peak_pss_mb']['1x']:.0f} -> {r['peak_pss_mb']['10x']:.0f} MB")]
    return r


def tiling_section(args, folder: Path, p: dict, table: list) -> dict:
    from benchmarks._tiling import tiled_cost

    ts: TileSettings = p["tiles"]
    s: EngineSettings = p["engine"]
    model = _engine.load_engine(folder, EngineSettings(**{**s.__dict__, "resolution": ts.resolution}))
    r = tiled_cost(model, ts)
    for size, v in r.items():
        table.append(("tiling", f"{size} s/MP", f"{v['seconds_per_megapixel']:.2f}",
                      f"{ts.resolution} px tiles, {v['num_views']} views x {ts.ensemble_size} members, {v['seconds_per_evaluation']:.3f} s/eval, {v['fusion']}"))
    return r


# ------------------------------------------------------------------------- output
def print_table(rows: list[tuple[str, str, str, str]], header: str) -> None:
    print(header)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return round(x, 5)
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller resolution and fewer images (< 5 min on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="toy sizes, one round: checks the benchmark runs (CI)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="tiny", help="tiny | sd2-random | a diffusers Marigold folder")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--vae-decoder", default=None, help="AutoencoderTiny folder (default: random TAESD)")
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out the torch.compile'd engine (compiling takes ~1-2 min on a 2-core CPU)")
    ap.add_argument("--skip", action="append", default=[], choices=("engine", "job", "tiling"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    p = presets(mode, args.device, dtype)
    folder = _common.model_dir(args.model)
    t0, load0 = time.time(), _common.load_average()
    table: list = []
    result: dict = {"engine_vs_diffusers": None, "engine_vs_diffusers_compiled": None, "pipeline_vs_engine": None, "rss_growth": None,
                    "tiled_cost_per_megapixel": None}
    missing: list[str] = []

    sections: dict[str, float] = {}
    if "engine" not in args.skip:
        result.update(engine_sections(args, folder, p, table))
        sections["engine"] = time.time() - t0
    if "job" not in args.skip:
        t1 = time.time()
        try:
            job = job_section(args, folder, p, table)
            result.update(pipeline_vs_engine=job["pipeline_vs_engine"], rss_growth=job["rss_growth"], job=job)
        except ImportError as e:
            missing.append(f"pipeline_vs_engine, rss_growth: the Ray job is not importable ({e})")
        sections["job"] = time.time() - t1
    if "tiling" not in args.skip:
        t1 = time.time()
        try:
            tiles = tiling_section(args, folder, p, table)
            result.update(tiled_cost_per_megapixel={k: v["seconds_per_megapixel"] for k, v in tiles.items()},
                          tiling=tiles)
        except ImportError as e:
            missing.append(f"tiled_cost_per_megapixel: tiling is not importable ({e})")
        sections["tiling"] = time.time() - t1
    if missing:
        result["missing"] = missing
    result.update(mode=mode, device=args.device, model=args.model, dtype=dtype,
                  settings={"engine": p["engine"].__dict__, "engine_images": p["images"],
                            "image_size": p["image_size"], "job": p["job"].__dict__, "tiles": p["tiles"].__dict__},
                  torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  load_average={"start": load0, "end": _common.load_average()},
                  section_seconds=sections, elapsed_s=time.time() - t0)
    s = p["engine"]
    print_table(table, f"depthray benchmarks ({mode}; {args.device} {dtype}; model {args.model}; "
                       f"engine: {s.resolution} px, {s.ensemble_size} members, {s.steps} steps, batch {s.batch_size}; "
                       f"load avg {load0} -> {result['load_average']['end']}; {result['elapsed_s']:.0f} s)")
    print(json.dumps(_jsonable(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
