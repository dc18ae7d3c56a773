"""Input listing: `input.url` (glob, brace range, list file or folder) -> shards with
stable names (relative to the fixed part of the URL, so resume finds them again).
Image files are cut into shards by depthray/io/folders.py."""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass

from depthray.config import ConfigError, InputConfig, StorageConfig
from depthray.io.folders import ImageSet, chunk_label, file_ext, hidden, split_url
from depthray.io.fs import filesystem, full_url

log = logging.getLogger(__name__)

# Gzipped tars are read as they stream (tarfile's "r|*"), so they are WebDataset shards too.
# .arrow: Arrow IPC files, as Hugging Face datasets' save_to_disk writes them (io/columns.py).
SHARD_EXTS = {"tar": "webdataset", "tar.gz": "webdataset", "tgz": "webdataset", "parquet": "parquet",
              "arrow": "arrow"}
LIST_FILE_EXTS = (".txt", ".lst", ".list")
SHARD_KEY = "<shard>"  # key of an error record about a whole shard (e.g. truncated tar)


@dataclass(frozen=True)
class Shard:
    name: str  # relative path without extension; names output parts and manifests
    url: str  # full URL (file://, s3://, ...) of the file, or of the folder for images
    format: str  # webdataset | parquet | arrow | images


# ---------------------------------------------------------------------------- listing


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and `{000..099}` zero-padded ranges (shell style)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal brace, not an expansion
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [e for opt in options for e in expand_braces(head + opt + tail)]


def _ext(path: str) -> str:
    """A file's extension, `tar.gz` whole (file_ext alone says `gz`)."""
    return "tar.gz" if path.lower().endswith(".tar.gz") else file_ext(path)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _strip_ext(rel: str) -> str:
    head, base = posixpath.split(rel)
    if base.lower().endswith(".tar.gz"):
        base = base[: -len(".tar.gz")]
    elif "." in base:
        base = base.rsplit(".", 1)[0]
    return posixpath.join(head, base) if head else base


