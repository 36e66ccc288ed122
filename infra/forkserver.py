"""Ray workers forked from one preloaded process per node, so that the trials of a sweep share the
memory their imports take.

Ray starts every worker as a new Python process (raylet, then `setup_worker.py`, which execs
`<py_executable> default_worker.py ...`). Importing what a trial needs (torch, torchvision, Ray
Tune, nltk, the training code) costs each of those processes about 520 MB of private memory here,
before any training: more than a small trial's whole working set. All of it but Ray can be shared. With
`runtime_env={"py_executable": worker_command()}`, Ray execs `captune.infra.fork_stand_in` instead, a small
stand-in for the worker. It asks the node's fork server for a child, a fork of a process that has
already imported all of that, and hands it the worker's arguments, environment, working folder
and standard streams. The child then runs `default_worker.py` as the worker would have; its
imported pages stay shared with the server (copy-on-write). The stand-in waits for the child,
passes on the signals Ray sends it and exits with the child's status, so Ray sees the process it
started behave as its worker; a child whose stand-in dies goes with it.

The first worker on a node that needs the server starts it; it ends with that node's raylet, and
is started afresh when the project's code changes. If it cannot be started, a worker starts the
usual way, with a warning in its log: the fork server saves memory, never decides whether a sweep
runs.

This module is the server and, after each fork, the worker's first steps.
"""
from __future__ import annotations

import atexit
import gc
import hashlib
import importlib
import json
import os
import runpy
import select
import socket
import sys
import tempfile
import threading
import traceback

from captune.infra.fingerprint import files_fingerprint
from captune.infra.package_files import code_files

# The libraries a Ray worker imports, but Ray itself: its native library seeds the generator of
# placement group ids as it loads, so workers forked after loading it would all make the same ids
# (seen here: two searches' trials given one placement group). Each worker loads Ray itself (about
# 94 MB of private memory). What the workers run (the training code and its libraries) is the
# caller's to name: `init_ray(preload=...)`, passed down by the stand-in's command.
BASE_PRELOAD = ("pyarrow", "requests", "pydantic", "google.protobuf", "jsonschema", "fsspec", "click", "msgpack")
MESSAGE_BYTES = 1 << 20


def socket_path(raylet_pid: int, preload: tuple[str, ...] = ()) -> str:
    """One server per raylet, version of the project's code (file names, sizes, times) and list of
    preloaded modules, in a folder only this user can enter: whoever can connect can have the
    server run code."""
    code = files_fingerprint(code_files())  # the project's code: a change restarts the server
    digest = hashlib.sha1(f"{sys.executable}\0{code}\0{','.join(preload)}".encode()).hexdigest()[:10]
    return os.path.join(_private_folder(), f"{raylet_pid}-{digest}.sock")


def _private_folder() -> str:
    folder = os.path.join(tempfile.gettempdir(), f"captune-fork-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.stat(folder)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{folder} is not this user's private folder (owner {st.st_uid}, "
                           f"mode {st.st_mode & 0o777:o}): refusing to use it")
    return folder


def serve(path: str, raylet: int, preload: tuple[str, ...] = ()) -> None:
    """Preload BASE_PRELOAD and the caller's `preload`, then fork a worker for each stand-in that
    connects, until the raylet ends."""
    for name in (*BASE_PRELOAD, *preload):
        importlib.import_module(name)
    if "ray" in sys.modules:
        raise RuntimeError("the fork server must not load Ray before forking (see BASE_PRELOAD); "
                           f"imported by one of {(*BASE_PRELOAD, *preload)}")
    # Objects that exist now are never collected; a collection in a child would otherwise write to
    # every one of them and copy the pages they lie on.
    gc.collect()
    gc.freeze()
    if os.path.exists(path):
        os.unlink(path)  # left by a server that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)  # in a folder only this user can enter (see socket_path)
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    print(f"fork server {os.getpid()} for raylet {raylet}: {path}", flush=True)
    try:
        while alive(raylet):
            ready, _, _ = select.select([listener], [], [], 0.5)
            if ready:
                conn, _ = listener.accept()
                pid = _fork_worker(conn, listener, children)
                if pid:
                    children[pid] = conn
            _reap(children)
    finally:  # its raylet has ended: nothing of this server is needed again
        listener.close()
        for leftover in (path, path + ".lock", path[:-len(".sock")] + ".log"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _fork_worker(conn: socket.socket, listener: socket.socket, children: dict) -> int | None:
    fds: list[int] = []
    try:
        conn.settimeout(10)  # a stand-in sends its request as soon as it connects
        message, fds, _, _ = socket.recv_fds(conn, MESSAGE_BYTES, 3)
        conn.settimeout(None)
        request = json.loads(message)
        sys.stdout.flush()
        pid = os.fork()
    except (OSError, ValueError) as e:  # the stand-in, told nothing, starts its worker plainly
        print(f"no worker forked for a stand-in: {type(e).__name__}: {e}", flush=True)
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    if pid == 0:
        listener.close()
        for other in children.values():
            other.close()
        _become_worker(conn, request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    conn.send(json.dumps({"pid": pid}).encode(), socket.MSG_NOSIGNAL)
    print(f"worker {pid} started", flush=True)
    return pid


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        print(f"worker {pid} ended: exit code {code}", flush=True)
        if conn is not None:
            try:
                conn.send(json.dumps({"exit_code": code}).encode(), socket.MSG_NOSIGNAL)
            except OSError:
                pass  # its stand-in is gone already
            conn.close()


def _become_worker(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the worker Ray asked for, then exit as it would have."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd != target:
                os.close(fd)
        # Ray ends a worker by signalling the process group it started it in: join it, as the
        # worker would have been in it (the server has a group of its own, which Ray never ends).
        os.setpgid(0, request["pgid"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python default_worker.py` has it
        if "numpy" in sys.modules:  # a new process seeds NumPy's global generator afresh; forks share it
            sys.modules["numpy"].random.seed()
        threading.Thread(target=_end_with_stand_in, args=(conn,), daemon=True, name="stand-in watch").start()
        sys.unraisablehook = _report_unraisable
        runpy.run_path(sys.argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as the worker's own crash would be
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _report_unraisable(unraisable) -> None:
    """Ray ends a worker with SIGTERM (a stopped sweep's trials, reruns), its handler raising
    SystemExit wherever the interpreter is; raised inside a weakref callback or a finalizer, Python
    reports it as "Exception ignored in ... Traceback ... SystemExit" and Ray carries that to the
    user's console. That SystemExit is the worker ending as asked: not reported. Anything else is,
    as Python would."""
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)


def _end_with_stand_in(conn: socket.socket) -> None:
    """The stand-in never writes: its end closing means it was killed (SIGKILL cannot be
    relayed), and the worker must not outlive it."""
    while True:
        try:
            if not conn.recv(1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os._exit(1)


if __name__ == "__main__":  # forkserver.py SOCKET RAYLET_PID [MODULE ...]
    serve(sys.argv[1], int(sys.argv[2]), tuple(sys.argv[3:]))
