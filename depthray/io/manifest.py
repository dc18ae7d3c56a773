"""Per-shard manifests: the commit record that makes a job resumable and exactly-once.

`_manifest/{shard}.json` is written last in a shard's commit (depthray/io/commit.py) and
identifies the shard fully: input URL, size and ETag (or mtime), the config hash and
settings, every part with its size, and the lease generation of the run that wrote it.
`resume_shards` counts a shard as done only if all of that matches the input and a single
listing of the output shows each part at its size; anything else is redone, and its
leftovers (staged parts, parts no manifest lists) are deleted first, so no key is ever
written twice.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

from depthray.config import Config, ConfigError, StorageConfig
from depthray.io.fs import filesystem, join, write_atomic
from depthray.io import output_config
from depthray.io.output_config import config_difference, possible_kinds, same_but_device
from depthray.io.sinks import STAGING_DIR, part_shard
from depthray.io.listing import source_identity
from depthray.io.sources import Shard
from depthray.io.table import check_format, table_listing

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
JOBS_DIR = "_jobs"
OVERWRITE_FILE = "overwrite.json"  # under _jobs/: the overwrite in progress (its epoch)


class ManifestStore:
    def __init__(self, output_url: str, storage: StorageConfig):
        self.url, self.storage = output_url, storage  # a Delta output's table opens from these
        self.fs, self.root = filesystem(output_url, storage)

    def path(self, shard: str) -> str:
        return join(self.root, MANIFEST_DIR, f"{shard}.json")

    def listing(self) -> dict[str, int]:
        """Every file under the output, relative path -> size: one listing, fresh (object
        store clients cache listings; a stale one could hide a deleted part)."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return {}
        found = self.fs.find(self.root, detail=True)
        base = self.root.rstrip("/")
        return {posixpath.relpath(p, base): int(info.get("size") or 0) for p, info in found.items()
                if info.get("type", "file") == "file"}

    @staticmethod
    def names_in(listing: dict[str, int]) -> set[str]:
        """Shard names that have a manifest, from a listing."""
        prefix = MANIFEST_DIR + "/"
        return {rel[len(prefix): -len(".json")] for rel in listing
                if rel.startswith(prefix) and rel.endswith(".json") and not posixpath.basename(rel).startswith(".")}

    def completed(self) -> set[str]:
        """Names of shards with a manifest (one listing, not one request per shard)."""
        return self.names_in(self.listing())

    def read_many(self, shards: list[str], keep: Callable[[dict], dict] | None = None,
                  chunk: int = 1000) -> dict[str, dict]:
        """Manifests of `shards` (which must exist); object stores fetch each chunk
        concurrently. `keep` slims each manifest as it is parsed: a plan over 100,000 shards
        then holds the fields it decides on, not every manifest's settings (driver memory
        stays flat in the shard count, docs/scale.md)."""
        out: dict[str, dict] = {}
        for i in range(0, len(shards), chunk):
            paths = {self.path(n): n for n in shards[i: i + chunk]}
            for p, b in self.fs.cat(list(paths)).items():
                m = json.loads(b)
                out[paths[p]] = keep(m) if keep else m
        return out

    def write(self, shard: str, manifest: dict) -> None:
        write_atomic(self.fs, self.path(shard), json.dumps(manifest, indent=1, sort_keys=True).encode())

    def write_job_summary(self, run_id: str, summary: dict) -> str:
        path = join(self.root, JOBS_DIR, f"{run_id}.json")
        write_atomic(self.fs, path, json.dumps(summary, indent=1, sort_keys=True).encode())
        return path

    def job_summaries(self) -> list[str]:
        """Paths of the runs' summaries, oldest first (run ids start with a UTC timestamp)."""
        base = join(self.root, JOBS_DIR)
        if not self.fs.exists(base):
            return []
        return sorted(p for p in self.fs.ls(base, detail=False)
                      if p.endswith(".json") and not posixpath.basename(p).startswith(".")
                      and posixpath.basename(p)[:1].isdigit())

    def read_job_summary(self, path: str) -> dict:
        return json.loads(self.fs.cat_file(path))

    # -------------------------------------------------------------- overwrite epochs
    def overwrite_in_progress(self) -> dict | None:
        """{epoch, config_hashes (the settings it relabels to)} of an unfinished overwrite."""
        try:
            return json.loads(self.fs.cat_file(join(self.root, JOBS_DIR, OVERWRITE_FILE)))
        except FileNotFoundError:
            return None

    def overwrite_epoch(self, run_id: str, hashes: list[str]) -> str:
        """The overwrite in progress (started by this or an interrupted earlier run), now
        relabelling to `hashes`."""
        now = self.overwrite_in_progress() or {"epoch": run_id}
        if now.get("config_hashes") != hashes:
            write_atomic(self.fs, join(self.root, JOBS_DIR, OVERWRITE_FILE),
                         json.dumps({"epoch": now["epoch"], "config_hashes": hashes}).encode())
        return now["epoch"]

    def end_overwrite(self) -> None:
        path = join(self.root, JOBS_DIR, OVERWRITE_FILE)
        if self.fs.exists(path):
            self.fs.rm_file(path)


