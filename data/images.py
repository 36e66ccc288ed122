"""Reading images: one decoder for cache building, dataset checks and captioning new photos."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image file that cannot be decoded."""


def read_image(path: str | Path, size: int) -> np.ndarray:
    """RGB pixels (3, size, size) uint8, the whole image squashed to a square (no crop, so
    nothing at the edges is lost). Raises ImageError naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale, still reads every byte
            im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such file") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image PIL can read (is it really a JPEG/PNG?)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from e


def read_images(paths: list[Path], size: int, out: np.ndarray | None = None,
                progress=None) -> tuple[np.ndarray, dict[int, str]]:
    """Decode many images with a thread pool (PIL releases the GIL while decoding).
    Returns the pixels (N, 3, size, size) and {index: error message} for files that failed."""
    if out is None:
        out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            out[i] = read_image(paths[i], size)
        except ImageError as e:
            errors[i] = str(e)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for _ in pool.map(one, range(len(paths)), chunksize=64):
            if progress is not None:
                progress.update(1)
    return out, errors
