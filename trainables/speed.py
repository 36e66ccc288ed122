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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captune.infra.mlflow_names import speed_metric
from captune.trainables.checkpoint import Loaded
from captune.trainables.decoding import Decoding
from captune.trainables.inference import caption_pixels

BATCH = 32  # the throughput's batch
SINGLES = 32  # images captioned one at a time: p50 and p90 of their latencies
ROUNDS = 8  # the models take turns: each round, SINGLES / ROUNDS images one at a time each
BATCHES = 4  # ... and every other round, one batch: the throughput is the median of these


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


@dataclass
class Subject:
    """A model to time: on `pixels` (N >= BATCH, 3, S, S) uint8, real images of its size (caption
    lengths, and so times, depend on what the images show), at each of `decodings` (by name)."""
    loaded: Loaded
    pixels: np.ndarray
    decodings: dict[str, Decoding]


def measure(subjects: dict[str, Subject], rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Per subject: {"params", and per decoding name d: "latency_p50_ms_d", "latency_p90_ms_d",
    "throughput_b32_d" (images per second)}.

    Every model and decoding is warmed up first (one image, one batch); then the models take turns,
    `rounds` times, each timing its share of the SINGLES images one at a time (and, BATCHES times in
    all, one batch): a moment when something else holds the core slows every model a little, not
    one model a lot."""
    for name, s in subjects.items():
        if len(s.pixels) < BATCH:
            raise ValueError(f"measuring {name}'s speed needs {BATCH} images, got {len(s.pixels)}")
    singles = {(n, d): [] for n, s in subjects.items() for d in s.decodings}
    batches = {(n, d): [] for n, s in subjects.items() for d in s.decodings}
    for s in subjects.values():
        for decoding in s.decodings.values():
            caption_pixels(s.loaded, s.pixels[:1], decoding)  # the first call allocates
            caption_pixels(s.loaded, s.pixels[:BATCH], decoding)
    share = -(-SINGLES // rounds)
    for r in range(rounds):
        for n, s in subjects.items():
            for d, decoding in s.decodings.items():
                singles[n, d] += [_seconds(s.loaded, s.pixels[i:i + 1], decoding)
                                  for i in range(r * share, min((r + 1) * share, SINGLES))]
                if r % max(1, rounds // BATCHES) == 0:
                    batches[n, d].append(_seconds(s.loaded, s.pixels[:BATCH], decoding))
    out = {}
    for n, s in subjects.items():
        out[n] = {"params": float(sum(p.numel() for p in s.loaded.model.parameters()))}
        for d in s.decodings:
            out[n][speed_metric("latency_p50_ms", d)] = 1000 * float(np.percentile(singles[n, d], 50))
            out[n][speed_metric("latency_p90_ms", d)] = 1000 * float(np.percentile(singles[n, d], 90))
            out[n][speed_metric("throughput_b32", d)] = BATCH / float(np.median(batches[n, d]))
    return out


def _seconds(loaded: Loaded, pixels: np.ndarray, decoding: Decoding) -> float:
    start = time.perf_counter()
    caption_pixels(loaded, pixels, decoding)
    return time.perf_counter() - start
