"""The stand-in Ray execs for each worker of a sweep's job (its `py_executable`): it has the node's
fork server (`captune.infra.forkserver`) fork the worker, or starts the server first, and then behaves as
that worker to Ray: it passes on the signals Ray sends and exits with the worker's status.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from filelock import FileLock

from captune.infra.forkserver import MESSAGE_BYTES, alive, socket_path

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
START_TIMEOUT_S = 180.0


PRELOAD_OPTION = "--preload="


def worker_command(preload: tuple[str, ...] = ()) -> str:
    """The `py_executable` that makes a Ray job's workers forks of the node's fork server, which
    preloads the modules `preload` names (what the workers will run) as well as Ray's libraries."""
    command = f"{shlex.quote(sys.executable)} -m captune.infra.fork_stand_in"  # Ray runs it through bash
    return f"{command} {shlex.quote(PRELOAD_OPTION + ','.join(preload))}" if preload else command


def main(argv: list[str]) -> None:
    """`fork_stand_in [--preload=M1,M2] WORKER_ARGV...`: Ray appends the worker's own arguments to
    the command worker_command() gave it."""
    preload: tuple[str, ...] = ()
    if argv and argv[0].startswith(PRELOAD_OPTION):
        preload = tuple(m for m in argv[0][len(PRELOAD_OPTION):].split(",") if m)
        argv = argv[1:]
    stand_in(argv, preload)


def stand_in(worker_argv: list[str], preload: tuple[str, ...] = ()) -> None:
    """Run the worker as a fork of the server (which preloads `preload`), or, when there is none,
    exec it the usual way."""
    raylet = os.getppid()  # Ray execs the worker command in the process the raylet started
    # Ray's State API, used inside Train's actors (its placement-group cleaner), finds "the" local
    # cluster by looking for GCS processes and fails when this machine runs two (two commands at
    # once, each with its own local cluster). Name the worker's own, as `ray start` workers have it.
    gcs = next((arg.split("=", 1)[1] for arg in worker_argv if arg.startswith("--gcs-address=")), None)
    if gcs:
        os.environ.setdefault("RAY_ADDRESS", gcs)
    request = {"argv": worker_argv, "env": dict(os.environ), "cwd": os.getcwd(), "pgid": os.getpgrp()}
    try:
        conn = _connect(socket_path(raylet, preload), raylet, preload)
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = conn.recv(MESSAGE_BYTES)
        if not reply:
            raise RuntimeError("the fork server did not fork this worker (see its log)")
    except (OSError, RuntimeError) as e:
        print(f"captune.infra.fork_stand_in: no fork server ({e}); starting this worker without it", file=sys.stderr,
              flush=True)
        os.execv(sys.executable, [sys.executable, *worker_argv])
    child = json.loads(reply)["pid"]
    for sig in RELAYED:
        signal.signal(sig, lambda signum, _frame: _relay(child, signum))
    reply = conn.recv(MESSAGE_BYTES)  # the child's exit status, once it has ended
    code = json.loads(reply)["exit_code"] if reply else 1
    if code < 0:  # ended by a signal: end the same way
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # (those two cannot be handled: always the default)
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def _relay(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _connect(path: str, raylet: int, preload: tuple[str, ...]) -> socket.socket:
    try:
        return _dial(path)
    except OSError:
        pass
    # One worker starts the server; the others, started at the same moment, wait for it.
    with FileLock(path + ".lock"):
        try:
            return _dial(path)
        except OSError:
            return _start_server(path, raylet, preload)


def _dial(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        raise
    return conn


def _start_server(path: str, raylet: int, preload: tuple[str, ...]) -> socket.socket:
    _remove_stale(os.path.dirname(path))
    log = path[:-len(".sock")] + ".log"
    # `-m` puts the working folder first on sys.path: the server's is its private folder, which holds
    # no module to shadow the ones it preloads (captune itself is found wherever it is installed).
    with open(log, "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "captune.infra.forkserver", path, str(raylet), *preload],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  process_group=0, cwd=os.path.dirname(path))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the fork server exited with status {server.returncode}; its log: {log}")
        try:
            return _dial(path)
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"the fork server did not start within {START_TIMEOUT_S:.0f} s; its log: {log}")


def _remove_stale(folder: str) -> None:
    """The files of servers whose raylet has ended (a killed server leaves its socket, lock and
    log): named `<raylet pid>-<code digest>.*`."""
    for name in os.listdir(folder):
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass  # another worker removed it first


if __name__ == "__main__":
    main(sys.argv[1:])