def safe_name(rel: str) -> str:
    """A shard name usable as a relative output path: no '..', no leading '/', and no part
    starting with '_' or '.' (readers skip those: pyarrow discovery would hide the shard)."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    parts = ["up" if p == ".." else re.sub(r"[^\w.\-=+@]", "_", p) for p in parts]
    return "/".join(f"x{p}" if p.startswith(("_", ".")) else p for p in parts) or "shard"


class Listing(list):
    """Shards, plus what the listing skipped: {extension: files} that are not images."""

    skipped: dict[str, int] = {}


def _url_path(url: str) -> str:
    """The part of a shard's URL that names it: for HTTP(S), the path without host and port
    (a restarted server, a mirror or a CDN serves the same shard); else the bucket/path."""
    loc = split_url(url)[0]
    if loc.startswith(("http://", "https://")):
        return loc.split("://", 1)[1].split("/", 1)[-1].split("?", 1)[0].strip("/")
    return loc.split("://", 1)[-1].rstrip("/")


def source_identity(url: str) -> str:
    """What makes two shard URLs the same input: the URL itself, except that HTTP(S) ones
    are the same wherever they are served from (scheme, host and port left out)."""
    return "http:" + _url_path(url) if url.startswith(("http://", "https://")) else url


def _name_shards(urls: list[str], formats: list[str], base: str | None = None) -> list[Shard]:
    paths = [_url_path(u) for u in urls]
    web = [u.startswith(("http://", "https://")) for u in urls]
    if base is not None and any(web):
        # A list file's folder is no base for HTTP entries (another scheme or host): those
        # are named by their URL path, which no server move and no new entry changes.
        return _named([(u, p, f, "") if w else (u, p, f, base) for u, p, f, w in zip(urls, paths, formats, web)])
    if base is None:
        base = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
        if base in paths and len(set(paths)) == 1 and formats[0] == "images":  # one folder
            base = posixpath.dirname(base)
    return _named([(u, p, f, base) for u, p, f in zip(urls, paths, formats)])


def _named(entries: list[tuple[str, str, str, str | None]]) -> list[Shard]:
    """Shards from (url, path, format, base): named by the path relative to its base."""
    shards = []
    for url, path, fmt, base in entries:
        rel = posixpath.relpath(path, base) if base else path
        name = rel if fmt == "images" else _strip_ext(rel)
        if fmt == "images" and chunk_label(url):
            name = posixpath.join(name, chunk_label(url))
        shards.append(Shard(name=safe_name(name), url=url, format=fmt))
    seen: dict[str, str] = {}
    for s in shards:
        if s.name in seen:
            raise ConfigError(f"input.url: shards {seen[s.name]} and {s.url} map to the same name {s.name!r}")
        seen[s.name] = s.url
    return shards


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    ext = _ext(path)
    if ext in SHARD_EXTS:
        return SHARD_EXTS[ext]
    raise ConfigError(f"input.format: cannot tell the format of {path!r} from its extension "
                      f"({'.' + ext if ext else 'none'}; shards are {', '.join('.' + e for e in SHARD_EXTS)}, "
                      "images come from folders or globs); set input.format")


def _list_folder(fs, root: str, declared: str, images: ImageSet) -> tuple[list[str], list[str]]:
    """Shard files under a folder (recursively); for image folders, every image file under
    it goes to `images` (cut into shards later) and other files are counted as skipped."""
    files = sorted(p for p in fs.find(root) if not hidden(p))
    shard_files = [p for p in files if _ext(p) in SHARD_EXTS and declared in ("auto", SHARD_EXTS[_ext(p)])]
    shard_files = _saved_datasets_only(fs, files, shard_files)
    if shard_files and declared != "images":
        return [full_url(fs, p) for p in shard_files], [SHARD_EXTS[_ext(p)] for p in shard_files]
    for p in files:
        images.add(fs, p)
    return [], []


def _saved_datasets_only(fs, files: list[str], shard_files: list[str]) -> list[str]:
    """In a folder `datasets.save_to_disk` wrote (a `state.json` beside its `.arrow` files;
    each split's folder of a DatasetDict has one), the shards are the files its
    `_data_files` lists: `.map()` on a dataset loaded from there writes `cache-*.arrow`
    files beside them, which are no part of it."""
    listed: dict[str, set[str]] = {}
    for p in files:
        if posixpath.basename(p) == "state.json":
            try:
                state = json.loads(fs.cat_file(p))
                listed[posixpath.dirname(p)] = {d["filename"] for d in state["_data_files"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not datasets' state.json: its folder is listed as any folder
    keep = [p for p in shard_files if _ext(p) != "arrow" or posixpath.basename(p) in
            listed.get(posixpath.dirname(p), {posixpath.basename(p)})]
    if len(keep) < len(shard_files):
        log.info("input: %d .arrow file(s) not listed by their folder's state.json left out (datasets cache files)",
                 len(shard_files) - len(keep))
    return keep


def list_shards(cfg: InputConfig, storage: StorageConfig) -> Listing:
    """Resolve `input.url` (glob, brace range, list file or folder) to shards, in order.
    Image files (from folders, recursively, or matched by a glob, `**` included) become
    shards of at most `input.images_per_shard` files of one folder (depthray/io/folders.py).

    Brace-expanded names are not checked for existence here (that would be one request
    per shard); a missing shard is reported by the reader and retried on the next run.
    """
    url = cfg.url
    list_base = None
    if url.lower().endswith(LIST_FILE_EXTS):
        fs, path = filesystem(url, storage)
        lines = fs.cat_file(path).decode().splitlines()
        patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        # A list file's entries are named relative to the list file's own folder, never to
        # whatever folder they happen to share: an entry added from elsewhere renames nothing.
        list_base = posixpath.dirname(path)
    else:
        patterns = [url]
    urls: list[str] = []
    formats: list[str] = []
    images = ImageSet()
    # Names are relative to the fixed part of input.url (the folder before any wildcard or
    # brace), not to whatever happened to match, so they stay the same from run to run
    # (resume depends on it).
    base = None
    if len(patterns) == 1:
        fixed = re.split(r"[*?\[{]", patterns[0], maxsplit=1)[0]
        if fixed != patterns[0]:
            # (+ "x": resolves a relative local path while keeping a trailing "/" meaningful)
            base = posixpath.dirname(filesystem(fixed + "x", storage)[1])
    for pattern in patterns:
        for item in expand_braces(pattern):
            fs, path = filesystem(item, storage)
            if _has_glob(path):
                for p in sorted(fs.glob(path)):
                    if fs.isdir(p):
                        found, fmts = _list_folder(fs, p, cfg.format, images)
                        urls += found
                        formats += fmts
                    elif cfg.format in ("auto", "images") and _ext(p) not in SHARD_EXTS:
                        images.add(fs, p, match=posixpath.basename(path))
                    else:
                        urls.append(full_url(fs, p))
                        formats.append(_format_of(p, cfg.format))
            elif _ext(path) in SHARD_EXTS or (cfg.format in SHARD_EXTS.values() and not fs.isdir(path)):
                urls.append(full_url(fs, path))
                formats.append(_format_of(path, cfg.format))
            elif fs.isdir(path):
                found, fmts = _list_folder(fs, path, cfg.format, images)
                urls += found
                formats += fmts
                if len(patterns) == 1:
                    base = path.rstrip("/")  # names relative to the folder given
            else:
                raise ConfigError(f"input.url: {item} is neither a shard file nor a folder")
    chunks = images.chunks(cfg.images_per_shard, full_url)
    urls += chunks
    formats += ["images"] * len(chunks)
    if not urls:
        skipped = f" (skipped, not images: {dict(images.skipped)})" if images.skipped else ""
        raise ConfigError(f"input.url: nothing matches {url!r}{skipped}")
    listing = Listing(_name_shards(urls, formats, list_base if list_base is not None else base))
    listing.skipped = dict(images.skipped)
    return listing
