"""Image folders as shards: every image file under the folders an input names, cut into
sorted shards of at most `input.images_per_shard` files per folder.

A shard of images is one folder's files `first`..`last` (sorted by name) that match a
basename pattern; its URL is the folder's URL with that selection as a fragment:

    file:///data/photos/2024#chunk=00003&first=a.jpg&last=f.jpg&match=%2A&n=1000&h=3f2c...

and its name is the folder's path relative to the input root plus `chunk-NNNNN`, so names
never depend on what else the root holds (images added to the root rename nothing). `h`
hashes the file names: a shard whose files changed gets another fingerprint and is redone
(depthray/io/manifest.py); a folder that changed between planning and reading is a failed
shard that the next run plans again. Files that are not images are counted, not read.
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from depthray.io.decode import IMAGE_EXTS


def file_ext(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith((".", "_"))


@dataclass
class ImageSet:
    """Image files found while listing, by folder; and what was skipped, by extension."""

    folders: dict[str, tuple] = field(default_factory=dict)  # path -> (fs, set of names, match)
    skipped: Counter = field(default_factory=Counter)

    def add(self, fs, path: str, match: str = "*") -> bool:
        """Take one file; False (and counted as skipped) when it is not an image."""
        if hidden(path):
            return False
        if file_ext(path) not in IMAGE_EXTS:
            self.skipped[file_ext(path) or "(no extension)"] += 1
            return False
        folder, name = posixpath.split(path)
        fs0, names, old = self.folders.get(folder, (fs, set(), match))
        names.add(name)
        self.folders[folder] = (fs0, names, old if old == "*" else match)
        return True

    def chunks(self, per_shard: int, full_url) -> list[str]:
        """Shard URLs, folder by folder in sorted order."""
        urls = []
        for folder in sorted(self.folders):
            fs, names, match = self.folders[folder]
            ordered = sorted(names)
            for i in range(0, len(ordered), per_shard):
                part = ordered[i:i + per_shard]
                sel = {"chunk": f"{i // per_shard:05d}", "first": part[0], "last": part[-1], "match": match,
                       "n": str(len(part)), "h": names_hash(part)}
                urls.append(full_url(fs, folder) + "#" + urlencode(sel))
        return urls


def names_hash(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def split_url(url: str) -> tuple[str, dict[str, str] | None]:
    """Folder URL and its selection (None: the whole folder, as older manifests name it)."""
    if "#" not in url:
        return url, None
    folder, frag = url.split("#", 1)
    return folder, dict(parse_qsl(frag))


def chunk_label(url: str) -> str | None:
    sel = split_url(url)[1]
    return f"chunk-{sel['chunk']}" if sel else None


def select(paths: list[str], sel: dict[str, str] | None) -> list[str]:
    """The image files of a listing that a selection names, sorted by name; raises OSError
    when the folder no longer holds what was planned."""
    files = sorted((p for p in paths if file_ext(p) in IMAGE_EXTS and not hidden(p)), key=posixpath.basename)
    if sel is None:
        return files
    files = [p for p in files if sel["first"] <= posixpath.basename(p) <= sel["last"]
             and fnmatch.fnmatchcase(posixpath.basename(p), sel["match"])]
    if names_hash([posixpath.basename(p) for p in files]) != sel["h"]:
        raise FileNotFoundError(f"the folder changed since the job was planned ({len(files)} files now, "
                                f"{sel['n']} planned); the next run plans it again")
    return files
