"""cluster.yaml against Ray's own offline validation. The cluster it describes (a head with no CPUs
and MLflow on its loopback, worker hosts, shared features) runs in tests/test_multihost.py."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster_config())  # merges AWS defaults; no AWS call
    validate_config(prepared)  # Ray's JSON schema
    types = prepared["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["resources"]["GPU"] >= 2
    for name, node in types.items():  # explicit resources: nothing left for the AWS API to fill in
        assert "CPU" in node["resources"], name
    assert types["head"]["resources"]["CPU"] == 0  # trials stay off the head


def test_cluster_installs_the_project_ray_version():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(re.fullmatch(r"ray\[[^\]]*\]==(\S+)", p).group(1) for p in pins if p.startswith("ray["))
    commands = " ".join(cluster_config()["setup_commands"])
    installed = re.findall(r"ray\[[^\]]*\]==([0-9][^\"' ]*)", commands)
    assert installed == [pinned]


def test_cluster_opens_no_public_port():
    config = cluster_config()
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # Ray creates a security group with SSH open to the world unless the nodes name their own.
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), name
    assert '--host "${HOST:-127.0.0.1}"' in (ROOT / "mlflow" / "server.sh").read_text()
