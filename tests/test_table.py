"""depthray/io/table.py without Ray: what a shard's transaction adds and removes, the key
bounds it records, columns `input.keep_columns` brings, and the outputs it refuses."""

from __future__ import annotations

import pyarrow as pa
import pytest

from depthray.config import ConfigError, StorageConfig
from depthray.io.sinks import OUTPUT_SCHEMA, TableSink
from depthray.io.table import ShardTable, check_format, table_listing, table_options


def rows(keys, **extra):
    return [{"key": k, "source": "a", "width": 1, "height": 1, "depth": b"d", "uncertainty": b"u", **extra}
            for k in keys]


def test_a_shard_commit_replaces_the_shards_files_and_records_key_bounds(tmp_path):
    url = str(tmp_path / "t")
    table = ShardTable(url, StorageConfig())
    table.ensure(OUTPUT_SCHEMA)
    first = dict([TableSink(url, StorageConfig(), "m", "h1", "run1").write("a", rows(["k2", "k1"]), "0" * 16)])
    other = dict([TableSink(url, StorageConfig(), "m", "h1", "run1").write("b", rows(["z"]), "1" * 16)])
    table.commit("a", first, table.next_txn())
    table.commit("b", other, table.next_txn())
    again = dict([TableSink(url, StorageConfig(), "m", "h2", "run2").write("a", rows(["k1", "k3"]), "2" * 16)])
    assert set(again) != set(first)  # another run's names: the live files are never rewritten
    txn = table.next_txn()
    assert not table.committed("a", txn)
    version = table.commit("a", again, txn)
    assert table.committed("a", txn) and version == 3
    assert set(table.files()) == set(again) | set(other)
    from deltalake import DeltaTable

    got = DeltaTable(url).to_pyarrow_table(columns=["key", "config_hash"]).to_pylist()
    assert sorted((r["key"], r["config_hash"]) for r in got) == [("k1", "h2"), ("k3", "h2"), ("z", "h1")]
    adds = pa.table(DeltaTable(url).get_add_actions(flatten=True)).to_pylist()
    bounds = {a["path"]: (a["min.key"], a["max.key"], a["num_records"]) for a in adds}
    assert bounds[next(iter(again))] == ("k1", "k3", 2)


def test_kept_input_columns_become_table_columns(tmp_path):
    url = str(tmp_path / "t")
    table = ShardTable(url, StorageConfig())
    table.ensure(OUTPUT_SCHEMA)
    part = dict([TableSink(url, StorageConfig(), "m", "h", "r").write(
        "a", rows(["k"], meta={"columns": '{"caption": "a cat"}'}), "0" * 16)])
    table.commit("a", part, table.next_txn())
    from deltalake import DeltaTable

    assert DeltaTable(url).to_pyarrow_table(columns=["key", "caption"]).to_pylist() == [{"key": "k", "caption": "a cat"}]


def test_outputs_of_the_other_kind_are_refused():
    table = {"_delta_log/00000000000000000000.json": 10}
    plain = {"_manifest/a.json": 10, "a.parts/a.part-0123456789abcdef.parquet": 5}
    with pytest.raises(ConfigError, match="is a Delta table: set output.format: delta"):
        check_format("parquet", "out", table)
    with pytest.raises(ConfigError, match="not a Delta table"):
        check_format("delta", "out", plain)
    check_format("delta", "out", table)
    check_format("delta", "out", {})
    check_format("webdataset", "out", plain)
    assert table_listing("out", None, plain) == plain  # no table: nothing is left out


def test_table_options_follow_the_s3_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts = table_options("s3://b/out", StorageConfig())
    assert opts["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and opts["AWS_ALLOW_HTTP"] == "true"
    assert opts["AWS_REGION"] == "eu-west-1"
    assert table_options("/tmp/x", StorageConfig(region="r")) == {"AWS_REGION": "r"}


def test_a_shard_that_optimize_compacted_is_still_replaced_whole(tmp_path):
    """Delta's OPTIMIZE rewrites a shard's parts into files of its own (`source=a/...`); a
    later commit of the shard (an overwrite, a redo: its manifest's parts are gone) removes
    its whole partition, so no key is left twice and other shards are untouched."""
    from deltalake import DeltaTable

    url = str(tmp_path / "t")
    table = ShardTable(url, StorageConfig())
    table.ensure(OUTPUT_SCHEMA)
    sink = TableSink(url, StorageConfig(), "m", "h1", "run1")
    first = dict([sink.write("a", rows(["k1", "k2"]), "0" * 16), sink.write("a", rows(["k3"]), "1" * 16)])
    table.commit("a", first, table.next_txn())
    table.commit("b", dict([sink.write("b", rows(["z"], source="b"), "3" * 16)]), table.next_txn())
    DeltaTable(url).optimize.compact()
    assert not set(table.shard_files("a")) & set(first)  # rewritten: other names, other folder
    again = dict([TableSink(url, StorageConfig(), "m", "h2", "run2").write("a", rows(["k1", "k2", "k3"]), "2" * 16)])
    table.commit("a", again, table.next_txn())
    got = DeltaTable(url).to_pyarrow_table(columns=["source", "key", "config_hash"]).to_pylist()
    assert sorted((r["source"], r["key"], r["config_hash"]) for r in got) == [
        ("a", "k1", "h2"), ("a", "k2", "h2"), ("a", "k3", "h2"), ("b", "z", "h1")]
