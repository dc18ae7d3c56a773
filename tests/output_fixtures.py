"""Depth outputs written straight from the documented output format (README, docs/training.md),
so the readers are tested against the documented format itself."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, PngImagePlugin

from depthray.samples import make_scene


@dataclass
class Sample:
    key: str
    rgb: np.ndarray  # uint8 [H,W,3]
    gt: np.ndarray  # float32 [H,W] metres
    pred: np.ndarray  # float32 [H,W] in [0,1], what the job would store
    unc: np.ndarray  # float32 [H,W] >= 0


def make_samples(n: int = 4, h: int = 48, w: int = 64, noise=(0.0, 0.02, 0.05, 0.1)) -> list[Sample]:
    """Scenes whose stored depth is GT min-max normalised plus noise of a known size per image."""
    out = []
    for i in range(n):
        rgb, gt = make_scene(h, w, seed=100 + i)
        rng = np.random.default_rng(i)
        lvl = noise[i % len(noise)]
        norm = (gt - gt.min()) / (gt.max() - gt.min())
        pred = np.clip(norm + lvl * rng.standard_normal(gt.shape), 0, 1).astype(np.float32)
        unc = (lvl + 0.005 * rng.random(gt.shape)).astype(np.float32)
        out.append(Sample(f"img_{i:03d}", rgb, gt, pred, unc))
    return out


def png16(values01: np.ndarray, text: dict | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(np.rint(np.clip(values01, 0, 1) * 65535).astype(np.uint16)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def unc_png(unc: np.ndarray) -> tuple[bytes, float]:
    scale = float(unc.max()) or 1.0
    return png16(unc / scale, {"depthray_uncertainty_scale": repr(scale)}), scale


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def decoded_pred(s: Sample) -> np.ndarray:
    """The stored depth as a reader sees it (16-bit quantised)."""
    return np.rint(np.clip(s.pred, 0, 1) * 65535).astype(np.uint16).astype(np.float32) / 65535


def _noise_files(out: Path) -> None:
    """What a job writes next to its outputs that readers must skip, and the manifest that
    commits the parts (a job's readers read only parts a manifest lists); a staged part of a
    shard still in flight must stay invisible."""
    (out / "_errors").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": ["broken"], "source": ["s"], "stage": ["decode"],
                             "error": ["decode"], "message": ["x"]}), out / "_errors" / "s.part-0.parquet")
    parts = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and ".part-" in p.name}
    (out / "_staging").mkdir(exist_ok=True)
    for name in parts:  # a half-done shard's part, staged: same format, never to be read
        (out / "_staging" / name.replace("shard", "inflight")).write_bytes((out / name).read_bytes())
    (out / "_manifest").mkdir(exist_ok=True)
    (out / "_manifest" / "s.json").write_text(json.dumps({
        "status": "complete", "parts": parts,
        "error_parts": {"_errors/s.part-0.parquet": (out / "_errors" / "s.part-0.parquet").stat().st_size}}))


def write_parquet(out: Path, samples: list[Sample], parts: int = 2, image_dir: Path | None = None,
                  output_space: str = "depth") -> Path:
    """`image_dir`: where the inputs `{key}.jpg` are (meta `source_url`, as a job writes it);
    `output_space`: what the labels hold, in each row's meta as a job writes it."""
    out.mkdir(parents=True, exist_ok=True)
    for p in range(parts):
        rows = []
        for s in samples[p::parts]:
            u, scale = unc_png(s.unc)
            rows.append(dict(key=s.key, source=f"shard{p}", width=s.gt.shape[1], height=s.gt.shape[0],
                             depth=png16(s.pred), uncertainty=u, uncertainty_scale=scale,
                             uncertainty_mean=float(s.unc.mean()), model="test", config_hash="0" * 16,
                             ensemble_size=5, num_views=1, meta=json.dumps(
                                 {"low_confidence": False, "output_space": output_space,
                                  **({"source_url": f"file://{image_dir}/{s.key}.jpg"} if image_dir else {})})))
        pq.write_table(pa.Table.from_pylist(rows), out / f"shard{p}.part-{p:016x}.parquet")
    _noise_files(out)
    return out


def write_webdataset(out: Path, samples: list[Sample], include_image: bool = True,
                     output_space: str = "depth") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "shard0.part-0000000000000000.tar", "w") as tar:
        for s in samples:
            u, scale = unc_png(s.unc)
            safe = s.key.replace(".", "_")
            meta = {"key": s.key, "uncertainty_scale": scale, "uncertainty_mean": float(s.unc.mean()),
                    "width": s.gt.shape[1], "height": s.gt.shape[0], "output_space": output_space}
            members = [("depth.png", png16(s.pred)), ("uncertainty.png", u), ("json", json.dumps(meta).encode())]
            if include_image:
                members.append(("jpg", jpeg(s.rgb)))
            for ext, data in members:
                info = tarfile.TarInfo(f"{safe}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _noise_files(out)
    return out


def write_folder(out: Path, samples: list[Sample], images: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        (out / f"{s.key}.depth.png").write_bytes(png16(s.pred))
        (out / f"{s.key}.uncertainty.png").write_bytes(unc_png(s.unc)[0])
        if images:
            (out / f"{s.key}.jpg").write_bytes(jpeg(s.rgb))
    return out


def write_pfm(path: Path, arr: np.ndarray) -> None:
    h, w = arr.shape
    data = np.flipud(arr.astype("<f4")).tobytes()  # bottom row first, little endian
    path.write_bytes(b"Pf\n%d %d\n-1.0\n" % (w, h) + data)


def write_gt(out: Path, samples: list[Sample], fmt: str = "png") -> Path:
    """GT per sample: 16-bit PNG in millimetres, float .npy or .pfm."""
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        if fmt == "png":
            Image.fromarray(np.clip(np.rint(s.gt * 1000), 1, 65535).astype(np.uint16)).save(out / f"{s.key}.png")
        elif fmt == "npy":
            np.save(out / f"{s.key}.npy", s.gt)
        elif fmt == "pfm":
            write_pfm(out / f"{s.key}.pfm", s.gt)
    return out
