"""How fast and how large a trained captioner is, measured the same way for every model: its
parameters, its checkpoint's size, and its CPU latency per image from pixels to caption (the
encoder and the decoding) at batch 1 (p50, p90) and its throughput at batch 32, for each decoding
asked. The caller pins the process first (`pinned`): one core, one torch thread, so that two
models measured minutes apart, or two runs of the same measurement, see the same machine."""
from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from captune.trainables.checkpoint import Loaded
from captune.trainables.decoding import Decoding
from captune.trainables.inference import caption_pixels

BATCH = 32  # the throughput's batch
SINGLES = 32  # images captioned one at a time: p50 and p90 of their latencies
BATCH_REPEATS = 3  # batches of BATCH timed: their median


@contextmanager
def pinned(core: int | None = None):
    """This process on one core (the last it may use, unless given) with one torch thread, then as
    before. One thread because a served model answers one request per thread and several
    processes share a machine's cores; one core because the scheduler otherwise moves the thread
    between cores that other processes warm and cool."""
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    core = max(cores) if core is None else core
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        yield core
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, cores)


def machine(core: int) -> str:
    """The machine a measurement was made on, in words (stored with it)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, core {core} of {os.cpu_count()}, 1 torch thread, torch {torch.__version__}"


def measure(loaded: Loaded, pixels: np.ndarray, decodings: dict[str, Decoding]) -> dict[str, float]:
    """{"params", and per decoding name d: "latency_p50_ms_d", "latency_p90_ms_d",
    "throughput_b32_d" (images per second)}. `pixels`: (N >= BATCH, 3, S, S) uint8, real images
    of the model's size (caption lengths, and so times, depend on what the images show). Each
    decoding is warmed up first (one image, one batch)."""
    if len(pixels) < BATCH:
        raise ValueError(f"measuring speed needs {BATCH} images, got {len(pixels)}")
    out = {"params": float(sum(p.numel() for p in loaded.model.parameters()))}
    for name, decoding in decodings.items():
        caption_pixels(loaded, pixels[:1], decoding)  # warm-up: the first call allocates
        caption_pixels(loaded, pixels[:BATCH], decoding)
        singles = [_seconds(loaded, pixels[i:i + 1], decoding) for i in range(SINGLES)]
        batches = [_seconds(loaded, pixels[:BATCH], decoding) for _ in range(BATCH_REPEATS)]
        out[f"latency_p50_ms_{name}"] = 1000 * float(np.percentile(singles, 50))
        out[f"latency_p90_ms_{name}"] = 1000 * float(np.percentile(singles, 90))
        out[f"throughput_b32_{name}"] = BATCH / float(np.median(batches))
    return out


def _seconds(loaded: Loaded, pixels: np.ndarray, decoding: Decoding) -> float:
    start = time.perf_counter()
    caption_pixels(loaded, pixels, decoding)
    return time.perf_counter() - start