def manifest_parts(manifest: dict) -> dict[str, int]:
    """rel path -> size of every part a manifest lists (results and errors)."""
    out: dict[str, int] = {}
    for key in ("parts", "error_parts"):
        value = manifest.get(key) or {}
        out.update(value if isinstance(value, dict) else {p: -1 for p in value})
    return out


@dataclass
class Resume:
    """What a run has to do: the shards left, those complete from an earlier run."""

    todo: list[Shard]
    skipped: list[str] = field(default_factory=list)  # complete from an earlier run
    deleted_parts: int = 0
    redo: dict[str, str] = field(default_factory=dict)  # shard with a manifest -> why it is redone
    replaced: dict[str, list[str]] = field(default_factory=dict)  # shard -> old parts, dropped at commit
    overwrite_epoch: str | None = None


def why_not_done(m: dict, shard: Shard, fingerprint: dict | None, listing: dict[str, int]) -> str | None:
    """Why a manifest does not prove `shard` done (None = it does)."""
    if m.get("status") != "complete":
        return "manifest not complete"
    if fingerprint:
        for k in ("size", "etag"):
            if fingerprint.get(k) is not None and m.get(f"source_{k}") not in (None, fingerprint[k]):
                return f"input changed ({k} {m.get(f'source_{k}')} -> {fingerprint[k]})"
    for rel, size in sorted(manifest_parts(m).items()):
        if rel not in listing:
            return f"part {rel} is missing"
        if size >= 0 and listing[rel] != size:
            return f"part {rel} is {listing[rel]} bytes, manifest says {size}"
    return None


# What a resume decision reads from a manifest (the rest, e.g. error counts, is for people).
_DECISION_KEYS = ("status", "url", "config_hash", "source_size", "source_etag", "parts", "error_parts",
                  "overwrite_epoch")


def _decision_fields(m: dict, these: set[str]) -> dict:
    """The fields resume_shards decides on; the settings only where they differ from this
    config's (the refusal message names the difference)."""
    slim = {k: m[k] for k in _DECISION_KEYS if k in m}
    if m.get("config_hash") not in these:
        slim["settings"] = m.get("settings")
    return slim


def resume_shards(shards: list[Shard], cfg: Config, fingerprints: dict[str, dict] | None = None,
                  run_id: str = "") -> Resume:
    """Which shards are done, which to (re)do; clears the leftovers of the ones to redo.

    Refuses (ConfigError, before deleting anything) an output labelled with other settings
    (depthray/io/output_config.py; and, for outputs labelled before its record, any of this
    input's shards) unless `output.overwrite`, and an input whose shard names are already
    taken in this output by shards from other URLs. A run with the settings an interrupted
    overwrite relabels to continues that overwrite, with or without `output.overwrite`.
    """

    store = ManifestStore(cfg.output.url, cfg.storage)
    fs, root = store.fs, store.root
    listing = store.listing()
    check_format(cfg.output.format, cfg.output.url, listing)
    listing = table_listing(cfg.output.url, cfg.storage, listing)
    have = ManifestStore.names_in(listing)
    names = {s.name for s in shards}
    kinds = possible_kinds(cfg)  # the job resolves `auto` where its actors run
    these = {cfg.hash(k) for k in kinds}
    manifests = store.read_many(sorted(have & names), keep=lambda m: _decision_fields(m, these))
    # 1. Identity: a shard name in this output belongs to one input URL.
    for s in shards:
        m = manifests.get(s.name)
        if m is not None and m.get("url") is not None and source_identity(m["url"]) != source_identity(s.url):
            raise ConfigError(
                f"output.url {cfg.output.url!r} already holds shard {s.name!r} from {m['url']}; this input "
                f"has {s.name!r} at {s.url}. Two inputs with the same shard names need two outputs.")
    # 2. Settings: one configuration per output, unless overwriting.
    output_config.check(output_config.recorded(store, listing), cfg, kinds)
    progress = store.overwrite_in_progress() if not cfg.output.overwrite else None
    overwriting = cfg.output.overwrite or bool(progress and set(progress.get("config_hashes") or []) & these)
    other = {n: m for n, m in manifests.items() if m.get("config_hash") not in these and not (
        cfg.output.allow_mixed_devices and same_but_device(m.get("settings"), cfg.settings(kinds[0])))}
    if other and not overwriting:
        name, m = sorted(other.items())[0]
        diff = config_difference(m.get("settings") or {}, cfg.settings())
        raise ConfigError(
            f"output.url {cfg.output.url!r}: {len(other)} shard(s) were labelled with other settings "
            f"(e.g. {name}: {'; '.join(diff) if diff else 'config hash ' + str(m.get('config_hash'))}). "
            "Use another output, or set output.overwrite: true to relabel them (shard by shard, resumable).")
    epoch = store.overwrite_epoch(run_id, sorted(these)) if overwriting else None
    resume = Resume(todo=[], overwrite_epoch=epoch)
    for s in shards:
        m = manifests.get(s.name)
        why = None if m is None else why_not_done(m, s, (fingerprints or {}).get(s.url), listing)
        if m is not None and why is None and epoch is not None and (
                m.get("overwrite_epoch") != epoch or m.get("config_hash") not in these):
            why = "overwriting"
        if m is not None and why is None:
            resume.skipped.append(s.name)
            continue
        resume.todo.append(s)
        if m is not None:
            resume.redo[s.name] = why or ""
            if why == "overwriting":
                resume.replaced[s.name] = sorted(manifest_parts(m))
    # 3. Leftovers: staged and visible parts of the shards to (re)do, temp files, and visible
    #    parts a shard's manifest does not list (left by a commit of the earlier, side-by-side
    #    layout that a crash cut short); parts an overwrite replaces stay until their shard commits.
    redo = {s.name for s in resume.todo}
    keep = {p for parts in resume.replaced.values() for p in parts}
    listed = {n: set(manifest_parts(m)) for n, m in manifests.items()}
    stale = []
    for rel in listing:
        base = posixpath.basename(rel)
        if base.startswith(".tmp-"):
            stale.append(rel)  # a write that died before its rename
            continue
        if rel.startswith(MANIFEST_DIR + "/"):
            name = rel[len(MANIFEST_DIR) + 1: -len(".json")]
            if name in redo and name not in resume.replaced:
                stale.append(rel)  # a manifest that no longer proves anything
            continue
        shard = part_shard(rel)
        if shard is None or rel in keep:
            continue
        if shard in redo or (shard in listed and rel not in listed[shard] and not rel.startswith(STAGING_DIR + "/")):
            stale.append(rel)
    for rel in stale:
        fs.rm_file(join(root, rel))
    resume.deleted_parts = len(stale)
    foreign = foreign_files(listing)
    if foreign:
        log.warning("output.url %s holds %d file(s) depthray did not write (e.g. %s): they stay, but a "
                    "reader of the whole folder (pq.read_table(output)) reads them too; use an empty prefix",
                    cfg.output.url, len(foreign), ", ".join(foreign[:3]))
    if stale:
        log.info("deleted %d leftover file(s) of %d shard(s) to redo", len(stale), len(redo))
    for name, why in sorted(resume.redo.items()):
        if why != "overwriting":
            log.warning("shard %s has a manifest but is redone: %s", name, why)
    return resume


