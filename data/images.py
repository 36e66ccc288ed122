"""Reading images: one decoder for cache building, dataset checks and captioning new photos."""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from captune.infra.errors import UserError

# torch and torchvision are imported inside the functions that decode on the GPU (nvjpeg): reading
# images on CPUs, as `captune data check` and the caches do, never loads them.

if TYPE_CHECKING:
    import torch


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded."""


# Part of the pixel cache's key: raised whenever a file already cached would now decode to other
# pixels, so no cache built before is read. 2: the EXIF orientation is applied.
DECODING = 2

ORIENTATION = 0x0112  # the EXIF tag: how the stored pixels turn upright (a phone's sideways photo: 6)
# The EXIF 2.3 table, as PIL's ImageOps.exif_transpose reads it; values outside 1..8 are ignored.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def read_image(path: str | Path, size: int) -> np.ndarray:
    """RGB pixels (3, size, size) uint8, the whole image turned upright by its EXIF orientation
    (a phone's sideways photo) and squashed to a square (no crop, so nothing at the edges is
    lost). Raises ImageError naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such file") from e
    return _decode(path, path, size)


def read_image_bytes(data: bytes, size: int, name: str, max_pixels: int | None = None) -> np.ndarray:
    """read_image of an image file's content (sent over HTTP, say), refused above `max_pixels`
    before it is decoded; errors name it `name`."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes)")
    return _decode(io.BytesIO(data), name, size, max_pixels)


def _decode(source: Path | io.BytesIO, name: str | Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    try:
        with Image.open(source) as im:
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageError(f"{name}: {im.width}x{im.height} pixels, over the {max_pixels / 1e6:g}-megapixel limit")
            upright = UPRIGHT.get(im.getexif().get(ORIENTATION, 1))
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale, still reads every byte
            im = to_rgb8(im, name)
            if upright is not None:
                im = im.transpose(upright)
            im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image PIL can read (is it really a JPEG/PNG?)") from e
    except Image.DecompressionBombError as e:  # not an OSError: it escaped as a traceback
        raise ImageError(f"{name}: too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from e


WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}  # full scale of each
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
PLAIN_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")


def to_rgb8(im: Image.Image, path: Path | str) -> Image.Image:
    """8-bit RGB of any image mode PIL opens, scaled, not clipped: PIL's own convert("RGB") clips
    a 16-bit image's values at 255 (a 16-bit PNG turned white). Transparent pixels are shown over
    white, as a viewer shows them. Modes whose scale is unknown are refused by name."""
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in PLAIN_MODES:
        return im.convert("RGB")
    if mode in WIDE_MODES or mode in ("I", "F"):
        values = np.asarray(im, dtype=np.float64)
        full = WIDE_MODES.get(mode) or _full_scale(mode, values, path)
        grey = np.clip(np.rint(values * (255 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    raise ImageError(f"{path}: image mode {mode} is not supported (convert it to 8-bit RGB, e.g. a JPEG or PNG)")


def _full_scale(mode: str, values: np.ndarray, path: Path | str) -> float:
    """The white level of a 32-bit integer ("I") or float ("F") greyscale image: PIL opens 16-bit
    PNGs as "I" (values 0..65535); floats are taken as 0..1. Other ranges are refused."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "I" and low >= 0 and high <= 65535:
        return 65535
    if mode == "F" and low >= 0 and high <= 1:
        return 1
    expected = "0..65535 (16-bit)" if mode == "I" else "0..1"
    raise ImageError(f"{path}: {'32-bit integer' if mode == 'I' else 'floating-point'} image with values "
                     f"{low:g}..{high:g}, outside {expected}: its white level is unknown; convert it to 8-bit RGB")


def default_decoder() -> str:
    """"nvjpeg" (torchvision's decode_jpeg on the GPU) where CUDA is available, else "pil"."""
    import torch

    return "nvjpeg" if torch.cuda.is_available() else "pil"


OnBatch = Callable[[np.ndarray, "torch.Tensor"], None]  # (rows, their pixels (B, 3, S, S) uint8)


