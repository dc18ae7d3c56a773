"""The GPU check of issue 17, as one script with a time budget: run it on a lent GPU.

    python benchmarks/gpu.py --device cuda --model sd2-random --budget-s 420 --out RESULTS.jsonl
    bash benchmarks/gpu_run.sh 450 [--skip SECTION ...]   # on a machine prepared by gpu_bundle.sh

Sections, in order of importance; one whose estimated cost no longer fits the budget is
skipped (and says so), so a run always ends inside its time limit with what it measured:
 1. matrix: engine vs diffusers' MarigoldDepthPipeline called as its users call it (the
    whole list of equal-size images in one call, its own batch_size = the engine's views
    per model call) at equal settings (resolution, dtype, weight layout, members, steps,
    seeded generators): the headline, like-for-like cells 1 x 1 and 4 x 1 (steps x
    members: no ensembling on either side), interleaved per cell; images/s and GPU-hours
    per million images;
 2. where a predict call's time goes: VAE encode, UNet, VAE decode (each call timed between
    device syncs) and the rest; UNet FLOPs per call and its share of the bf16 peak (the
    datasheet's and a measured bf16 matrix product's); full VAE decode vs TAESD;
 3. matrix_ensembling: the same comparison at members 4 and 10 (uncertainty on both),
    reported apart from the headline: diffusers' time there is mostly its scipy BFGS
    ensembling, whose iteration count depends on how alike the members are (random
    weights here), so these ratios need not carry over to a real checkpoint;
 4. the Ray job (one local actor on the GPU) against a plain loop over the same stages,
    steady state, and the actor's busy fraction (benchmarks/_job.py);
 5. the engine after model.compile() against eager and diffusers at 1 step x 1 member;
 6. tiled cost per megapixel.
Each section's result is appended to --out as one JSON line as soon as it is measured (a
run killed at its time limit keeps what it measured); the last line printed is every
result as one JSON object. benchmarks/gpu_bundle.sh packs what a bare GPU machine lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _common, _engine  # noqa: E402
from benchmarks._engine import EngineSettings  # noqa: E402
from benchmarks._job import JobSettings  # noqa: E402
from benchmarks._tiling import TileSettings  # noqa: E402
from depthray.tiling import fit_long_side  # noqa: E402


class Budget:
    """Seconds left of the run; a section starts only if its estimate fits."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


class Recorder:
    """Prints each section's result and appends it to the JSON-lines file at once."""

    def __init__(self, out: Path | None):
        self.out = out
        self.results: dict = {}

    def __call__(self, name: str, value) -> None:
        self.results[name] = value
        line = json.dumps({"section": name, "result": value}, default=float)
        print(f"[{name}] {line}", flush=True)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(line + "\n")


# ------------------------------------------------------------------------- 1. matrix
HEADLINE_CELLS = ((1, 1), (4, 1))  # steps x members: no ensembling on either side
ENSEMBLING_DEPENDS_ON = (
    "diffusers' time at members > 1 is mostly its scipy BFGS ensembling (per image, on the "
    "host), whose iteration count depends on how alike the members are: with random weights "
    "these ratios are not shown to carry over to a real checkpoint")


