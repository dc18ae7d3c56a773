"""The commit of one shard, and the repair of a commit a crash cut short.

A shard is complete when the write stage has acknowledged every row its reader announced
(depthray/job/ledger.py). Its parts then lie in `_staging/`; committing it:

 1. checks this run still holds the output's lease (`fence`: its generation, recorded);
 2. writes the commit record `_pending/{shard}.json`: the manifest-to-be and the parts it
    replaces (an overwrite's old parts);
 3. takes the replaced parts out of readers' sight (local disk: the shard's folders move
    into `_trash/`; S3: they are deleted), so a reader never sees old and new keys at once;
 4. moves the new parts into place. Local disk: one directory rename per folder
    (`{shard}.parts/`, then `_errors/{shard}.parts/`), so a plain reader sees all of a
    shard's parts or none. S3: a server-side copy per part (no multi-object atomicity
    exists there: a reader can see some of the shard's parts until step 7 or the repair);
 5. deletes `_trash/`;
 6. writes `_manifest/{shard}.json` (what depthray's readers and resume trust);
 7. deletes the commit record.

A Delta output (`output.format: delta`, depthray/io/table.py) has no result parts to move:
its record also notes an application version, and step 4 for results is one table
transaction (the shard's files the table listed out, the new ones in, that version), taken
first; steps 3-4 then move only the error parts. Whether a cut commit's transaction got in,
the table's log says (`ShardTable.committed`), so a replay never adds a shard twice.

Steps 3-7 are idempotent and need nothing but the commit record, so `repair` (the next run,
before any work, whatever its settings and mode) replays them for every record it finds:
a crash anywhere in a commit ends in the shard committed, never in parts visible without a
manifest or an overwritten shard's keys seen twice. A record whose new parts are gone
(somebody deleted them) is dropped instead, and the shard is redone. Every named step calls
depthray/crash_points.py, where tests kill the driver.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import uuid
from typing import Callable

from depthray import crash_points
from depthray.io.fs import fsync_dir, is_local, join, write_atomic
from depthray.io.manifest import ManifestStore, manifest_parts
from depthray.io.sinks import ERRORS_DIR, SHARD_DIR, STAGING_DIR, part_shard
from depthray.io.table import ShardTable

log = logging.getLogger(__name__)

PENDING_DIR = "_pending"  # commit records of commits under way
TRASH_DIR = "_trash"  # local disk: replaced shard folders, out of readers' sight until deleted


class CommitBroken(RuntimeError):
    """A commit record whose new parts are neither staged nor in place."""


def shard_folders(shard: str) -> tuple[str, str]:
    """The shard's result folder and error folder, relative to the output."""
    return f"{shard}{SHARD_DIR}", f"{ERRORS_DIR}/{shard}{SHARD_DIR}"