def read_images(paths: list[Path], size: int, out: np.ndarray | None = None, progress=None,
                decoder: str = "pil", on_batch: OnBatch | None = None, batch: int = 256
                ) -> tuple[np.ndarray, dict[int, str]]:
    """Decode many images: JPEGs in batches on the GPU (decoder "nvjpeg", 4-5x PIL's rate on
    16 cores), the rest and any file the GPU path refuses with PIL in a thread pool (PIL releases
    the GIL while decoding). Returns the pixels (N, 3, size, size) and {index: error message}
    for files that failed.

    `on_batch(rows, pixels)` sees every image that decoded once, up to `batch` at a time, as a
    tensor where it was decoded (on the GPU for nvJPEG): a frozen encoder's features can be
    computed there and then, without reading the pixels back."""
    if out is None:
        out = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors: dict[int, str] = {}
    todo = list(range(len(paths)))
    if decoder == "nvjpeg":
        todo = decode_jpegs(paths, size, out, "cuda", progress, batch, on_batch)

    def one(i: int) -> bool:
        try:
            out[i] = read_image(paths[i], size)
            return True
        except ImageError as e:
            errors[i] = str(e)
            return False

    decoded: list[int] = []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for i, ok in zip(todo, pool.map(one, todo, chunksize=64)):
            if progress is not None:
                progress.update(1)
            if ok and on_batch is not None:
                decoded.append(i)
                if len(decoded) == batch:
                    _hand_over(on_batch, out, decoded)
                    decoded = []
    if decoded:
        _hand_over(on_batch, out, decoded)
    return out, errors


def _hand_over(on_batch: OnBatch, out: np.ndarray, rows: list[int]) -> None:
    import torch

    on_batch(np.asarray(rows), torch.from_numpy(out[rows]))  # a fancy index: a copy, writable


def decode_jpegs(paths: list[Path], size: int, out: np.ndarray, device: str, progress=None,
                 batch: int = 256, on_batch: OnBatch | None = None) -> list[int]:
    """torchvision's batched decode_jpeg on `device` (nvJPEG on CUDA), squashed to size x size
    like read_image. Returns the indices left for PIL: not JPEG, unreadable, or in a batch the
    decoder refused (PIL then names the bad file). `on_batch`: see read_images."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i, p in enumerate(paths) if Path(p).suffix.lower() in (".jpg", ".jpeg")]
    left = sorted(set(range(len(paths))) - set(jpegs))
    # Storing a batch in `out` (a fresh memory map: a page fault every 4 KB) runs in this thread
    # while the next batch is read and decoded; at most two batches wait for it.
    with ThreadPoolExecutor(max_workers=1) as writer:
        stored: list = []
        for start in range(0, len(jpegs), batch):
            chunk = jpegs[start:start + batch]
            try:
                contents = [Path(paths[i]).read_bytes() for i in chunk]
                # decode_jpeg's apply_exif_orientation is ignored on CUDA (torchvision 0.29): the
                # orientation is read here and applied to the decoded tensor, on every device alike.
                turns = [exif_orientation(content) for content in contents]
                data = [torch.frombuffer(bytearray(content), dtype=torch.uint8) for content in contents]
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except (RuntimeError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                left += chunk
                continue
            squares = torch.cat([torch.nn.functional.interpolate(upright_tensor(image, turn)[None].float(),
                                                                 size=(size, size), mode="bilinear", antialias=True,
                                                                 align_corners=False)
                                 for image, turn in zip(images, turns)])  # (B, 3, S, S): sizes differ, so one at a time
            squares = squares.round_().clamp_(0, 255).to(torch.uint8)
            stored.append(writer.submit(_store, out, chunk, squares.cpu().numpy()))  # one copy back per batch
            if on_batch is not None:
                on_batch(np.asarray(chunk), squares)
            if len(stored) > 2:
                stored.pop(0).result()
            if progress is not None:
                progress.update(len(chunk))
        for done in stored:
            done.result()
    return sorted(left)


def exif_orientation(content: bytes) -> int:
    """The EXIF orientation of an image file's content (1: as stored), read from its header alone."""
    with Image.open(io.BytesIO(content)) as im:
        return im.getexif().get(ORIENTATION, 1)


# UPRIGHT on a tensor (..., H, W): whether its two axes are swapped, then which ones are flipped.
TENSOR_UPRIGHT = {2: (False, (-1,)), 3: (False, (-2, -1)), 4: (False, (-2,)), 5: (True, ()), 6: (True, (-1,)),
                  7: (True, (-2, -1)), 8: (True, (-2,))}


def upright_tensor(image: "torch.Tensor", orientation: int) -> "torch.Tensor":
    """`image` (C, H, W) as stored, turned as its EXIF `orientation` says it is to be seen."""
    swap, flips = TENSOR_UPRIGHT.get(orientation, (False, ()))
    if swap:
        image = image.transpose(-2, -1)
    return image.flip(flips) if flips else image


def _store(out: np.ndarray, rows: list[int], pixels: np.ndarray) -> None:
    if rows[-1] - rows[0] == len(rows) - 1:  # consecutive: a plain copy, which releases the GIL
        out[rows[0]:rows[-1] + 1] = pixels
    else:
        out[rows] = pixels
