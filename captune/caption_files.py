"""Captioning many image files (`captune caption`): files and folders in, rows `image,caption`
out (CSV, or JSON lines), written batch by batch as they are captioned, so that a stopped run
keeps what it wrote and a rerun with the same output file skips the images already in it."""
from __future__ import annotations

import codecs
import csv
import errno
import fcntl
import io
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from captune.data.images import ImageError, read_image_bytes
from captune.infra.errors import UserError
from captune.infra.mlflow_store import writable_folder

if TYPE_CHECKING:
    import torch

    from captune.trainables.checkpoint import Loaded

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMATS = (".csv", ".jsonl")
FIELDS = ["image", "caption"]
# File names are bytes: those that are not UTF-8 reach Python as lone surrogates, and go back to
# the same bytes in the file (a JSON line escapes them as \udcxx, which reads back the same).
NAMES = "surrogateescape"
KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


class OutputFileError(UserError, ValueError):
    """An --out file that is not a caption file this command wrote (it is never overwritten)."""


def real(image: str) -> str:
    """What an image is known by, however it was spelled (`imgs/x.jpg`, `./imgs/x.jpg`, a link)."""
    return os.path.realpath(image)


def find_images(paths: Iterable[str | Path]) -> list[str]:
    """The image files PATHS name: files as given, folders searched recursively for .jpg, .jpeg
    and .png (any case), in sorted order; each file once (by its real path), as first named."""
    found: list[str] = []
    for given in map(str, paths):
        path = Path(given)
        if path.is_dir():
            # not only regular files: a link to nothing, a loop of links or a FIFO named .jpg is
            # listed as unreadable when read, not left out unsaid
            found += sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
        elif os.path.lexists(given):
            found.append(given)
        else:
            raise FileNotFoundError(f"{given}: no such image file or folder")
    first: dict[str, str] = {}
    for image in found:
        first.setdefault(real(image), image)
    return list(first.values())


