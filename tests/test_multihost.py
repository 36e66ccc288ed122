"""A cluster of three hosts, as cluster.yaml runs one: the head (Ray head with no CPUs, the MLflow
server on its own loopback, and the driver) and two worker hosts holding every trial CPU, each in
a network namespace of its own, joined by veth pairs on a bridge in the head's. Addresses are from
a documentation range, inside the namespaces only; nothing is routed out. A worker's loopback is
its own, as on a real second host: anything there that took the tracking URI
(http://127.0.0.1:PORT) literally would reach a trap listening on that worker's 127.0.0.1:PORT,
not MLflow. On it: shared features built once by a Ray Data job on both workers, then a sweep
whose trials run on both and read them, and `compare --seeds` after it; a storage folder only the
head sees is refused.

Needs root (CI runs as root) for `ip netns`; skips saying why otherwise."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

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
BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IPS = "198.51.100.1", ("198.51.100.2", "198.51.100.3")  # TEST-NET-2 (RFC 5737): never routed
TRAP = """
import socket, sys, threading
import psutil
def who(peer):  # the process on this host that connected (named in the failure, to find it)
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and tuple(c.laddr) == tuple(peer) and c.pid:
            try:
                return f"pid {c.pid}: {' '.join(psutil.Process(c.pid).cmdline())[:300]}"
            except psutil.Error:
                return f"pid {c.pid}"
    return "process not found"
def serve(port, name):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(64)
    while True:
        conn, peer = s.accept()
        line = f"{name} port {port} from {peer}, {who(peer)}\\n"
        conn.close()
        with open(sys.argv[1], "a") as f:
            f.write(line)
for name, port in zip(("MLflow", "Ray dashboard"), map(int, sys.argv[2:])):
    threading.Thread(target=serve, args=(port, name), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2)"
    probe = f"ctn-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


_TAKEN: set[int] = set()


