"""The row's typed metadata (depthray/io/row_meta.py): a fact the schema does not name, or a
value its type cannot hold, fails where a stage sets it; the outputs' JSON is what it was."""

from __future__ import annotations

import json

import pytest

from depthray.io import records, row_meta


def test_unknown_or_mistyped_facts_fail_where_they_are_set():
    row: dict = {}
    with pytest.raises(KeyError, match="output_spcae"):
        row_meta.put(row, output_spcae="depth")
    with pytest.raises(TypeError, match="source_offset"):
        row_meta.put(row, source_offset="512 bytes in")
    with pytest.raises(TypeError, match="quality"):
        row_meta.put(row, quality={"passed": "maybe"})
    with pytest.raises(TypeError, match="source_size"):
        row_meta.put(row, source_size=2**64)  # past int64: it would fail the whole block later
    with pytest.raises(TypeError, match="unlabelled_members"):
        row_meta.put(row, unlabelled_members=["seg.png", 3])
    # a key inside a struct the schema does not name: Arrow would drop it without a word
    with pytest.raises(KeyError, match=r"metric\.sorce"):
        row_meta.put(row, metric={"scale": 2.0, "sorce": "model"})
    with pytest.raises(KeyError, match=r"quality\.pased"):
        row_meta.put(row, quality={"pased": True})
    assert row == {}  # nothing half-set


def test_facts_travel_typed_between_stages_and_leave_as_json():
    row = {"source": "s", "key": "k"}
    row_meta.put(row, source_url="file:///a.tar", source_offset=512, columns={"tags": ["a", 1], "n": None})
    row_meta.put(row, output_space="disparity", low_confidence=False)
    table = records.to_table([row], records.PREDICTED)  # the struct, as Ray Data blocks hold it
    assert table.schema.field("meta").type == row_meta.META
    back = table.to_pylist()[0]
    assert back["meta"]["source_member"] is None  # unset fields are null in the struct ...
    got = row_meta.get(back)  # ... and absent from what the outputs write
    assert got == {"source_url": "file:///a.tar", "source_offset": 512, "columns": {"tags": ["a", 1], "n": None},
                   "output_space": "disparity", "low_confidence": False}
    assert json.loads(row_meta.to_json(back, model="m")) == {"model": "m", **got}
