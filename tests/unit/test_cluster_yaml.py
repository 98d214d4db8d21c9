"""cluster.yaml is a valid Ray cluster-launcher config (checked with Ray's own validation)."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_passes_ray_validation():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_installs_raymesh_and_deploys_the_mesh():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["provider"]["type"] == "local"
    assert any("pip install" in c and "raymesh" in c for c in config["setup_commands"])
    assert any("meshctl install" in c for c in config["head_start_ray_commands"])
