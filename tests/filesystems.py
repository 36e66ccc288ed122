"""File systems a test makes (as root): a folder or file even root cannot write (`chattr +i`), and
a small tmpfs, mounted for the block and remountable read-only. Each skips the test, saying why,
where this machine does not allow it, and undoes itself."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def immutable(path: Path):
    """`chattr +i` on `path` (even root cannot write it, or create files in it) while the block runs."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64m", read_only: bool = False):
    """A tmpfs mounted at `path` (made) while the block runs; `read_only` mounts it so."""
    path.mkdir(parents=True)
    options = f"{'ro,' if read_only else ''}size={size}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def read_only(path: Path) -> None:
    """Remount the tmpfs at `path` read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