def _free_port() -> int:
    """A port below Linux's ephemeral range (32768-60999) and above Ray's worker ports (10002-19999):
    one the kernel handed out (port 0) could be handed again to a Ray process binding port 0 in the
    new namespace before the server that was meant to have it binds it (seen: MLflow's, once)."""
    import random

    while True:
        port = random.randint(20000, 32000)
        if port in _TAKEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, store_template):
    why = _why_not()
    if why:
        pytest.skip(why)
    tmp_path = tmp_path_factory.mktemp("hosts")
    tag = f"{os.getpid() % 100000}"
    head, workers = f"ctn-head-{tag}", [f"ctn-w{n}-{tag}" for n in (1, 2)]
    bridge = f"ctb{tag}"
    temp = tempfile.mkdtemp(prefix="ray-mh-", dir="/tmp")  # marks every process of this cluster
    private = Path(tempfile.mkdtemp(prefix="ctn-private-", dir="/tmp"))  # the head's alone (see below)
    node_cache = tmp_path / "node-cache"  # the cache folder of every Ray process on the worker hosts
    mlflow_port, gcs_port, dashboard_port = _free_port(), _free_port(), _free_port()
    # token authentication on every node and client, as cluster.yaml sets it up
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    procs = []
    try:
        # The head's network holds a bridge; each worker host's veth pair ends on it.
        _run("ip", "netns", "add", head)
        _run("ip", "-n", head, "link", "add", bridge, "type", "bridge")
        _run("ip", "-n", head, "addr", "add", f"{HEAD_IP}/24", "dev", bridge)
        _run("ip", "-n", head, "link", "set", bridge, "up")
        _run("ip", "-n", head, "link", "set", "lo", "up")
        for n, (ns, ip) in enumerate(zip(workers, WORKER_IPS), 1):
            here, there = f"cth{n}{tag}", f"ctw{n}{tag}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            _run("ip", "link", "set", here, "netns", head)
            _run("ip", "-n", head, "link", "set", here, "master", bridge)
            _run("ip", "-n", head, "link", "set", here, "up")
            _run("ip", "link", "set", there, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", there)
            _run("ip", "-n", ns, "link", "set", there, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        in_head = ["ip", "netns", "exec", head]
        # the MLflow server as cluster.yaml starts it: mlflow/server.sh, on the head's 127.0.0.1
        server_env = {**env, "PORT": str(mlflow_port), "BACKEND_URI": f"sqlite:///{shutil.copyfile(store_template, tmp_path / 'mlflow.db')}",
                      "ARTIFACTS": str(tmp_path / "artifacts"), "MLFLOW_BIN": str(BIN / "mlflow")}
        procs.append(subprocess.Popen([*in_head, "bash", str(ROOT / "mlflow" / "server.sh")], env=server_env,
                                      stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        ports = [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                 f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        _run(*in_head, str(BIN / "ray"), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={gcs_port}",
             "--num-cpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--temp-dir={temp}", *ports, env=env, timeout=180)
        trap_logs = []
        for ns, ip in zip(workers, WORKER_IPS):
            # A worker host: its own network, and its own view of /tmp/ctn-private-* (an empty folder
            # over it, in a mount namespace of its own): what the head keeps there, it does not see.
            in_worker = ["ip", "netns", "exec", ns]
            start_worker = (f"mount -t tmpfs tmpfs {private} && exec {BIN / 'ray'} start --address={HEAD_IP}:{gcs_port} "
                            f"--node-ip-address={ip} --num-cpus=2 --temp-dir={temp} " + " ".join(ports))
            _run(*in_worker, "unshare", "--mount", "--propagation", "private", "sh", "-c", start_worker,
                 env={**env, "CAPTUNE_CACHE_DIR": str(node_cache)}, timeout=180)
            trap_logs.append(tmp_path / f"trap-{ip}.log")
            trap = subprocess.Popen([*in_worker, sys.executable, "-c", TRAP, str(trap_logs[-1]), str(mlflow_port),
                                     str(dashboard_port)], stdout=subprocess.PIPE, text=True, start_new_session=True)
            procs.append(trap)
            assert trap.stdout.readline().strip() == "ready"
        _wait_for_mlflow(in_head, mlflow_port, tmp_path / "mlflow.log")
        yield SimpleNamespace(in_head=in_head, address=f"{HEAD_IP}:{gcs_port}", env=env, trap_logs=trap_logs,
                              tracking_uri=f"http://127.0.0.1:{mlflow_port}", private=private, node_cache=node_cache,
                              store=tmp_path / "mlflow.db")
    finally:
        # Asked to end, then killed: a GCS server or raylet left running (seen: one GCS server per
        # run, after SIGTERM) would go on using CPU for the rest of the suite, its network gone.
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 15)):
            mine = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
            for p in mine:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            psutil.wait_procs(mine, timeout=grace)
        assert not [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        for ns in (head, *workers):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _wait_for_mlflow(in_head: list[str], port: int, log: Path) -> None:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=2)"
    deadline = time.time() + 90
    while subprocess.run([*in_head, sys.executable, "-c", probe], capture_output=True).returncode:
        assert time.time() < deadline, f"MLflow did not start in the head namespace: {log.read_text()[-2000:]}"
        time.sleep(1)


def _captune(hosts: SimpleNamespace, *args: str, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A captune command run on the head host, attached to the cluster."""
    return subprocess.run([*hosts.in_head, sys.executable, "-m", "captune.cli", *args, "--address", hosts.address],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**hosts.env, "CAPTUNE_CACHE_DIR": str(cache), **(env or {})})


def _worker_nodes(hosts: SimpleNamespace) -> set[str]:
    """The node IDs of the live nodes with CPUs: the worker hosts'."""
    probe = ("import sys, json, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]))")
    done = subprocess.run([*hosts.in_head, sys.executable, "-c", probe, hosts.address], capture_output=True,
                          text=True, timeout=120, env=hosts.env)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_shared_features_then_a_sweep_on_two_worker_hosts_record_everything_through_the_head(hosts, synth_dir,
                                                                                             tmp_path):
    # The storage is a folder every host sees, as a shared mount would be. `captune features`
    # builds the frozen encoder's features there once, a Ray Data job on both workers; the sweep
    # finds them, and its trials (2 CPUs each on an attached cluster: one per worker host) and its
    # control read them and decode no image.
    shared = tmp_path / "shared-storage"
    features = {"CAPTUNE_STORAGE": str(shared)}
    built = _captune(hosts, "features", "--data", str(synth_dir), "--encoder", "resnet18", "--image-size", "32",
                     "--set", "pretrained=false", cache=tmp_path / "driver", env=features)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "features of 60 images (resnet18, 32px, 512 values each): built" in built.stdout
    [entry] = (shared / "features").glob("features-resnet18-*.npy")
    written = entry.stat().st_mtime_ns

    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=2, grace_period=2)
    doc = yaml.safe_load(config.read_text())
    doc["resnet-gru"]["fine_tune"] = False  # a frozen encoder: its features are shared
    config.write_text(yaml.safe_dump(doc))
    # The driver's own cache apart: it holds the dataset, and its test-split comparison reads it.
    done = _captune(hosts, "sweep", "--data", str(synth_dir), "--name", "mh", "--arch", "resnet-gru",
                    "--config", str(config), "--tracking-uri", hosts.tracking_uri, cache=tmp_path / "driver",
                    env=features)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{hosts.store}")  # the server listens in the head's network only
    runs = trial_runs(client, "mh")
    placement = {r.data.tags["captune.trial_id"]: r.data.tags["captune.node_id"] for r in runs}
    print("trial placement:", json.dumps(placement, indent=1))
    assert len(runs) == 2 and all(r.data.tags["captune.end_state"] in ("finished", "early-stopped") for r in runs)
    assert set(placement.values()) == _worker_nodes(hosts)  # one trial on each worker host, none on the head
    assert {r.data.params["cache_dir"] for r in runs} == {str(shared / "features")}  # where they read features
    assert entry.stat().st_mtime_ns == written and len(list((shared / "features").glob("*.npy"))) == 1  # built once
    assert not list(hosts.node_cache.glob("pixels*")), list(hosts.node_cache.iterdir())  # no trial or control decoded images
    # The same features as the local one-pass path computes here.
    cfg = TrainConfig(arch="resnet-gru", encoder="resnet18", image_size=32, pretrained=False)
    _, local = prepare_with_features(synth_dir, cfg, tmp_path / "local-cache", torch.device("cpu"), progress=False)
    np.testing.assert_allclose(np.load(entry), local, atol=1e-5)
    assert len({p.name for p in (shared / "sweeps" / "mh-resnet-gru").iterdir() if p.is_dir()}) == 2

    # Seed replicates after the sweep (they draw new seeds, so a random-init encoder's features
    # differ: they read the images, on a worker host).
    compared = _captune(hosts, "compare", "mh", "--seeds", "1", "--tracking-uri", hosts.tracking_uri,
                        cache=tmp_path / "driver", env=features)
    assert compared.returncode == 0, compared.stdout[-4000:] + compared.stderr[-4000:]
    experiment = client.get_experiment_by_name("mh").experiment_id
    kinds = {}
    for run in client.search_runs([experiment], max_results=1000):
        kinds.setdefault(run.data.tags.get("captune.kind"), []).append(run)
    assert sorted(kinds) == ["compare", "control", "replicate", "search", "trial"], sorted(kinds)
    assert all(r.info.status == "FINISHED" for rs in kinds.values() for r in rs), kinds
    for run in kinds["trial"] + kinds["control"] + kinds["replicate"]:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")]
        assert steps == list(range(1, len(steps) + 1)) and steps, run.info.run_name  # every epoch, once
    for run in kinds["trial"]:  # sampled on a worker, logged through the head
        assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"), run.info.run_name
    for run in kinds["control"] + kinds["replicate"]:
        assert "test_bleu4" in run.data.metrics, run.info.run_name
    assert "captune.control_verdict" in kinds["search"][0].data.tags
    # nothing on a worker host tried the head's services at its own 127.0.0.1
    trapped = "".join(log.read_text() for log in hosts.trap_logs if log.exists())
    assert trapped == "", f"a worker reached for its own loopback: {trapped}"


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_storage_folder_only_the_driver_sees_is_refused_naming_the_nodes(hosts, synth_dir, tmp_path):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=1, epochs=1)
    storage = hosts.private / "tune"
    done = _captune(hosts, "sweep", "--data", str(synth_dir), "--name", "mh2", "--arch", "resnet-gru",
                    "--config", str(config), "--storage", str(storage), "--tracking-uri", hosts.tracking_uri,
                    cache=tmp_path / "cache")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    for ip in WORKER_IPS:
        assert f"--storage {storage} is not there on node {ip}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert MlflowClient(f"sqlite:///{hosts.store}").get_experiment_by_name("mh2") is None  # nothing recorded
