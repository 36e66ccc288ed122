"""A sweep on two hosts: the head (Ray head with no CPUs, the MLflow server on its own loopback,
as cluster.yaml runs it, and the driver) and a worker holding every trial CPU, each in a network
namespace of its own joined by a veth pair. Addresses are from a documentation range, inside the
namespaces only; nothing is routed out. The worker's loopback is its own, as on a real second
host: anything there that took the tracking URI (http://127.0.0.1:PORT) literally would reach a
trap listening on the worker's 127.0.0.1:PORT, not MLflow.

Needs root (CI runs as root) for `ip netns`; skips saying why otherwise."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from mlflow import MlflowClient
from tests.test_sweep import sweep_yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "198.51.100.1", "198.51.100.2"  # TEST-NET-2 (RFC 5737): never routed
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
def two_hosts(tmp_path_factory, store_template):
    why = _why_not()
    if why:
        pytest.skip(why)
    tmp_path = tmp_path_factory.mktemp("two-hosts")
    tag = f"{os.getpid() % 100000}"
    head, worker = f"ctn-head-{tag}", f"ctn-work-{tag}"
    temp = tempfile.mkdtemp(prefix="ray-mh-", dir="/tmp")  # marks every process of this cluster
    private = Path(tempfile.mkdtemp(prefix="ctn-private-", dir="/tmp"))  # the head's alone (see below)
    mlflow_port, gcs_port, dashboard_port = _free_port(), _free_port(), _free_port()
    # token authentication on every node and client, as cluster.yaml sets it up
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    procs = []
    try:
        _run("ip", "netns", "add", head)
        _run("ip", "netns", "add", worker)
        _run("ip", "link", "add", f"cth{tag}", "type", "veth", "peer", "name", f"ctw{tag}")
        for ns, end, ip in ((head, f"cth{tag}", HEAD_IP), (worker, f"ctw{tag}", WORKER_IP)):
            _run("ip", "link", "set", end, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", end)
            _run("ip", "-n", ns, "link", "set", end, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        in_head, in_worker = ["ip", "netns", "exec", head], ["ip", "netns", "exec", worker]
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
        # The worker host: its own network, and its own view of /tmp/ctn-private-* (an empty folder
        # over it, in a mount namespace of its own): what the head keeps there, the worker does not see.
        start_worker = (f"mount -t tmpfs tmpfs {private} && exec {BIN / 'ray'} start --address={HEAD_IP}:{gcs_port} "
                        f"--node-ip-address={WORKER_IP} --num-cpus=2 --temp-dir={temp} " + " ".join(ports))
        _run(*in_worker, "unshare", "--mount", "--propagation", "private", "sh", "-c", start_worker, env=env,
             timeout=180)
        trap_log = tmp_path / "trap.log"
        trap = subprocess.Popen([*in_worker, sys.executable, "-c", TRAP, str(trap_log), str(mlflow_port),
                                 str(dashboard_port)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(trap)
        assert trap.stdout.readline().strip() == "ready"
        _wait_for_mlflow(in_head, mlflow_port, tmp_path / "mlflow.log")
        yield {"in_head": in_head, "address": f"{HEAD_IP}:{gcs_port}", "tracking_uri": f"http://127.0.0.1:{mlflow_port}",
               "env": env, "trap_log": trap_log, "private": private, "mlflow_port": mlflow_port}
    finally:
        # Asked to end, then killed: a GCS server or raylet left running (seen: one GCS server per
        # run, after SIGTERM) would go on using CPU for the rest of the suite, its network gone.
        for sig in (signal.SIGTERM, signal.SIGKILL):
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
            psutil.wait_procs(mine, timeout=15)
        assert not [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        for ns in (head, worker):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _wait_for_mlflow(in_head: list[str], port: int, log: Path) -> None:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=2)"
    deadline = time.time() + 90
    while subprocess.run([*in_head, sys.executable, "-c", probe], capture_output=True).returncode:
        assert time.time() < deadline, f"MLflow did not start in the head namespace: {log.read_text()[-2000:]}"
        time.sleep(1)


def _captune(hosts: dict, *args: str, cache: Path) -> subprocess.CompletedProcess:
    """A captune command run on the head host, attached to the two-host cluster."""
    return subprocess.run([*hosts["in_head"], sys.executable, "-m", "captune.cli", *args, "--tracking-uri",
                           hosts["tracking_uri"], "--address", hosts["address"]], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**hosts["env"], "CAPTUNE_CACHE_DIR": str(cache)})


def _client(hosts: dict):
    """What the head's MLflow server holds, read by the test from its SQLite file (the server
    listens in the head's network only)."""
    return MlflowClient(f"sqlite:///{hosts['trap_log'].parent / 'mlflow.db'}")


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_sweep_on_two_hosts_records_everything_through_the_head(two_hosts, synth_dir, tmp_path):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=2, epochs=2, grace_period=2)
    done = _captune(two_hosts, "sweep", "--data", str(synth_dir), "--name", "mh", "--arch", "resnet-gru",
                    "--config", str(config), "--storage", str(tmp_path / "tune"), "--seeds", "1",
                    cache=tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    client = _client(two_hosts)
    experiment = client.get_experiment_by_name("mh").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    kinds = {}
    for run in runs:
        kinds.setdefault(run.data.tags.get("captune.kind"), []).append(run)
    assert sorted(kinds) == ["compare", "control", "replicate", "search", "trial"], sorted(kinds)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    nodes = {r.data.tags["captune.node_id"] for r in kinds["trial"]}
    assert len(nodes) == 1  # the worker: the head has no CPU for trials
    for run in kinds["trial"] + kinds["control"] + kinds["replicate"]:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "bleu4")]
        assert steps == list(range(1, len(steps) + 1)) and steps, run.info.run_name  # every epoch, once
    for run in kinds["trial"]:  # sampled on the worker, logged through the head
        assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"), run.info.run_name
    for run in kinds["control"] + kinds["replicate"]:
        assert "test_bleu4" in run.data.metrics, run.info.run_name
    assert "captune.control_verdict" in kinds["search"][0].data.tags
    # nothing on the worker host tried the head's services at its own 127.0.0.1
    trapped = two_hosts["trap_log"].read_text() if two_hosts["trap_log"].exists() else ""
    assert trapped == "", f"the worker reached for its own loopback: {trapped}"


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_storage_folder_only_the_driver_sees_is_refused_naming_the_node(two_hosts, synth_dir, tmp_path):
    config = sweep_yaml(tmp_path / "sweep.yaml", trials=1, epochs=1)
    storage = two_hosts["private"] / "tune"
    done = _captune(two_hosts, "sweep", "--data", str(synth_dir), "--name", "mh2", "--arch", "resnet-gru",
                    "--config", str(config), "--storage", str(storage), cache=tmp_path / "cache")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"--storage {storage} is not there on node {WORKER_IP}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert _client(two_hosts).get_experiment_by_name("mh2") is None  # nothing recorded
