"""Captioning many image files (`captune caption`): files and folders in, rows `image,caption`
out (CSV, or JSON lines), written batch by batch as they are captioned, so that a stopped run
keeps what it wrote and a rerun with the same output file skips the images already in it."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from data.images import ImageError, read_image
from infra.errors import UserError

if TYPE_CHECKING:
    import torch

    from trainables.checkpoint import Loaded

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMATS = (".csv", ".jsonl")
FIELDS = ["image", "caption"]


class OutputFileError(UserError, ValueError):
    """An --out file that is not a caption file this command wrote (it is never overwritten)."""


def find_images(paths: Iterable[str | Path]) -> list[str]:
    """The image files PATHS name: files as given, folders searched recursively for .jpg, .jpeg
    and .png (any case), in sorted order; each file once."""
    found: list[str] = []
    for given in map(str, paths):
        path = Path(given)
        if path.is_dir():
            found += sorted(str(f) for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif path.exists():
            found.append(given)
        else:
            raise FileNotFoundError(f"{given}: no such image file or folder")
    return list(dict.fromkeys(found))


class CaptionFile:
    """Rows (image, caption) appended to a CSV or JSON-lines file (by its suffix), or CSV on
    stdout when `path` is None. An existing file is read first: its images count as done."""

    def __init__(self, path: Path | None):
        self.path = path
        self.done: set[str] = set()
        if path is None:
            self.stream, self.jsonl, self._header = sys.stdout, False, True
            return
        if path.suffix.lower() not in FORMATS:
            raise OutputFileError(f"--out {path}: give a file ending in .csv or .jsonl (the format follows the name)")
        self.jsonl = path.suffix.lower() == ".jsonl"
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            self.done = self._read_done()
        self.stream = path.open("a", newline="", encoding="utf-8")
        self._header = fresh and not self.jsonl  # written with the first rows

    def _read_done(self) -> set[str]:
        text = self.path.read_text(encoding="utf-8")
        complete = text[:text.rfind("\n") + 1]  # a row cut short by a kill is dropped, and redone
        lines = complete.splitlines()
        if self.jsonl:
            images = [self._json_image(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        else:
            rows = list(csv.reader(io.StringIO(complete)))
            if not rows or rows[0] != FIELDS:
                first = repr(lines[0][:80]) if lines else "not complete"
                raise OutputFileError(f"--out {self.path}: its first line is {first}, not the header 'image,caption' "
                                      "of a caption file; give a new file")
            images = [row[0] for row in rows[1:] if row]
        if len(complete) < len(text):
            with self.path.open("r+b") as f:
                f.truncate(len(complete.encode("utf-8")))
        return {os.path.abspath(image) for image in images}

    def _json_image(self, number: int, line: str) -> str:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not set(FIELDS) <= row.keys():
                raise ValueError(line)
            return str(row["image"])
        except ValueError:
            raise OutputFileError(f"--out {self.path}, line {number}: not a caption row "
                                  f'{{"image": ..., "caption": ...}}; give a new file') from None

    def write(self, rows: list[tuple[str, str]]) -> None:
        if self.jsonl:
            self.stream.writelines(json.dumps(dict(zip(FIELDS, row))) + "\n" for row in rows)
        else:
            csv.writer(self.stream).writerows(([FIELDS] if self._header else []) + rows)
            self._header = False
        self.stream.flush()
        self.done.update(os.path.abspath(image) for image, _ in rows)

    def close(self) -> None:
        if self.path is not None:
            self.stream.close()


@dataclass
class Summary:
    captioned: int = 0
    already: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per unreadable image


def caption_files(loaded: Loaded, images: list[str], out: CaptionFile, beam: int = 3, batch_size: int = 32,
                  device: torch.device | None = None) -> Summary:
    """Caption `images` not already in `out`, `batch_size` at a time, reading the next batch
    while the model captions this one. Unreadable images are reported and skipped."""
    # torch loads here, not with this module: the CLI checks the paths and --out first, in a second
    from trainables.inference import caption_pixels, image_size_of

    todo = [image for image in images if os.path.abspath(image) not in out.done]
    summary = Summary(already=len(images) - len(todo))
    size = image_size_of(loaded)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=None, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        def read(batch: list[str]) -> list[Future]:
            return [pool.submit(read_image, image, size) for image in batch]

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
                out.write(list(zip(names, caption_pixels(loaded, np.stack(pixels), beam, device=device))))
                summary.captioned += len(names)
            bar.update(len(batch))
    bar.close()
    return summary
