"""On-disk array caches (decoded pixels, frozen-encoder features), shared by every process.

An entry is a .npy file plus a .json sidecar holding its key. Both are written under a new name
and renamed into place, the sidecar last, and a file lock makes concurrent trials wait for one
builder, so a half-written or foreign file is never read as valid: it is rebuilt. A valid entry is
read without the lock (it is whole once its sidecar is in place), so entries built elsewhere are
read from a read-only folder. Floating-point entries must hold finite values only: one holding NaN
(a damaged file of the right size) is not valid either.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

from captune.infra.errors import UserError


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


class CacheNotWritable(UserError, OSError):
    """A cache entry must be built in a folder that cannot be written (read-only, immutable)."""


class EntryNotThere(UserError, FileNotFoundError):
    """An entry only read here, never built, is absent or not valid; the message names its file."""


def cached_array(cache_dir: Path, kind: str, key: dict, shape: tuple[int, ...], dtype: str,
                 build: Callable[[np.ndarray], dict] | None) -> tuple[np.ndarray, dict]:
    """A read-only memory map of the array for `key`, built by `build(out)` when absent or invalid.

    `build` fills `out` and returns a JSON-able dict (e.g. problems found) kept in the sidecar
    and returned with the array on every later hit. `build` None: the entry is only read here
    (EntryNotThere if it is not valid). A damaged entry is built again with a warning naming it.
    """
    path = cache_dir / f"{entry_name(kind, key)}.npy"
    found = _open_valid(path, key, shape, dtype)
    if not isinstance(found, str):
        return found
    if build is None:
        raise EntryNotThere(f"{path}: {found}")
    with _lock(path, found):
        found = _open_valid(path, key, shape, dtype)  # another process may have built it meanwhile
        if not isinstance(found, str):
            return found
        if found != ABSENT:
            warnings.warn(f"cache entry {path}: {found}; building it again", stacklevel=2)
        info = _build(path, dtype, shape, build, found)
        write_json(path.with_suffix(".json"), {"key": key, "shape": list(shape), "dtype": dtype,
                                               "bytes": path.stat().st_size, "info": info})
    return np.load(path, mmap_mode="r"), info


@contextlib.contextmanager
def _lock(path: Path, why: str) -> Iterator[None]:
    """The entry's lock, held while the block runs; refused by name where the folder cannot be
    written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except OSError as e:
        raise _not_writable(path, why, e) from None
    try:
        yield
    finally:
        lock.release()


def _not_writable(path: Path, why: str, e: OSError) -> CacheNotWritable:
    return CacheNotWritable(f"{path.parent}: cannot write there ({e.strerror or e}), and {path.name} must be "
                            f"built ({why}): build it where it can be written, or set CAPTUNE_CACHE_DIR to a "
                            f"writable folder")


def _build(path: Path, dtype: str, shape: tuple[int, ...], build: Callable[[np.ndarray], dict], why: str) -> dict:
    """`build` into a new file, renamed to `path` once whole; the caller holds the lock."""
    # Writers hold the lock, so any half file left here is from a process that died.
    for stale in path.parent.glob(f"{path.name}.partial-*"):
        stale.unlink(missing_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
    except OSError as e:  # the lock file was there already, in a folder that takes no new file
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise _not_writable(path, why, e) from None
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
    return info


def entry_name(kind: str, key: dict) -> str:
    """The file name (without .npy) of the entry for `key`."""
    return f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}"


ABSENT = "not built yet"


def _open_valid(path: Path, key: dict, shape, dtype) -> tuple[np.ndarray, dict] | str:
    """The entry and its info, or why it is not valid (ABSENT when it was never built)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        return ABSENT
    except (OSError, ValueError) as e:
        return f"its sidecar cannot be read ({e})"
    try:
        if meta["key"] != key:
            return "its sidecar names another key"
        if path.stat().st_size != meta["bytes"]:
            return f"{path.stat().st_size:,} bytes where {meta['bytes']:,} were written"
        arr, info = np.load(path, mmap_mode="r"), meta["info"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"it cannot be read ({type(e).__name__}: {e})"
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        return f"it holds {arr.dtype} {arr.shape}, not {dtype} {tuple(shape)}"
    bad = nonfinite_rows(arr)
    if len(bad):
        return f"{len(bad):,} of its {len(arr):,} rows hold NaN or infinite values"
    return arr, info


def nonfinite_rows(arr: np.ndarray) -> np.ndarray:
    """Indices of the rows of `arr` holding NaN or infinite values (none for an integer array),
    read a slice at a time: a memory map is never loaded whole."""
    if not np.issubdtype(arr.dtype, np.floating) or not arr.size:
        return np.zeros(0, dtype=np.int64)
    step = max(1, (64 << 20) // max(1, arr[0].nbytes))  # 64 MB at a time
    bad = []
    for start in range(0, len(arr), step):
        finite = np.isfinite(arr[start:start + step]).reshape(min(step, len(arr) - start), -1).all(axis=1)
        bad.append(start + np.flatnonzero(~finite))
    return np.concatenate(bad)


def write_json(path: Path, obj: dict) -> None:
    """`obj` as JSON at `path`, whole or not at all (written aside, then renamed into place)."""
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