def matrix(model, pipe, images, base: EngineSettings, cells, first_warmup: int = 1) -> dict:
    """Engine vs diffusers per (steps, members) cell, each cell interleaved on its own.
    Cells with members > 1 are never headline (see ENSEMBLING_DEPENDS_ON)."""
    out: dict = {}
    for n, (steps, members) in enumerate(cells):
        s = EngineSettings(**{**base.__dict__, "steps": steps, "ensemble_size": members})
        # One warm-up call each in the first cell only (CUDA and library start-up): later
        # cells' first rounds are ordinary, a slow one is outvoted by the median, and
        # diffusers' warm-ups at 10 members alone took a quarter of the H200 run's matrix.
        r = _engine.engine_vs_diffusers(model, pipe, images, s, warmup=first_warmup if n == 0 else 0)
        ips = r["depthray_images_per_s"]
        out[f"{steps}x{members}"] = {
            "steps": steps, "members": members, "headline": (steps, members) in HEADLINE_CELLS,
            "depthray_images_per_s": ips,
            "diffusers_images_per_s": r["diffusers_images_per_s"], "ratio": r["ratio"],
            "gpu_hours_per_million": _common.gpu_hours_per_million(ips),
            "diffusers_gpu_hours_per_million": _common.gpu_hours_per_million(r["diffusers_images_per_s"]),
            "memory_format": r["memory_format"], "unet_batch_sizes": r["unet_batch_sizes"],
            "times_s": r["times_s"]}
        print(f"  {steps} step(s) x {members} member(s): depthray {ips:.2f} img/s, diffusers "
              f"{r['diffusers_images_per_s']:.2f} img/s, ratio {r['ratio']:.2f}x", flush=True)
    out["headline_cells"] = [k for k, v in out.items() if v["headline"]]
    out["diffusers_call"] = _engine.DIFFUSERS_CALL
    if any(members > 1 for _, members in cells):
        out["depends_on"] = ENSEMBLING_DEPENDS_ON
    return out


# ------------------------------------------------------------------------- 2. breakdown
PARTS = ("vae_encode", "unet", "vae_decode")


