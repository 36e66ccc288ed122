"""What a served captioner answers: rows of base64-encoded JPEG/PNG content (in-process, also
image file paths), params `beam`, `max_len` and `alpha` (the length penalty); one caption per row. Every fault a request can
hold is a RequestError naming the row, checked before anything is captioned."""
from __future__ import annotations

import base64
import binascii
import io
import os
import random
from collections.abc import Sequence

import numpy as np

from captune.data.images import ImageError, read_image, read_image_bytes
from captune.data.synth import draw, random_scene
from captune.trainables.catalog import MAX_ALPHA, MAX_BEAM, MAX_CAPTION_WORDS
from captune.trainables.decoding import Decoding

MAX_ROWS = 256  # images per request
MAX_IMAGE_BYTES = 10 * 2**20  # one image's file size (base64 text is 4/3 of it)
MAX_PIXELS = 50_000_000  # one image's width x height (a 10 MB PNG can hold a billion pixels)
PARAMS = ("beam", "max_len", "alpha")
_PATH_CHARS = 4096  # longer values are never taken for a file path
MAX_MESSAGE = 1500  # characters of an error's message: MLflow's quote the request


class RequestError(ValueError):
    """A request the model cannot answer: the message names the row or param at fault."""


def checked_params(params: dict | None, default: Decoding, default_max_len: int) -> Decoding:
    """The decoding a request's params ask for, the model's `default` (its max_len, if it has none,
    `default_max_len`) where they say nothing; anything else refused."""
    params = dict(params or {})
    refuse_unknown(params)
    beam = _bounded(params, "beam", default.beam, MAX_BEAM)
    max_len = _bounded(params, "max_len", default.max_len or default_max_len, MAX_CAPTION_WORDS)
    alpha = params.get("alpha", default.alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or \
            not 0 <= alpha <= MAX_ALPHA:
        raise RequestError(f"param alpha: the length penalty must be a number in 0..{MAX_ALPHA:g}, got {alpha!r}")
    return Decoding(beam=beam, alpha=float(alpha), max_len=max_len)


def refuse_unknown(params: dict) -> None:
    unknown = sorted(set(map(str, params)) - set(PARAMS))
    if unknown:
        raise RequestError(f"unknown param(s) {', '.join(unknown)}: this model takes {', '.join(PARAMS)}")


def _bounded(params: dict, name: str, default: int, high: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RequestError(f"param {name}: must be an integer in 1..{high}, got {value!r}")
    if not 1 <= value <= high:
        raise RequestError(f"param {name}: must be in 1..{high}, got {value}")
    return int(value)


def request_pixels(values: Sequence, size: int, allow_paths: bool) -> np.ndarray:
    """Pixels (N, 3, size, size) uint8 of a request's `image` values, each base64 content (a data
    URL's prefix and line breaks allowed) or, if `allow_paths`, a file path. All rows are checked;
    the error lists the first faults."""
    if len(values) == 0:
        raise RequestError("empty input: send at least one row with an `image`")
    if len(values) > MAX_ROWS:
        raise RequestError(f"{len(values)} rows: at most {MAX_ROWS} images per request (send several requests)")
    pixels = np.zeros((len(values), 3, size, size), dtype=np.uint8)
    faults = []
    for row, value in enumerate(values):
        try:
            pixels[row] = _pixels(value, size, f"row {row}", allow_paths)
        except (RequestError, ImageError) as e:
            faults.append(str(e))
    if faults:
        more = f" (and {len(faults) - 5} more rows)" if len(faults) > 5 else ""
        raise RequestError("; ".join(faults[:5]) + more)
    return pixels


def _pixels(value, size: int, name: str, allow_paths: bool) -> np.ndarray:
    if not isinstance(value, str):
        raise RequestError(f"{name}: `image` must be a base64 string, got {type(value).__name__}")
    if allow_paths and len(value) < _PATH_CHARS and os.path.isfile(value):
        return read_image(value, size)
    text = "".join(value.split())
    if text.startswith("data:") and "," in text:  # a data URL, as a browser's canvas gives it
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > MAX_IMAGE_BYTES + 2:
        raise RequestError(f"{name}: image of {len(text) * 3 / 4 / 2**20:.1f} MB, over the "
                           f"{MAX_IMAGE_BYTES / 2**20:.0f} MB limit")
    try:
        content = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        where = " nor an existing file" if allow_paths else ""
        raise RequestError(f"{name}: `image` is not base64-encoded image content{where} "
                           f"(starts {value[:24]!r})") from None
    return read_image_bytes(content, size, name, max_pixels=MAX_PIXELS)


def shortened(message: str, limit: int = MAX_MESSAGE) -> str:
    """The message, its middle cut out if it is longer than `limit`: the fault is named at its
    start (a body that is not JSON) or its end (MLflow's "Failed to predict data '...' Error: ...")."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 3 - 40
    return f"{message[:head]} [... {len(message) - head - tail:,} characters cut ...] {message[-tail:]}"


def unreadable_body(error: Exception, content_type: str) -> str:
    """The message for a request body the server could not parse (`error` what parsing raised)."""
    if isinstance(error, RecursionError):
        why = "it is nested too deeply"
    elif isinstance(error, ValueError) and "digits" in str(error):  # Python's limit on an int's digits
        why = str(error).split(";")[0]
    else:
        why = f"{type(error).__name__}: {error}"
    return shortened(f"cannot read the request's body as {content_type}: {why}")


def example_image() -> str:
    """A small PNG of a built-in scene, base64: the logged model's input example."""
    rng = random.Random(0)
    buffer = io.BytesIO()
    draw(random_scene(rng), rng).resize((64, 64)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
