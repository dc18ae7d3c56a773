"""Per-shard manifests: the commit record that makes a job resumable and exactly-once.

`{output}/_manifest/{shard}.json` is written by the driver, atomically, only after every
row of the shard has landed in a part file; it lists those parts. On start, shards with a
manifest are skipped, and part files of every other shard (left by a crashed or failed
run) are deleted before the shard is redone, so no key is ever written twice.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field

from depthray.config import OutputConfig, StorageConfig
from depthray.io.fs import filesystem, join, write_atomic
from depthray.io.sinks import PART_RE
from depthray.io.sources import Shard

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
JOBS_DIR = "_jobs"


class ManifestStore:
    def __init__(self, output_url: str, storage: StorageConfig):
        self.fs, self.root = filesystem(output_url, storage)

    def path(self, shard: str) -> str:
        return join(self.root, MANIFEST_DIR, f"{shard}.json")

    def completed(self) -> set[str]:
        """Names of shards with a manifest (one listing, not one request per shard)."""
        base = join(self.root, MANIFEST_DIR)
        if not self.fs.exists(base):
            return set()
        names = set()
        for p in self.fs.find(base):
            rel = posixpath.relpath(p, base)
            if rel.endswith(".json") and not posixpath.basename(rel).startswith("."):
                names.add(rel[: -len(".json")])
        return names

    def read_many(self, shards: list[str]) -> dict[str, dict]:
        """Manifests of `shards` (which must exist); object stores fetch them concurrently."""
        if not shards:
            return {}
        paths = {self.path(n): n for n in shards}
        return {paths[p]: json.loads(b) for p, b in self.fs.cat(list(paths)).items()}

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
                      if p.endswith(".json") and not posixpath.basename(p).startswith("."))

    def read_job_summary(self, path: str) -> dict:
        return json.loads(self.fs.cat_file(path))


@dataclass
class Resume:
    """What a run has to do: the shards left, those complete from an earlier run."""

    todo: list[Shard]
    skipped: list[str] = field(default_factory=list)  # complete from an earlier run
    deleted_parts: int = 0


def resume_shards(shards: list[Shard], cfg: OutputConfig, storage: StorageConfig) -> Resume:
    """Skip completed shards; delete leftovers of the rest (parts, temp files, manifests
    when overwriting) so the shards can be redone from scratch."""
    store = ManifestStore(cfg.url, storage)
    done = set() if cfg.overwrite else store.completed()
    todo = [s for s in shards if s.name not in done]
    skipped = [s.name for s in shards if s.name in done]
    redo = {s.name for s in todo}
    fs, root = store.fs, store.root
    deleted = 0
    if redo and fs.exists(root):
        stale = []
        for p in fs.find(root):
            rel = posixpath.relpath(p, root)
            base = posixpath.basename(rel)
            if rel.startswith(MANIFEST_DIR + "/"):
                if cfg.overwrite and rel[len(MANIFEST_DIR) + 1 : -len(".json")] in redo:
                    stale.append(p)
                continue
            if base.startswith(".tmp-"):
                stale.append(p)  # a write that died before its rename
                continue
            if rel.startswith("_errors/"):
                rel = rel[len("_errors/") :]
            m = PART_RE.match(rel)
            if m and m.group("shard") in redo:
                stale.append(p)
        for p in stale:
            fs.rm_file(p)
        deleted = len(stale)
        if deleted:
            log.info("deleted %d leftover file(s) of %d unfinished shard(s)", deleted, len(redo))
    return Resume(todo=todo, skipped=skipped, deleted_parts=deleted)