class PartTimer:
    """Wraps the engine's encode, UNet and decode calls with device syncs and sums their
    seconds: the syncs cost a little overlap, so shares are of a slightly slower call."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.batch: Counter = Counter()

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            _common.sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _common.sync(self.device)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            self.batch[name] += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0
            return out
        return timed

    def __enter__(self) -> "PartTimer":
        m = self.model
        self._unet = m.unet
        m.unet = self._wrap("unet", m.unet)
        m.encode = self._wrap("vae_encode", m.encode)
        m.decode = self._wrap("vae_decode", m.decode)
        return self

    def __exit__(self, *exc) -> None:
        m = self.model
        m.unet = self._unet
        for name in ("encode", "decode"):  # the instance attributes hid the methods
            m.__dict__.pop(name, None)


def breakdown(model, images, base: EngineSettings, cells, rounds: int) -> dict:
    """Share of a predict_images call spent in each part, per (steps, members) cell."""
    from depthray.predict import predict_images

    out = {}
    for steps, members in cells:
        s = EngineSettings(**{**base.__dict__, "steps": steps, "ensemble_size": members})
        model.clear_cache()
        predict_images(images, model, s.inference())  # warm-up
        totals, parts = [], []
        for _ in range(rounds):
            model.clear_cache()
            with PartTimer(model, s.device) as pt:
                _common.sync(s.device)
                t0 = time.perf_counter()
                predict_images(images, model, s.inference())
                _common.sync(s.device)
                totals.append(time.perf_counter() - t0)
            parts.append(pt)
        total = _common.median(totals)

        def per_part(per) -> dict[str, float]:  # median over rounds, per part
            return {k: _common.median([p.seconds[k] / per(p, k) for p in parts]) for k in PARTS}

        share = {k: v / total for k, v in per_part(lambda p, k: 1).items()}
        share["other"] = 1.0 - sum(share.values())
        per_call = per_part(lambda p, k: max(p.calls[k], 1))
        per_sample = per_part(lambda p, k: max(p.batch[k], 1))
        out[f"{steps}x{members}"] = {"seconds_per_call_of_predict": total, "share": share,
                                     "seconds_per_part_call": per_call, "seconds_per_sample": per_sample,
                                     "calls": dict(parts[-1].calls), "samples": dict(parts[-1].batch)}
        print(f"  {steps}x{members}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items()), flush=True)
    return out


def matmul_peak(device: str, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 TFLOP/s of an n^3 matrix product: what the card gives dense math."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _common.sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _common.sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


# ------------------------------------------------------------------------- 4. compiled
def compiled_section(folder, images, s: EngineSettings, pipe, eager, backend: str = "inductor") -> dict:
    """model.compile() vs eager vs diffusers, one cell (shapes fixed: one compilation)."""
    comp = _engine.load_engine(folder, s)
    comp.compile(backend=backend)
    r = _engine.engine_vs_diffusers(eager, pipe, images, s, compiled=comp)
    out = {"steps": s.steps, "members": s.ensemble_size}
    out.update({k: r[k] for k in ("depthray_images_per_s", "diffusers_images_per_s", "compiled_images_per_s",
                             "ratio", "ratio_compiled", "compile_first_call_s", "memory_format",
                             "unet_batch_sizes", "times_s")})
    out["compiled_vs_eager"] = r["compiled_images_per_s"] / r["depthray_images_per_s"]
    # The compiled UNet alone, at the batch and latent shape the calls above compiled for.
    h, w = fit_long_side(*images[0].shape[:2], s.resolution, upscale=True)
    latent = (-(-h // comp.vae_scale_factor), -(-w // comp.vae_scale_factor))
    out["unet"] = _engine.unet_throughput(comp, s, s.rounds, latent=latent)
    out["unet_eager"] = _engine.unet_throughput(eager, s, s.rounds, latent=latent)
    del comp
    return out


# ------------------------------------------------------------------------- main
def _cells(text: str) -> list[tuple[int, int]]:
    cells = [tuple(int(x) for x in c.split("x")) for c in text.split(",")]
    if any(len(c) != 2 or c[1] < 2 for c in cells):
        raise argparse.ArgumentTypeError(f"{text!r}: STEPSxMEMBERS,... with members >= 2")
    return cells


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="sd2-random", help="tiny | sd2-random | a diffusers Marigold folder")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this")
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file, one line per section")
    ap.add_argument("--rehearsal", action="store_true",
                    help="toy sizes and estimates (checks every section runs, e.g. on a CPU)")
    ap.add_argument("--compile-backend", default="inductor", help="eager: checks the plumbing fast")
    ap.add_argument("--skip", action="append", default=[],
                    choices=("matrix", "breakdown", "matrix_ensembling", "job", "compiled", "tiling"))
    ap.add_argument("--images", type=int, default=None, help="images per call (default: the size preset's)")
    ap.add_argument("--resolution", type=int, default=None, help="processing resolution (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per cell (default: the preset's)")
    ap.add_argument("--ensembling-cells", default=None, type=_cells,
                    help="STEPSxMEMBERS,... for matrix_ensembling (default: the preset's)")
    return ap.parse_args(argv)


def sizes(rehearsal: bool, device: str, dtype: str) -> dict:
    if rehearsal:
        return dict(engine=EngineSettings(device, dtype, 64, 4, 4, 8, 1), images=4, image_size=(48, 64),
                    cells=list(HEADLINE_CELLS), ensembling_cells=[(1, 2)], breakdown_cells=[(1, 1)],
                    compile_cell=(1, 1), job=JobSettings(1, 4, (40, 56), 32, 2, 2, device),
                    tiles=TileSettings(((96, 128),), 48, 1, 8, 1, device),
                    estimate={"matrix": 1, "breakdown": 1, "matrix_ensembling": 1, "job": 1, "compiled": 1,
                              "tiling": 1})
    return dict(engine=EngineSettings(device, dtype, 768, 4, 4, 16, 3), images=4, image_size=(480, 640),
                cells=list(HEADLINE_CELLS), ensembling_cells=[(1, 4), (4, 4), (1, 10), (4, 10)],
                breakdown_cells=[(1, 1), (1, 10), (4, 4)], compile_cell=(1, 1),
                job=JobSettings(2, 12, (480, 640), 768, 4, 8, device),
                tiles=TileSettings(((1536, 2048), (3072, 4096)), 768, 1, 16, 1, device),
                # measured on an H200 (benchmarks/results/h200-2026-11-28-*.jsonl, diffusers then
                # called per image): the 1 x 1 and 4 x 1 cells took ~10 s with warm-ups; diffusers'
                # scipy ensembling at 4 and 10 members ~190 s; a full pass is ~11 min
                estimate={"matrix": 30, "breakdown": 20, "matrix_ensembling": 200, "job": 250, "compiled": 110,
                          "tiling": 20})


def run_section(name: str, fn, budget: Budget, estimate: float, record: Recorder, args) -> None:
    if name in args.skip:
        record(name, {"skipped": "--skip"})
        return
    if not budget.fits(estimate):
        record(name, {"skipped": f"{budget.left():.0f} s left, estimate {estimate:.0f} s"})
        return
    t0 = time.time()
    print(f"== {name} ({budget.left():.0f} s left)", flush=True)
    try:
        value = fn()
        value = {**value, "section_s": time.time() - t0} if isinstance(value, dict) else value
        record(name, value)
    except Exception as e:  # one broken section must not cost the others their numbers
        traceback.print_exc()
        record(name, {"error": f"{type(e).__name__}: {e}"[:2000], "section_s": time.time() - t0})


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    p = sizes(args.rehearsal, args.device, dtype)
    for key in ("resolution", "rounds"):
        if getattr(args, key):
            p["engine"] = EngineSettings(**{**p["engine"].__dict__, key: getattr(args, key)})
    p["images"] = args.images or p["images"]
    p["ensembling_cells"] = args.ensembling_cells or p["ensembling_cells"]
    s: EngineSettings = p["engine"]
    record = Recorder(args.out)
    cuda = args.device.startswith("cuda")
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": args.device,
           "dtype": dtype, "model": args.model, "settings": {**s.__dict__, "images": p["images"],
                                                              "image_size": p["image_size"]},
           "channels_last": s.uses_channels_last(), "diffusers_call": _engine.DIFFUSERS_CALL}
    if cuda:
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   bf16_matmul_tflops=matmul_peak(args.device))
    t0 = time.time()
    folder = _common.model_dir(args.model)
    env["model_build_s"] = time.time() - t0
    t0 = time.time()
    model = _engine.load_engine(folder, s)
    pipe = _engine.load_diffusers(folder, s)
    env["model_load_s"] = time.time() - t0
    record("env", env)
    images = _common.scene_images(p["images"], *p["image_size"])
    est = p["estimate"]

    run_section("matrix", lambda: matrix(model, pipe, images, s, p["cells"]), budget, est["matrix"], record, args)

    def parts():
        out = {"predict": breakdown(model, images, s, p["breakdown_cells"], s.rounds)}
        out["unet"] = _engine.unet_throughput(model, s, s.rounds)
        if cuda:
            out["unet"]["fraction_of_measured_bf16_matmul"] = out["unet"]["achieved_tflops"] / env["bf16_matmul_tflops"]
        out["taesd"] = _engine.tiny_decoder_effect(model, _common.tiny_decoder_dir(args.model), images, s)
        return out
    run_section("breakdown", parts, budget, est["breakdown"], record, args)

    # Warmed up by the matrix when it ran: one more warm-up would cost a scipy solve per image.
    run_section("matrix_ensembling", lambda: matrix(model, pipe, images, s, p["ensembling_cells"],
                                                    first_warmup=0 if "headline_cells" in record.results["matrix"] else 1),
                budget, est["matrix_ensembling"], record, args)

    def job():
        from benchmarks._job import job_benchmark

        with tempfile.TemporaryDirectory(prefix="depthray-gpu-job-") as tmp:
            return job_benchmark(folder, Path(tmp), p["job"])
    run_section("job", job, budget, est["job"], record, args)

    def compiled():
        steps, members = p["compile_cell"]
        cs = EngineSettings(**{**s.__dict__, "steps": steps, "ensemble_size": members})
        return {"backend": args.compile_backend,
                **compiled_section(folder, images, cs, pipe, model, args.compile_backend)}
    run_section("compiled", compiled, budget, est["compiled"], record, args)

    def tiling():
        from benchmarks._tiling import tiled_cost

        ts: TileSettings = p["tiles"]
        return tiled_cost(model, ts)
    run_section("tiling", tiling, budget, est["tiling"], record, args)

    print(json.dumps(record.results, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
