"""Shard listing and readers, on local files and on a real S3 protocol server (moto)."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depthray.config import ConfigError, InputConfig, StorageConfig
from depthray.io import row_meta
from depthray.io.sources import SHARD_KEY, Shard, expand_braces, list_shards, read_shards

STORAGE = StorageConfig()


def test_expand_braces():
    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("plain") == ["plain"]


def _names(shards):
    return [s.name for s in shards]


def test_list_glob_brace_listfile_and_folder_local(tmp_path, make_tar, make_image):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ["000.tar", "001.tar", "sub/002.tar"]:
        (d / name).write_bytes(make_tar([("k.jpg", make_image(16, 16))]))
    glob = list_shards(InputConfig(url=f"{d}/*.tar"), STORAGE)
    assert _names(glob) == ["000", "001"] and {s.format for s in glob} == {"webdataset"}
    assert glob[0].url.startswith("file://")
    assert _names(list_shards(InputConfig(url=f"{d}/{{000..001}}.tar"), STORAGE)) == ["000", "001"]
    # Names are relative to the pattern's fixed folder, not to what matched: stable across runs.
    assert _names(list_shards(InputConfig(url=f"{d}/*/*.tar"), STORAGE)) == ["sub/002"]
    folder = list_shards(InputConfig(url=str(d)), STORAGE)
    assert _names(folder) == ["000", "001", "sub/002"]
    listfile = tmp_path / "shards.txt"
    listfile.write_text(f"# inputs\n{d}/000.tar\n\n{d}/sub/002.tar\n")
    # A list file's entries are named relative to the list file's folder: stable whatever
    # else the list holds (an entry from elsewhere never renames the others).
    assert _names(list_shards(InputConfig(url=str(listfile)), STORAGE)) == ["in/000", "in/sub/002"]
    listfile.write_text(f"{d}/000.tar\n{d}/sub/002.tar\n{tmp_path.parent}/elsewhere.tar\n")
    (tmp_path.parent / "elsewhere.tar").write_bytes(make_tar([("k.jpg", make_image(16, 16))]))
    assert _names(list_shards(InputConfig(url=str(listfile)), STORAGE)) == ["in/000", "in/sub/002", "up/elsewhere"]


def test_image_folders_are_shards(tmp_path, make_image):
    for sub in ["a", "b"]:
        (tmp_path / "imgs" / sub).mkdir(parents=True)
        (tmp_path / "imgs" / sub / "x.jpg").write_bytes(make_image(16, 16))
    shards = list_shards(InputConfig(url=str(tmp_path / "imgs")), STORAGE)
    assert _names(shards) == ["a/chunk-00000", "b/chunk-00000"] and {s.format for s in shards} == {"images"}
    one = list_shards(InputConfig(url=str(tmp_path / "imgs" / "a")), STORAGE)
    assert _names(one) == ["chunk-00000"]  # named relative to the folder given (#18)


def test_empty_glob_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing matches"):
        list_shards(InputConfig(url=f"{tmp_path}/*.tar"), STORAGE)


def test_list_on_s3(s3_bucket, make_tar, make_image):
    fs = fsspec.filesystem("s3")  # AWS_ENDPOINT_URL from the fixture
    for i in range(3):
        fs.pipe_file(f"{s3_bucket}/shards/{i:03d}.tar", make_tar([("k.jpg", make_image(16, 16))]))
    fs.pipe_file(f"{s3_bucket}/list.txt", "\n".join(f"s3://{s3_bucket}/shards/{i:03d}.tar" for i in (0, 2)).encode())
    shards = list_shards(InputConfig(url=f"s3://{s3_bucket}/shards/*.tar"), STORAGE)
    assert _names(shards) == ["000", "001", "002"]
    assert shards[0].url == f"s3://{s3_bucket}/shards/000.tar"
    assert _names(list_shards(InputConfig(url=f"s3://{s3_bucket}/list.txt"), STORAGE)) == ["shards/000", "shards/002"]
    assert _names(list_shards(InputConfig(url=f"s3://{s3_bucket}/shards/"), STORAGE)) == ["000", "001", "002"]


def read_all(shard: Shard, cfg: InputConfig | None = None) -> list[dict]:
    batch = pa.table({"name": [shard.name], "url": [shard.url], "format": [shard.format]})
    rows = []
    for table in read_shards(batch, cfg or InputConfig(), STORAGE):
        rows += table.to_pylist()
    return rows


def test_webdataset_reader_groups_by_key_and_records_problems(tmp_path, make_tar, make_image):
    img = make_image(16, 16)
    tar = make_tar([
        ("a.jpg", img), ("a.cls", b"1"),
        ("dir/b.rgb.png", img), ("dir/b.json", b"{}"),
        ("c.txt", b"no image here"),
        ("a.jpg", img),  # the key again, later: not grouped -> duplicate
        (".hidden", b"x"),
    ])
    (tmp_path / "s.tar").write_bytes(tar)
    rows = read_all(Shard("s", f"file://{tmp_path}/s.tar", "webdataset"))
    *samples, trailer = rows
    assert [r["key"] for r in samples] == ["a", "dir/b", "c", "a~dup1"]
    assert samples[0]["data"] == img and samples[0]["ext"] == "jpg"
    # "rgb.png" is not a "png" member (#18: multi-part extensions match only when named)
    assert (samples[1]["error"], samples[1]["data"]) == ("no_image", None)
    chosen = read_all(Shard("s", f"file://{tmp_path}/s.tar", "webdataset"), InputConfig(image_member=["rgb.png"]))
    assert chosen[1]["ext"] == "png" and chosen[1]["error"] is None and chosen[1]["data"] == img
    assert (samples[2]["error"], samples[2]["stage"]) == ("no_image", "read")
    assert samples[3]["error"] == "duplicate_key"
    assert trailer["key"] is None and trailer["shard_total"] == 4 and trailer["error"] is None
    assert all(r["source"] == "s" for r in rows)


def test_truncated_tar_keeps_what_was_read(tmp_path, make_tar, make_image):
    tar = make_tar([(f"{i}.jpg", make_image(32, 32, seed=i)) for i in range(4)])
    (tmp_path / "t.tar").write_bytes(tar[: len(tar) // 2])
    *samples, trailer = read_all(Shard("t", f"file://{tmp_path}/t.tar", "webdataset"))
    good = [r for r in samples if r["error"] is None]
    assert 1 <= len(good) < 4
    assert samples[-1]["key"] == SHARD_KEY and samples[-1]["error"] == "corrupt_shard"
    assert trailer["shard_total"] == len(samples) and trailer["error"] is None  # complete, with an error


def test_missing_shard_fails_the_shard_not_the_job(tmp_path):
    rows = read_all(Shard("gone", f"file://{tmp_path}/gone.tar", "webdataset"))
    assert len(rows) == 1 and rows[0]["key"] is None
    assert rows[0]["shard_total"] == 0 and rows[0]["error"] == "read_failed"
    assert "gone.tar" in rows[0]["message"]


def test_parquet_reader_bytes_struct_and_missing_key_column(tmp_path, make_image):
    img = make_image(16, 16)
    pq.write_table(pa.table({"id": ["x", "y", "z"], "image": [img, None, img]}), tmp_path / "a.parquet")
    hf = pa.table({"image": [{"bytes": img, "path": "p.jpg"}] * 2})
    pq.write_table(hf, tmp_path / "b.parquet")
    a = read_all(Shard("a", f"file://{tmp_path}/a.parquet", "parquet"), InputConfig(key_column="id"))
    assert [r["key"] for r in a] == ["x", "y", "z", None]
    assert a[0]["data"] == img and a[1]["error"] == "no_image" and a[3]["shard_total"] == 3
    # No key column: the struct's path names the row (#18; was the row number, which
    # collided across files); a key column named but absent is a corrupt shard here (the
    # job refuses it before starting: job/checks.py).
    b = read_all(Shard("b", f"file://{tmp_path}/b.parquet", "parquet"))
    assert [r["key"] for r in b] == ["p", "p~dup1", None] and b[0]["data"] == img
    assert row_meta.get(b[0])["source_path"] == "p.jpg" and b[1]["error"] == "duplicate_key"
    named = read_all(Shard("b", f"file://{tmp_path}/b.parquet", "parquet"), InputConfig(key_column="id"))
    assert named[0]["error"] == "corrupt_shard" and "no key column 'id'" in named[0]["message"]
    pq.write_table(pa.table({"image": [img, img]}), tmp_path / "c.parquet")
    c = read_all(Shard("sub/c", f"file://{tmp_path}/c.parquet", "parquet"))
    assert [r["key"] for r in c] == ["sub/c/00000000", "sub/c/00000001", None]


def test_unreadable_parquet_is_recorded(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    *errs, trailer = read_all(Shard("bad", f"file://{tmp_path}/bad.parquet", "parquet"))
    assert [e["error"] for e in errs] == ["corrupt_shard"] and trailer["shard_total"] == 1


def test_arrow_ipc_stream_and_file_shards(tmp_path, make_image):
    """`.arrow` shards in both IPC formats: the stream datasets' save_to_disk writes (its
    record batches larger than a block: cut, in order) and the file (Feather v2) format."""
    imgs = [make_image(16, 16, seed=i) for i in range(40)]
    table = pa.table({"image": imgs, "key": [f"k{i:02d}" for i in range(40)]})
    with pa.ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=100)
    with pa.ipc.new_file(tmp_path / "f.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=7)
    shards = list_shards(InputConfig(url=str(tmp_path)), STORAGE)
    assert [(s.name, s.format) for s in shards] == [("f", "arrow"), ("s", "arrow")]
    for shard in shards:
        *rows, trailer = read_all(shard)
        assert [r["key"] for r in rows] == [f"k{i:02d}" for i in range(40)] and trailer["shard_total"] == 40
        assert [r["data"] for r in rows] == imgs


def test_reader_streams_blocks_from_s3(s3_bucket, make_tar, make_image):
    fs = fsspec.filesystem("s3")
    n = 70  # more than one block of 32
    fs.pipe_file(f"{s3_bucket}/big.tar", make_tar([(f"{i:03d}.jpg", make_image(8, 8, seed=i)) for i in range(n)]))
    batch = pa.table({"name": ["big"], "url": [f"s3://{s3_bucket}/big.tar"], "format": ["webdataset"]})
    tables = list(read_shards(batch, InputConfig(), STORAGE))
    assert len(tables) >= 3  # streamed, not one block with the whole shard
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert keys[:-1] == [f"{i:03d}" for i in range(n)] and keys[-1] is None


def test_image_folders_cut_into_stable_shards_named_from_the_root(tmp_path, make_image):
    """#18 items 6-7: a folder is cut into sorted shards of input.images_per_shard, named
    relative to the root (an image added to the root renames nothing); ** and folder/*
    recurse; files that are not images are counted."""
    root = tmp_path / "imgs"
    (root / "a" / "deep").mkdir(parents=True)
    for i in range(5):
        (root / "a" / f"{i}.jpg").write_bytes(make_image(16, 16, seed=i))
    (root / "a" / "deep" / "d.png").write_bytes(make_image(16, 16, fmt="PNG"))
    (root / "a" / "note.txt").write_text("x")
    (root / "a" / "phone.heic").write_bytes(b"heic")
    cfg = InputConfig(url=str(root), images_per_shard=2)
    before = list_shards(cfg, STORAGE)
    assert _names(before) == ["a/chunk-00000", "a/chunk-00001", "a/chunk-00002", "a/deep/chunk-00000"]
    assert before.skipped == {"txt": 1, "heic": 1}
    (root / "top.jpg").write_bytes(make_image(16, 16))
    after = list_shards(cfg, STORAGE)
    assert [(s.name, s.url) for s in after if s.name.startswith("a/")] == [(s.name, s.url) for s in before]
    assert set(_names(after)) - set(_names(before)) == {"chunk-00000"}
    keys = [r["key"] for s in after for r in read_all(s, cfg) if r["key"]]
    assert sorted(keys) == ["0", "1", "2", "3", "4", "d", "top"]
    star = list_shards(InputConfig(url=f"{root}/*", images_per_shard=2), STORAGE)
    assert _names(star) == _names(after)
    globbed = list_shards(InputConfig(url=f"{root}/**/*.png"), STORAGE)
    assert _names(globbed) == ["a/deep/chunk-00000"]
    assert [r["key"] for r in read_all(globbed[0], cfg)] == ["d", None]
    # a folder changed after planning: the shard fails (the next run plans it again), never reads short
    (root / "a" / "0.jpg").unlink()
    *_, trailer = read_all(before[0], cfg)
    assert trailer["error"] == "read_failed" and "changed since" in trailer["message"]


