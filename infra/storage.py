"""Files in a shared location: a folder (a mount every node sees) or object storage (s3://, gs://,
file://), through pyarrow's filesystems, which Ray itself uses for the same URIs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def join(location: str, *names: str) -> str:
    return "/".join([location.rstrip("/"), *names]) if is_uri(location) else str(Path(location, *names))


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str) -> bool:
    fs, path = _resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str) -> bytes:
    fs, path = _resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def upload(local: Path, location: str) -> None:
    """Copy a local file to `location` (a file name in a folder or a bucket)."""
    fs, path = _resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str, local: Path) -> None:
    """Copy `location` to the local file `local`, whole or not at all (written aside, then renamed)."""
    fs, path = _resolve(location)
    partial = local.with_name(f"{local.name}.partial-{os.getpid()}")
    try:
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(partial, local)
    finally:
        partial.unlink(missing_ok=True)


def put_file(local: Path, location: str) -> None:
    """Copy a local file to `location`, whole or not at all: into a folder, written aside then
    renamed (a kill mid-copy leaves the old file); to object storage, one upload."""
    if is_uri(location):
        upload(local, location)
        return
    target = Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        shutil.copyfile(local, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def remove_tree(location: str) -> None:
    """Remove the folder (or prefix) `location` and all it holds, if it is there."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
