"""cluster.yaml against Ray's own offline validation, and shared features then a sweep on a real
two-node Ray cluster (two raylets on this machine, started and stopped here) attached with --address."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from captune.trainables.config import TrainConfig
from captune.trainables.features import prepare_with_features
from mlflow import MlflowClient
from tests.test_sweep import sweep_yaml, trial_runs

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node_ports() -> list[str]:
    """Every port a raylet binds, chosen free, so two nodes (and the test session's own local
    cluster) share this machine."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [f"{n}={free_port()}" for n in names]


@pytest.fixture()
def two_node_cluster(monkeypatch):
    port = free_port()
    # A temp dir of its own (short: Ray puts sockets in it) marks every process of this cluster,
    # so the fixture stops exactly these; `ray stop` would stop the session's cluster too.
    temp = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")
    # Token authentication, as cluster.yaml sets it up: every node and the driver use the token.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp}", *ray_node_ports()]
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", f"--temp-dir={temp}", *ray_node_ports()]
    try:
        for command in (head, worker):
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        mine = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        for p in mine:
            p.terminate()
        _, alive = psutil.wait_procs(mine, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def node_cache(tmp_path, monkeypatch) -> Path:
    """The cache folder of every process of a cluster started after this fixture (theirs only)."""
    folder = tmp_path / "node-cache"
    monkeypatch.setenv("CAPTUNE_CACHE_DIR", str(folder))
    return folder


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_features_built_once_and_a_sweep_on_two_nodes_reads_them(node_cache, two_node_cluster, synth_dir,
                                                                  tmp_path, tracking_uri):
    # The storage is a folder both nodes see, as a shared mount would be. `captune features`
    # builds the frozen encoder's features there once, a Ray Data job on both nodes; the sweep
    # finds them, and its trials (2 CPUs each on an attached cluster, 2 per node: one per node)
    # read them and decode no image.
    shared = tmp_path / "shared-storage"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "CAPTUNE_STORAGE": str(shared)}
    captune = [sys.executable, "-m", "captune.cli"]
    built = subprocess.run([*captune, "features", "--data", str(synth_dir), "--encoder", "resnet18", "--image-size",
                            "32", "--set", "pretrained=false", "--address", two_node_cluster],
                           capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "features of 60 images (resnet18, 32px, 512 values each): built" in built.stdout
    [entry] = (shared / "features").glob("features-resnet18-*.npy")
    written = entry.stat().st_mtime_ns

    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=2, grace_period=2)
    doc = yaml.safe_load(config.read_text())
    doc["resnet-gru"]["fine_tune"] = False  # a frozen encoder: its features are shared
    config.write_text(yaml.safe_dump(doc))
    # The driver's own cache apart: it holds the dataset, and its test-split comparison reads it.
    done = subprocess.run(
        [*captune, "sweep", "--data", str(synth_dir), "--name", "two-node", "--arch", "resnet-gru",
         "--config", str(config), "--tracking-uri", tracking_uri, "--address", two_node_cluster],
        capture_output=True, text=True, timeout=600, env={**env, "CAPTUNE_CACHE_DIR": str(tmp_path / "driver")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nodes = json.loads(subprocess.run(
        [sys.executable, "-c", "import sys, json, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                               "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))", two_node_cluster],
        capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    runs = trial_runs(MlflowClient(tracking_uri), "two-node")
    placement = {r.data.tags["captune.trial_id"]: r.data.tags["captune.node_id"] for r in runs}
    print("trial placement:", json.dumps(placement, indent=1))
    assert len(runs) == 2 and all(r.data.tags["captune.end_state"] in ("finished", "early-stopped") for r in runs)
    assert set(placement.values()) == set(nodes) and len(nodes) == 2  # trials ran on both nodes
    assert {r.data.params["cache_dir"] for r in runs} == {str(shared / "features")}  # where they read features
    assert entry.stat().st_mtime_ns == written and len(list((shared / "features").glob("*.npy"))) == 1  # built once
    assert not list(node_cache.glob("pixels*")), list(node_cache.iterdir())  # no trial or control decoded images
    # The same features as the local one-pass path computes here.
    cfg = TrainConfig(arch="resnet-gru", encoder="resnet18", image_size=32, pretrained=False)
    _, local = prepare_with_features(synth_dir, cfg, tmp_path / "local-cache", torch.device("cpu"), progress=False)
    np.testing.assert_allclose(np.load(entry), local, atol=1e-5)
    assert len({p.name for p in (shared / "sweeps" / "two-node-resnet-gru").iterdir() if p.is_dir()}) == 2