def test_image_member_choice(tmp_path, make_tar, make_image):
    """#18 item 2: the member is chosen by extension, whole; ambiguity is an error row."""
    jpg, png = make_image(16, 16), make_image(16, 16, fmt="PNG")
    (tmp_path / "m.tar").write_bytes(make_tar([
        ("left.seg.png", png), ("left.jpg", jpg),
        ("two.jpg", jpg), ("two.png", png),
        ("mask.seg.png", png),
    ]))
    shard = Shard("m", f"file://{tmp_path}/m.tar", "webdataset")
    left, two, mask, _ = read_all(shard)
    assert left["data"] == jpg and left["ext"] == "jpg"
    assert row_meta.get(left)["unlabelled_members"] == ["seg.png"]
    assert two["error"] == "ambiguous_image" and "input.image_member" in two["message"]
    assert mask["error"] == "no_image"
    left, two, mask, _ = read_all(shard, InputConfig(image_member=["png", "jpg"]))
    assert left["data"] == jpg and two["data"] == png and mask["error"] == "no_image"


def test_the_sparse_depth_member_travels_with_its_image(tmp_path, make_tar, make_image):
    """pipelines/metric_depth.py's read: `metric.member` goes along in `sparse`, never taken
    for the image (even with a photo's extension), and a sample without it is an error row."""
    jpg, png = make_image(16, 16), make_image(16, 16, fmt="PNG")
    (tmp_path / "m.tar").write_bytes(make_tar([("a.jpg", jpg), ("a.png", png), ("b.jpg", jpg)]))
    batch = pa.table({"name": ["m"], "url": [f"file://{tmp_path}/m.tar"], "format": ["webdataset"]})
    a, b, _ = [r for t in read_shards(batch, InputConfig(), STORAGE, sparse_member="png") for r in t.to_pylist()]
    assert a["data"] == jpg and a["sparse"] == png and "unlabelled_members" not in row_meta.get(a)
    assert b["error"] == "no_sparse_depth" and "'png'" in b["message"] and "members: jpg" in b["message"]
    plain = [r for t in read_shards(batch, InputConfig(), STORAGE) for r in t.to_pylist()]
    assert plain[0]["error"] == "ambiguous_image" and plain[1]["sparse"] is None  # no member asked for
