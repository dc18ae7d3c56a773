"""cluster.yaml against the autoscaler schema that ships inside the installed ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_autoscaler_schema(cluster):
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_yaml_has_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # CPU head
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers.values())
    assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers.values())
    spot = [t for t in workers.values() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "a spot worker group"
    assert cluster["provider"]["type"] == "aws"
    assert any("depthray" in cmd and "pip install" in cmd for cmd in cluster["setup_commands"])
