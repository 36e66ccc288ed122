"""The fork server that Ray's workers are forked from (captune.infra.forkserver, through
captune.infra.fork_stand_in): first without Ray, this test process standing in for the raylet, then under
the real local Ray cluster."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from captune.infra.fork_stand_in import PRELOAD_OPTION, _remove_stale
from captune.infra.forkserver import _private_folder, socket_path
from captune.trainables import WORKER_PRELOAD

PRELOAD = PRELOAD_OPTION + ",".join(WORKER_PRELOAD)  # as worker_command(WORKER_PRELOAD) gives it to Ray

WORKER = textwrap.dedent("""
    import json, os, sys, time
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "cwd": os.getcwd(),
                      "env": os.environ.get("CAPTUNE_TEST_VALUE"), "pgid": os.getpgrp(),
                      "ray_address": os.environ.get("RAY_ADDRESS"),
                      "preloaded": "captune.trainables.loop" in sys.modules}), flush=True)
    if sys.argv[1] == "sleep":
        time.sleep(300)
    if sys.argv[1] == "unraisable":  # errors raised where Python can only report them: weakref callbacks
        import weakref

        class Target:
            pass

        def raiser(error):
            def callback(ref):
                raise error
            return callback

        refs = []
        for error in (SystemExit(1), ValueError("a real fault")):
            target = Target()
            refs.append(weakref.ref(target, raiser(error)))
            del target
    sys.exit(int(sys.argv[2]))
