"""Read depthray outputs back: Parquet parts, WebDataset tars, a Delta table or a folder of
depth files.

Only stock tools (fsspec, pyarrow, tarfile, PIL) and the documented encodings are used, so
this is also what any consumer of the outputs would write:

- depth: 16-bit PNG of depth * 65535 (0 = near), `{key}.depth.png` / Parquet column `depth`;
- uncertainty: 16-bit PNG of uncertainty / scale * 65535; scale in the PNG text chunk
  `depthray_uncertainty_scale`, the Parquet column / JSON field `uncertainty_scale`;
- WebDataset samples group `{key}.depth.png`, `{key}.uncertainty.png`, `{key}.json` and the
  optional input `{key}.jpg`; the JSON's `key` is the original key (file names are sanitised);
- metric depth (pipelines/metric_depth.py): 16-bit PNG of metres / scale, Parquet column
  `metric_depth` / `{key}.metric_depth.png`, read by depthray/io/metric_labels.py's decoder.

Folders, files, globs and any fsspec URL (s3://...) work, opened the way the job opens
them (depthray/io/fs.py: `storage:` settings, AWS_ENDPOINT_URL). Paths with a component
starting with `_` (`_errors/`, `_manifest/`) or `.` are not outputs and are skipped. A Delta
output (`_delta_log/` in the folder) is read as a table at its latest version, through
`deltalake`, like any Delta reader: it lists only committed shards' files. The
format helpers are the writers' own: tar grouping (depthray/io/tar_samples.py), PNG codecs
(depthray/io/codecs.py), image decoding as displayed (depthray/io/decode.py).
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from depthray.config import StorageConfig
from depthray.io.codecs import decode_depth, decode_uncertainty_png16, depth_png_space
from depthray.io.decode import IMAGE_EXTS, decode_rgb
from depthray.io.manifest import MANIFEST_DIR, manifest_parts
from depthray.io.metric_labels import decode_metric_png16
from depthray.io.fs import filesystem
from depthray.io.table import is_table, table_options, table_uri
from depthray.io.tar_samples import iter_samples

log = logging.getLogger(__name__)

# Folder files named {key}.{role}.{ext}; roles that are not the depth map itself.
_SIDE_ROLES = ("uncertainty", "preview", "mask", "valid", "image", "metric_depth")


@dataclass
class OutputRecord:
    key: str
    depth: np.ndarray  # float32 [H,W] in [0,1], 0 = near
    uncertainty: np.ndarray | None = None  # float32 [H,W] >= 0 (when stored and asked for)
    uncertainty_mean: float | None = None
    image: np.ndarray | None = None  # uint8 [H,W,3] input passed through (when stored)
    meta: dict = field(default_factory=dict)
    metric: np.ndarray | None = None  # float32 [H,W] metres, NaN = no depth (metric outputs only)


def _is_hidden(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root) if path.startswith(root) else path
    return any(p.startswith(("_", ".")) for p in rel.split("/") if p)


def list_files(url: str, storage: StorageConfig | None = None) -> tuple[object, list[str]]:
    """A file, a glob or a folder (recursive) -> (fs, sorted file paths), hidden paths skipped."""
    fs, path = filesystem(url, storage)
    if any(c in path for c in "*?["):
        files = [p for p in fs.glob(path) if fs.isfile(p)]
        root = path.split("*")[0].rsplit("/", 1)[0]
    elif fs.isfile(path):
        return fs, [path]
    elif fs.isdir(path):
        root = path.rstrip("/")
        committed = _committed_parts(fs, root)
        if committed is not None:  # a job's output: committed shards only, never in-flight ones
            return fs, sorted(f"{root}/{rel}" for rel in committed if not _is_hidden(rel, ""))
        files = fs.find(path)
    else:
        raise FileNotFoundError(f"{url}: no such file or folder")
    return fs, sorted(p for p in files if not _is_hidden(p, root))


def _committed_parts(fs, root: str) -> list[str] | None:
    """Parts listed by the output's manifests (relative paths), or None for a folder that is
    not a job output (no `_manifest/`). Parts of shards still in flight, or left by a crash
    mid-commit, are in no manifest, so they are not read."""
    base = f"{root}/{MANIFEST_DIR}"
    if not fs.exists(base):
        return None
    paths = [p for p in fs.find(base) if p.endswith(".json") and not posixpath.basename(p).startswith(".")]
    parts: set[str] = set()
    for data in fs.cat(paths).values() if paths else []:
        parts.update(manifest_parts(json.loads(data)))
    return sorted(parts)


def detect_format(files: list[str]) -> str:
    """parquet | webdataset | folder, from the files present."""
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(f.endswith(".tar") for f in files):
        return "webdataset"
    return "folder"


def read_outputs(
    url: str,
    with_uncertainty: bool = True,
    with_image: bool = True,
    limit: int | None = None,
    storage: StorageConfig | None = None,
) -> Iterator[OutputRecord]:
    """Yield the records of a depthray output (Parquet, WebDataset, Delta table or folder), in
    file order."""
    fs, path = filesystem(url, storage)
    if not any(c in path for c in "*?[") and is_table(fs, path.rstrip("/")):
        log.info("reading the Delta table %s", url)
        records = _read_table(url, storage, with_uncertainty, with_image)
    else:
        fs, files = list_files(url, storage)
        fmt = detect_format(files)
        log.info("reading %s output: %d files under %s", fmt, len(files), url)
        reader = {"parquet": _read_parquet, "webdataset": _read_webdataset, "folder": _read_folder}[fmt]
        records = reader(fs, files, with_uncertainty, with_image)
    n = 0
    for rec in records:
        yield rec
        n += 1
        if limit is not None and n >= limit:
            return


_WANTED = ["key", "depth", "uncertainty", "uncertainty_scale", "uncertainty_mean", "meta", "image", "metric_depth"]


def _read_table(url, storage, with_uncertainty, with_image) -> Iterator[OutputRecord]:
    from deltalake import DeltaTable

    dataset = DeltaTable(table_uri(url), storage_options=table_options(url, storage)).to_pyarrow_dataset()
    cols = [c for c in _WANTED if c in dataset.schema.names and (with_uncertainty or c != "uncertainty")
            and (with_image or c != "image")]
    for batch in dataset.to_batches(columns=cols, batch_size=16):  # rows hold whole PNGs: small batches
        for row in batch.to_pylist():
            yield _record(row["key"], row, with_uncertainty)


def _read_parquet(fs, files, with_uncertainty, with_image) -> Iterator[OutputRecord]:
    import pyarrow.parquet as pq

    for path in (f for f in files if f.endswith(".parquet")):
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            cols = [c for c in _WANTED if c in names]
            if not with_uncertainty and "uncertainty" in cols:
                cols.remove("uncertainty")
            if not with_image and "image" in cols:
                cols.remove("image")
            if "key" not in cols or "depth" not in cols:
                raise ValueError(f"{path}: not a depth output (needs columns key and depth)")
            # Small batches: a row holds whole PNGs, so memory stays bounded by the batch.
            for batch in pf.iter_batches(batch_size=16, columns=cols):
                for row in batch.to_pylist():
                    yield _record(row["key"], row, with_uncertainty)


def _record(key: str, row: dict, with_uncertainty: bool) -> OutputRecord:
    """Build a record from decoded fields: depth/uncertainty/image bytes + metadata."""
    meta = row.get("meta") or {}
    if isinstance(meta, (str, bytes)):
        meta = json.loads(meta or "{}")
    if "output_space" not in meta:  # a folder of PNGs: the depth PNG's own text chunk says it
        space = depth_png_space(row["depth"])
        if space is not None:
            meta = {**meta, "output_space": space}
    unc = None
    mean = row.get("uncertainty_mean")
    # Folders store no mean: decode the map for it even when the map itself is not wanted.
    if row.get("uncertainty") and (with_uncertainty or mean is None):
        unc = decode_uncertainty_png16(row["uncertainty"], row.get("uncertainty_scale"))
        mean = float(unc.mean()) if mean is None else mean
        unc = unc if with_uncertainty else None
    image = decode_rgb(row["image"]) if row.get("image") else None
    metric = _metric_map(row["metric_depth"], meta, key) if row.get("metric_depth") else None
    return OutputRecord(
        key=key,
        depth=decode_depth(row["depth"]),
        uncertainty=unc,
        uncertainty_mean=None if mean is None else float(mean),
        image=image,
        meta=meta,
        metric=metric,
    )


def _metric_map(data: bytes, meta: dict, key: str) -> np.ndarray:
    """A metric PNG -> metres: its scale from its own text chunk (the PNG describes itself),
    else from `meta.metric.png_scale`; with neither, the map cannot be read as metres."""
    try:
        return decode_metric_png16(data)
    except KeyError:
        scale = (meta.get("metric") or {}).get("png_scale")
        if scale is None:
            raise ValueError(f"{key}: metric depth PNG without a scale (no text chunk, no "
                             "meta.metric.png_scale): its metres cannot be read") from None
        return decode_metric_png16(data, scale)


def _read_webdataset(fs, files, with_uncertainty, with_image) -> Iterator[OutputRecord]:
    for path in (f for f in files if f.endswith(".tar")):
        with fs.open(path, "rb") as fh:
            for key, fields in iter_samples(fh):
                rec = _wds_record(key, fields, with_uncertainty, with_image, path)
                if rec is not None:
                    yield rec


def _wds_record(key, fields, with_uncertainty, with_image, path) -> OutputRecord | None:
    if "depth.png" not in fields:
        log.warning("%s: sample %s has no depth.png, skipped", path, key)
        return None
    meta = json.loads(fields["json"]) if "json" in fields else {}
    row = {
        "depth": fields["depth.png"],
        "uncertainty": fields.get("uncertainty.png"),
        "uncertainty_scale": meta.get("uncertainty_scale"),
        "uncertainty_mean": meta.get("uncertainty_mean"),
        "meta": meta,
        "metric_depth": fields.get("metric_depth.png"),
    }
    if with_image:
        row["image"] = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    return _record(str(meta.get("key") or key), row, with_uncertainty)


def folder_key(path: str) -> tuple[str, str] | None:
    """File name -> (key, role): role is 'depth', a side role, or 'image'; None if unknown.

    `{key}.depth.png|npy` and `{key}.png|npy` are depth; `{key}.{role}.png` are side files;
    `{key}.jpg|jpeg|webp` are input images.
    """
    base = posixpath.basename(path)
    stem, dot, ext = base.rpartition(".")
    if not dot:
        return None
    ext = ext.lower()
    if ext in IMAGE_EXTS and ext != "png":
        return stem, "image"
    if ext not in ("png", "npy"):
        return None
    key, dot, role = stem.rpartition(".")
    if dot and role == "depth":
        return key, "depth"
    if dot and role in _SIDE_ROLES:
        return key, role
    return stem, "depth"


def index_folder(files: list[str]) -> dict[str, dict[str, str]]:
    """key -> {role: path} for a folder listing."""
    index: dict[str, dict[str, str]] = {}
    for path in files:
        kr = folder_key(path)
        if kr is None:
            continue
        key, role = kr
        roles = index.setdefault(key, {})
        # `{key}.depth.png` wins over a plain `{key}.png`
        if role not in roles or path.endswith(".depth.png"):
            roles[role] = path
    return index


def _read_folder(fs, files, with_uncertainty, with_image) -> Iterator[OutputRecord]:
    for key, roles in sorted(index_folder(files).items()):
        if "depth" not in roles:
            continue
        row = {"depth": fs.cat_file(roles["depth"])}
        if "uncertainty" in roles:
            row["uncertainty"] = fs.cat_file(roles["uncertainty"])
        if "metric_depth" in roles:
            row["metric_depth"] = fs.cat_file(roles["metric_depth"])
        if with_image and "image" in roles:
            row["image"] = fs.cat_file(roles["image"])
        yield _record(key, row, with_uncertainty)