def read_file(image: str, size: int) -> np.ndarray:
    """read_image of a file that must be a regular one: anything else is named for what it is. It
    is opened without waiting, so a FIFO (which would wait for a writer for ever) is never read."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ImageError(f"{image}: {_unopenable(image, e)}") from None
    with os.fdopen(fd, "rb") as f:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise ImageError(f"{image}: {KINDS.get(kind, 'not a regular file')}, not an image file")
        return read_image_bytes(f.read(), size, image)


def _unopenable(image: str, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a loop of symbolic links"
    if e.errno == errno.ENOENT:
        return f"a link to {real(image)}, which does not exist" if os.path.islink(image) else "no such file"
    return f"cannot be read ({e.strerror or e})"


class CaptionFile:
    """Rows (image, caption) appended to a CSV or JSON-lines file (by its suffix), or CSV on
    stdout when `path` is None. An existing file is locked, then read first: its images count as
    done (by their real paths), except those with an empty caption, whose rows are dropped to be
    redone. A file that does not read as a caption file is refused and never written."""

    def __init__(self, path: Path | None):
        self.path = path
        self.done: set[str] = set()
        self.jsonl = path is not None and path.suffix.lower() == ".jsonl"
        self._header = not self.jsonl  # written with the first rows
        self._file: IO[bytes] | None = None
        if path is None:
            return
        if path.suffix.lower() not in FORMATS:
            raise OutputFileError(f"--out {path}: give a file ending in .csv or .jsonl (the format follows the name)")
        writable_folder(path.parent, "--out")  # a read-only or immutable folder, before the model loads
        self._file = _open_locked(path)
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        self._file.seek(0)
        raw = self._file.read()
        bom = codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""  # Excel saves UTF-8 so
        end = max(raw.rfind(b"\n") + 1, len(bom))  # a row cut short by a kill is dropped, and redone
        lines = re.findall(r"[^\n]*\n", raw[len(bom):end].decode("utf-8", NAMES))
        records = self._json_records(lines) if self.jsonl else self._csv_records(lines)
        redo = {n for first, last, _, caption in records if not caption for n in range(first, last + 1)}
        self.done = {real(image) for _, _, image, caption in records if caption}
        self._header = not self.jsonl and not lines
        if redo:
            kept = "".join(line for n, line in enumerate(lines, 1) if n not in redo)
            self._replace(bom + kept.encode("utf-8", NAMES))
        elif end < len(raw):
            self._file.truncate(end)

    def _csv_records(self, lines: list[str]) -> list[tuple[int, int, str, str]]:
        """(first line, last line, image, caption) of each row after the header."""
        reader = csv.reader(iter(lines), strict=True)  # strict: a stray quote is an error, not a field
        records = []
        while True:
            first = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return records
            except csv.Error as e:
                raise self._bad(first, "a quote opened here is never closed (a stray \"?)" if "end of data" in str(e)
                                else f"not a CSV row ({e}; a stray \"?)") from None
            if first == 1:
                if row != FIELDS:
                    raise OutputFileError(f"--out {self.path}: its first line is {lines[0].rstrip()[:80]!r}, not the "
                                          "header 'image,caption' of a caption file; give a new file")
            elif row:  # a blank line is harmless
                records.append((first, reader.line_num, *self._checked(first, reader.line_num, row)))

    def _checked(self, first: int, last: int, row: list[str]) -> tuple[str, str]:
        if row == FIELDS:
            raise self._bad(first, "a second header 'image,caption' (did two runs write this file at once?)")
        if len(row) != 2:
            raise self._bad(first, f"{len(row)} fields, not 2 (image,caption; a comma in a caption must be quoted)")
        if re.search(r"[\r\n]", row[1]):
            raise self._bad(first, f"a caption spanning lines {first}-{last} (a stray \"?)")
        return self._named(first, row[0]), row[1]

    def _json_records(self, lines: list[str]) -> list[tuple[int, int, str, str]]:
        records = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in FIELDS):
                raise self._bad(n, 'not a caption row {"image": "...", "caption": "..."}')
            records.append((n, n, self._named(n, row["image"]), row["caption"]))
        return records

    def _named(self, line: int, image: str) -> str:
        if not image or "\0" in image:
            raise self._bad(line, f"{image!r} is not an image file's name")
        return image

    def _bad(self, line: int, what: str) -> OutputFileError:
        return OutputFileError(f"--out {self.path}, line {line}: {what}; fix it or give a new file (this one is "
                               "left as it is)")

    def _replace(self, content: bytes) -> None:
        """The file made `content` at once (a kill leaves the old file or the new, never half of
        one), the lock moved to the new file before anyone can open it by name."""
        target = Path(real(str(self.path)))
        temporary = target.with_name(f".{target.name}.captune-{os.getpid()}")
        new = temporary.open("w+b")
        try:
            fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
            new.write(content)
            new.flush()
            os.fsync(new.fileno())
            shutil.copymode(target, temporary)
            os.replace(temporary, target)
        except BaseException:
            new.close()
            temporary.unlink(missing_ok=True)
            raise
        self._file.close()
        self._file = new

    def write(self, rows: list[tuple[str, str]]) -> None:
        if self.jsonl:
            text = "".join(json.dumps(dict(zip(FIELDS, row))) + "\n" for row in rows)
        else:
            buffer = io.StringIO()
            csv.writer(buffer).writerows(([FIELDS] if self._header else []) + rows)
            text, self._header = buffer.getvalue(), False
        if self._file is not None:
            self._file.write(text.encode("utf-8", NAMES))
            self._file.flush()
        else:
            _to_stdout(text)
        self.done.update(real(image) for image, _ in rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # and the lock with it
            self._file = None


def _open_locked(path: Path) -> IO[bytes]:
    """`path` opened to append, locked for this command alone (held until it is closed)."""
    while True:
        try:
            f = path.open("a+b")
        except OSError as e:
            raise OutputFileError(f"--out {path}: cannot write it ({e.strerror or e})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutputFileError(f"--out {path}: another `captune caption` is writing this file now; wait for it "
                                  "to end, or give another file") from None
        except OSError:
            return f  # a file system without locks: as before the lock existed
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f
        except FileNotFoundError:
            pass
        f.close()  # the other command replaced it (CaptionFile._replace) while this one opened it


def _to_stdout(text: str) -> None:
    """CSV rows to stdout, names in their own bytes (a UTF-8 locale's stdout refuses them)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text stream of Python's own (redirect_stdout): it takes any str
        sys.stdout.write(text)
    else:
        sys.stdout.flush()
        buffer.write(text.encode("utf-8", NAMES))
        buffer.flush()


@dataclass
class Summary:
    captioned: int = 0
    already: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per unreadable image


def caption_files(loaded: Loaded, images: list[str], out: CaptionFile, decoding=None, batch_size: int = 32,
                  device: torch.device | None = None) -> Summary:
    """Caption `images` not already in `out`, `batch_size` at a time, reading the next batch
    while the model captions this one, by `decoding` (a captune.trainables.decoding.Decoding;
    default: the model's own). Unreadable images are reported and skipped."""
    # torch loads here, not with this module: the CLI checks the paths and --out first, in a second
    from captune.trainables.inference import caption_pixels, decoding_of, image_size_of

    how = decoding or decoding_of(loaded)

    todo = [image for image in images if real(image) not in out.done]
    summary = Summary(already=len(images) - len(todo))
    size = image_size_of(loaded)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=None, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        def read(batch: list[str]) -> list[Future]:
            return [pool.submit(read_file, image, size) for image in batch]

        pending = read(batches[0]) if batches else []
        for k, batch in enumerate(batches):
            reads, pending = pending, read(batches[k + 1]) if k + 1 < len(batches) else []
            names, pixels = [], []
            for image, future in zip(batch, reads):
                try:
                    pixels.append(future.result())
                    names.append(image)
                except ImageError as e:
                    summary.skipped.append(str(e))
                    bar.write(f"skipped {e}", file=sys.stderr)
            if names:
                out.write(list(zip(names, caption_pixels(loaded, np.stack(pixels), how, device))))
                summary.captioned += len(names)
            bar.update(len(batch))
    bar.close()
    return summary