""")


@pytest.fixture(scope="module")
def worker_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("forkserver") / "worker.py"
    path.write_text(WORKER)
    yield path
    # The server serves this test process (as it would a raylet) until it ends; end it now.
    server = socket_path(os.getpid(), WORKER_PRELOAD)
    for p in psutil.process_iter(["cmdline"]):
        if server in (p.info["cmdline"] or []):
            p.terminate()


def stand_in(script, *args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "captune.infra.fork_stand_in", PRELOAD, str(script), *args],
                            stdout=subprocess.PIPE, text=True, cwd=script.parent,
                            env={**os.environ, "CAPTUNE_TEST_VALUE": "from the stand-in", **env},
                            process_group=0)  # as Ray starts a worker: in a group of its own


def first_line(proc: subprocess.Popen) -> dict:
    return json.loads(proc.stdout.readline())


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_worker_runs_as_a_fork_with_the_stand_ins_arguments_streams_and_exit_status(worker_script):
    proc = stand_in(worker_script, "exit", "3", "--gcs-address=10.0.0.1:6379")
    seen = first_line(proc)
    assert proc.wait(timeout=120) == 3
    assert seen["pid"] != proc.pid and "captune.infra.forkserver" in psutil.Process(seen["ppid"]).cmdline()  # a fork of the server
    assert seen["argv"] == [str(worker_script), "exit", "3", "--gcs-address=10.0.0.1:6379"]
    # the worker's own cluster, for Ray's State API when this machine runs two local clusters
    assert seen["ray_address"] == "10.0.0.1:6379"
    assert seen["cwd"] == str(worker_script.parent)
    assert seen["env"] == "from the stand-in"
    assert seen["pgid"] == proc.pid  # the stand-in's process group, which Ray signals to end it
    assert seen["preloaded"]  # the training code was imported before the fork


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_worker_ending_by_systemexit_in_a_callback_reports_no_traceback_and_other_faults_still_show(worker_script):
    # Ray's SIGTERM handler raises SystemExit wherever the worker is; inside a weakref callback Python
    # would print "Exception ignored ... SystemExit" to the user's console. Other faults there still show.
    proc = subprocess.Popen([sys.executable, "-m", "captune.infra.fork_stand_in", PRELOAD, str(worker_script),
                             "unraisable", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=worker_script.parent, process_group=0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "captune.infra.forkserver" in psutil.Process(json.loads(out.splitlines()[0])["ppid"]).cmdline()  # a fork
    assert "ValueError: a real fault" in err and err.count("Exception ignored") == 1, err
    assert "SystemExit" not in err, err


@pytest.mark.slow  # its own Ray cluster, server or processes: not in make test-fast
def test_a_server_leaves_no_files_once_its_raylet_has_ended(tmp_path):
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands in for a raylet
    path = os.path.join(_private_folder(), f"{raylet.pid}-testonly.sock")
    log = open(path[:-len(".sock")] + ".log", "ab")
    open(path + ".lock", "w").close()
    server = subprocess.Popen([sys.executable, "-m", "captune.infra.forkserver", path, str(raylet.pid)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
        time.sleep(0.2)
    raylet.kill()
    raylet.wait()
    assert server.wait(timeout=30) == 0
    assert not [n for n in os.listdir(_private_folder()) if n.startswith(f"{raylet.pid}-")]
    # files a killed server left behind (its raylet gone too) are removed when a server starts
    for name in (f"{raylet.pid}-gone.sock.lock", f"{raylet.pid}-gone.log"):
        open(os.path.join(_private_folder(), name), "w").close()
    mine = os.path.join(_private_folder(), f"{os.getpid()}-testonly.log")  # a live raylet's: kept
    open(mine, "w").close()
    _remove_stale(_private_folder())
    assert not [n for n in os.listdir(_private_folder()) if n.startswith(f"{raylet.pid}-")]
    assert os.path.exists(mine)
    os.unlink(mine)


@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
def test_signals_reach_the_worker_and_it_does_not_outlive_its_stand_in(worker_script):
    proc = stand_in(worker_script, "sleep", "0")
    worker = first_line(proc)["pid"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # the worker's end, passed on
    assert not _running(worker)

    proc = stand_in(worker_script, "sleep", "0")
    os.kill(first_line(proc)["pid"], signal.SIGKILL)  # (Ray ends a stuck worker so)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # passed on too, though it cannot be handled

    proc = stand_in(worker_script, "sleep", "0")
    worker = first_line(proc)["pid"]
    proc.kill()  # SIGKILL cannot be relayed: the worker notices its stand-in is gone
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)


@pytest.mark.slow  # over 3 s in runs/test-durations.json: not in make test-fast
def test_without_a_server_the_worker_starts_plainly(worker_script, tmp_path):
    # A server that cannot import what it preloads exits; the worker must start all the same.
    (tmp_path / "nltk.py").write_text("raise ImportError('broken on purpose by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CAPTUNE_TEST_VALUE": "plain"}
    # Through a shell, so that the stand-in's parent (its "raylet") has no server yet.
    proc = subprocess.Popen(["sh", "-c", f'{sys.executable} -m captune.infra.fork_stand_in {PRELOAD} "$0" exit 4', str(worker_script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = first_line(proc)
    assert proc.wait(timeout=120) == 4
    assert seen["ppid"] == proc.pid and not seen["preloaded"] and seen["env"] == "plain"  # exec'd in place
    assert "starting this worker without it" in proc.stderr.read()


def test_ray_workers_are_forks_and_ending_one_leaves_the_others(ray_cluster):
    ray = ray_cluster

    @ray.remote
    class Probe:
        def where(self):
            import sys

            return os.getpid(), os.getppid(), "captune.trainables.loop" in sys.modules

    a, b = Probe.remote(), Probe.remote()
    (pid_a, server_a, preloaded), (pid_b, server_b, _) = ray.get([a.where.remote(), b.where.remote()])
    assert preloaded and server_a == server_b
    assert "captune.infra.forkserver" in psutil.Process(server_a).cmdline()
    ray.kill(a)  # Ray ends the actor's process group: that must not reach the server or b
    time.sleep(2)
    assert not _running(pid_a)
    assert ray.get(b.where.remote())[0] == pid_b and _running(server_a)
    ray.kill(b)  # its CPU back to the session's cluster


def test_forked_workers_make_distinct_placement_group_ids(ray_cluster):
    # Ray's native library seeds its id generator as it loads: loaded in the server, every fork
    # made the same placement group ids, and two searches' trials shared one placement group.
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Maker:  # an actor: a worker process of its own
        def first_placement_group(self):
            from ray.util.placement_group import placement_group, remove_placement_group

            group = placement_group([{"CPU": 0.01}])
            remove_placement_group(group)
            return os.getpid(), group.id.hex()

    makers = [Maker.remote() for _ in range(2)]
    found = ray.get([m.first_placement_group.remote() for m in makers])
    assert found[0][0] != found[1][0] and found[0][1] != found[1][1]
    for maker in makers:
        ray.kill(maker)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