def foreign_files(listing: dict[str, int]) -> list[str]:
    """Visible files of an output that are not depthray's: not a part (`{shard}.parts/`), not
    under a `_`/`.` folder (manifests, jobs, errors, staging, the Delta log), not in a Delta
    partition folder (`source=...`, where OPTIMIZE writes)."""
    return sorted(rel for rel in listing if part_shard(rel) is None and not any(
        c.startswith(("_", ".", "source=")) or c.endswith(".parts") for c in rel.split("/")))


def input_fingerprints(shards: list[Shard], storage: StorageConfig) -> dict[str, dict[str, Any]]:
    """url -> {size, etag} of shard files, from one listing per folder (not a request per
    shard). Image-folder shards have none; an unlistable folder gives none (not an error:
    the reader reports a missing shard)."""
    by_dir: dict[str, list[Shard]] = {}
    out: dict[str, dict[str, Any]] = {}
    for s in shards:
        if s.format != "images":
            by_dir.setdefault(s.url.rsplit("/", 1)[0], []).append(s)
        elif "&h=" in s.url:  # image shards: the hash of their file names (depthray/io/folders.py)
            out[s.url] = {"size": None, "etag": s.url.rsplit("&h=", 1)[1]}
    for folder, members in by_dir.items():
        fs, path = filesystem(folder, storage)
        if folder.startswith(("http://", "https://")):
            # An HTTP "listing" is an index page's links, without sizes or dates: ask each
            # file (a HEAD: Content-Length, ETag or Last-Modified), so a replaced file is seen;
            # many at once, as a job may list thousands.
            from concurrent.futures import ThreadPoolExecutor

            def head(url: str) -> dict[str, Any] | None:
                try:
                    return _fingerprint(fs.info(url))
                except (OSError, ValueError):
                    return None

            with ThreadPoolExecutor(16) as pool:
                for s, fp in zip(members, pool.map(head, [s.url for s in members])):
                    if fp is not None:
                        out[s.url] = fp
            continue
        try:
            entries = fs.ls(path, detail=True)
        except (OSError, ValueError):
            continue
        info = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
        for s in members:
            e = info.get(s.url.rsplit("/", 1)[-1])
            if e is not None:
                out[s.url] = _fingerprint(e)
    return out


def _fingerprint(e: dict[str, Any]) -> dict[str, Any]:
    """{size, etag} of a listing or info entry; None where the store did not say (never 0,
    which would match any file)."""
    etag = e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified") or e.get("Last-Modified")
    size = e.get("size")
    return {"size": int(size) if size is not None else None,
            "etag": str(etag).strip('"') if etag is not None else None}
