"""On-disk array caches (decoded pixels, frozen-encoder features), shared by every process.

An entry is a .npy file plus a .json sidecar holding its key. Both are written under a new name
and renamed into place, the sidecar last, and a file lock makes concurrent trials wait for one
builder, so a half-written or foreign file is never read as valid: it is rebuilt.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock

from infra.errors import UserError


class DiskFullError(UserError, OSError):
    """No space left where a cache entry, a checkpoint or a result was being written; the message
    names where."""


def _reserve(path: Path) -> None:
    """Claim the file's whole size on disk now: pages of a memory map written on a full disk kill
    the process (SIGBUS) instead of raising."""
    size = path.stat().st_size
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(path.parent).free
        raise DiskFullError(f"no space left in the cache folder {path.parent} for {path.name.split('.npy')[0]} "
                            f"({size / 1e6:,.1f} MB; {free / 1e6:,.1f} MB free): free some space, or set "
                            f"CAPTUNE_CACHE_DIR to a folder with room") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAPTUNE_CACHE_DIR", Path.home() / ".cache" / "captune"))


def cached_array(cache_dir: Path, kind: str, key: dict, shape: tuple[int, ...], dtype: str,
                 build: Callable[[np.ndarray], dict]) -> tuple[np.ndarray, dict]:
    """A read-only memory map of the array for `key`, built by `build(out)` when absent or invalid.

    `build` fills `out` and returns a JSON-able dict (e.g. problems found) kept in the sidecar
    and returned with the array on every later hit.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{entry_name(kind, key)}.npy"
    sidecar = path.with_suffix(".json")
    with FileLock(str(path) + ".lock"):
        found = _open_valid(path, sidecar, key, shape, dtype)
        if found is not None:
            return found
        # Writers hold the lock, so any half file left here is from a process that died.
        for stale in path.parent.glob(f"{path.name}.partial-*"):
            stale.unlink(missing_ok=True)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
        try:
            _reserve(partial)
            info = build(out)
            out.flush()
        except BaseException:
            del out
            partial.unlink(missing_ok=True)
            raise
        del out
        os.replace(partial, path)
        write_json(sidecar, {"key": key, "shape": list(shape), "dtype": dtype,
                              "bytes": path.stat().st_size, "info": info})
    return np.load(path, mmap_mode="r"), info


def entry_name(kind: str, key: dict) -> str:
    """The file name (without .npy) of the entry for `key`."""
    return f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}"


def _open_valid(path: Path, sidecar: Path, key: dict, shape, dtype) -> tuple[np.ndarray, dict] | None:
    try:
        meta = json.loads(sidecar.read_text())
        if meta["key"] != key or path.stat().st_size != meta["bytes"]:
            return None
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        return None
    return arr, meta["info"]


def write_json(path: Path, obj: dict) -> None:
    """`obj` as JSON at `path`, whole or not at all (written aside, then renamed into place)."""
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