class Committer:
    def __init__(self, store: ManifestStore, fence: Callable[[], int] | None = None,
                 table: ShardTable | None = None):
        self.store = store
        self.fs, self.root = store.fs, store.root
        self.local = is_local(store.fs)
        self.fence = fence  # the lease's verify: raises once another run took the output over
        self.table = table  # a Delta output's table; repair opens it when a record names one

    def record_path(self, shard: str) -> str:
        return join(self.root, PENDING_DIR, f"{shard}.json")

    def commit(self, shard: str, manifest: dict, replaced: list[str] | None = None) -> None:
        crash_points.reached("commit_start")
        if self.fence is not None:
            manifest = {**manifest, "lease_generation": self.fence()}
        record = {"shard": shard, "manifest": manifest, "replaced": sorted(replaced or [])}
        if self.table is not None:
            record["table_txn"] = self.table.next_txn()
        write_atomic(self.fs, self.record_path(shard), json.dumps(record, sort_keys=True).encode())
        self.finish(record, staged=True)

    def finish(self, record: dict, staged: bool = False, listing: dict[str, int] | None = None) -> None:
        """Steps 3-7 for one record. `staged`: just written by this run, so every new part
        is in `_staging/` (no need to look); else `listing` says where each part is."""
        shard, manifest = record["shard"], record["manifest"]
        new = manifest_parts(manifest)
        replaced, folders = set(record["replaced"]), shard_folders(shard)
        if "table_txn" in record:  # results: one table transaction; then errors as below
            manifest = self._table_commit(record, None if staged else listing or {})
            new = {p: s for p, s in new.items() if p.startswith(ERRORS_DIR + "/")}
            replaced, folders = {p for p in replaced if p.startswith(ERRORS_DIR + "/")}, folders[1:]
        if self.local:
            self._local_parts(shard, set(new), replaced, folders)
        else:
            self._object_parts(new, replaced, None if staged else listing or {})
        crash_points.reached("before_manifest")
        self.store.write(shard, manifest)
        crash_points.reached("after_manifest")
        self.fs.rm_file(self.record_path(shard))

    # ------------------------------------------------------------------ Delta table
    def _table_commit(self, record: dict, listing: dict[str, int] | None) -> dict:
        """The shard's transaction unless the table's log shows it in already (a replay);
        returns the manifest with a table version that holds the shard."""
        shard, manifest, txn = record["shard"], record["manifest"], record["table_txn"]
        if self.table is None:
            self.table = ShardTable(self.store.url, self.store.storage)
        results = dict(manifest.get("parts") or {})
        if self.table.committed(shard, txn):
            version = self.table.version()
        else:
            gone = sorted(p for p in results if listing is not None and p not in listing)
            if gone:
                raise CommitBroken(f"shard {shard}: parts {gone} are gone")
            crash_points.reached("table_commit")
            version = self.table.commit(shard, results, txn)
        crash_points.reached("table_committed")
        return {**manifest, "table_version": version}

    # ------------------------------------------------------------------ local disk
    def _local_parts(self, shard: str, new: set[str], replaced: set[str],
                     folders: tuple[str, ...] | None = None) -> None:
        trash = join(self.root, TRASH_DIR, uuid.uuid4().hex)
        moves = []
        hidden = False
        for folder in folders if folders is not None else shard_folders(shard):
            staged, final = join(self.root, STAGING_DIR, folder), join(self.root, folder)
            want = {posixpath.basename(p) for p in new if posixpath.dirname(p) == folder}
            if os.path.isdir(staged):  # not published yet: whatever lies at the final name is old
                if want - set(os.listdir(staged)):
                    raise CommitBroken(f"shard {shard}: staged parts {sorted(want - set(os.listdir(staged)))} are gone")
                moves.append((staged, final, want))
                if os.path.exists(final):
                    hidden = self._hide(final, trash) or hidden
            elif want:  # published by the run that crashed: it must hold every new part
                have = set(os.listdir(final)) if os.path.isdir(final) else set()
                if want - have:
                    raise CommitBroken(f"shard {shard}: parts {sorted(want - have)} are neither staged nor in place")
            elif os.path.exists(final):  # no new parts here: the folder holds old ones only
                hidden = self._hide(final, trash) or hidden
        for rel in sorted(replaced - new):  # parts of the old side-by-side layout
            if posixpath.dirname(rel) not in shard_folders(shard) and os.path.exists(join(self.root, rel)):
                os.remove(join(self.root, rel))
                hidden = True
        if hidden:
            crash_points.reached("old_parts_hidden")
        for staged, final, want in moves:
            for name in os.listdir(staged):  # a retried write's stray part, a dead temp file
                if name not in want:
                    os.remove(join(staged, name))
            if not want:
                os.rmdir(staged)
                continue
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            os.rename(staged, final)  # the shard's parts appear at once
            fsync_dir(posixpath.dirname(final))
            crash_points.reached("part_moved")
        crash_points.reached("new_parts_in_place")
        shutil.rmtree(join(self.root, TRASH_DIR), ignore_errors=True)

    def _hide(self, final: str, trash: str) -> bool:
        os.makedirs(trash, exist_ok=True)
        os.rename(final, join(trash, uuid.uuid4().hex))
        return True

    # ------------------------------------------------------------------ object stores
    def _object_parts(self, new: dict[str, int], replaced: set[str], listing: dict[str, int] | None) -> None:
        gone = sorted(replaced - set(new))
        for rel in gone:  # old keys go first: a reader may miss the shard for a moment, never doubles it
            try:
                self.fs.rm_file(join(self.root, rel))
            except FileNotFoundError:
                pass
        if gone:
            crash_points.reached("old_parts_hidden")
        for rel, size in sorted(new.items()):
            src = join(self.root, STAGING_DIR, rel)
            if listing is not None and f"{STAGING_DIR}/{rel}" not in listing:
                if rel in listing and (size < 0 or listing[rel] == size):
                    continue  # moved before the crash
                raise CommitBroken(f"part {rel} is neither staged nor in place")
            self.fs.cp_file(src, join(self.root, rel))  # server-side copy: appears whole
            self.fs.rm_file(src)
            crash_points.reached("part_moved")
        crash_points.reached("new_parts_in_place")


def repair(store: ManifestStore) -> dict[str, int]:
    """Before any work: finish every commit a crash cut short, delete visible parts of shards
    no manifest or record claims, empty `_trash/`. Independent of the run's settings and
    mode (a run refused for its settings repairs first). Returns what it did, counted."""
    committer = Committer(store)
    listing = store.listing()
    done = {"commits_finished": 0, "commits_dropped": 0, "orphan_parts_deleted": 0}
    for rel in sorted(r for r in listing if r.startswith(PENDING_DIR + "/") and r.endswith(".json")
                      and not posixpath.basename(r).startswith(".")):
        record = json.loads(store.fs.cat_file(join(store.root, rel)))
        try:
            committer.finish(record, listing=listing)
            done["commits_finished"] += 1
            log.warning("finished the commit of shard %s that an earlier run was stopped in", record["shard"])
        except CommitBroken as e:
            store.fs.rm_file(join(store.root, rel))
            done["commits_dropped"] += 1
            log.warning("dropped an interrupted commit (%s); the shard will be redone", e)
    if done["commits_finished"] or done["commits_dropped"]:
        listing = store.listing()
    committed = ManifestStore.names_in(listing)
    for rel in listing:  # staged parts are left to resume; `_trash/` goes below, whole
        visible = rel.startswith(ERRORS_DIR + "/") or not rel.startswith(("_", "."))
        shard = part_shard(rel) if visible else None
        if shard is not None and shard not in committed:
            store.fs.rm_file(join(store.root, rel))
            done["orphan_parts_deleted"] += 1
    if done["orphan_parts_deleted"]:
        log.warning("deleted %d visible part(s) of shards without a manifest", done["orphan_parts_deleted"])
    if committer.local:
        shutil.rmtree(join(store.root, TRASH_DIR), ignore_errors=True)
    return done
