"""`captune features`: a frozen encoder's feature cache built once by Ray Data across the cluster.

Images are read and decoded (PIL, squashed to the image size) by CPU tasks on every node, encoded
in batches by actors (one GPU each, bf16 there; on the CPU where the cluster has no GPU), and
gathered by this driver into one cache entry in the storage's `features/` folder, under the key
and validity rules of the local cache (`captune.data.cache.cached_array`). Beside it goes the prepared
dataset's manifest (`PreparedData.manifest`): the checked captions and splits and the row of each
image, so a trial that reads both needs no image, on any node.

Which path builds features: a sweep whose storage is shared (`CAPTUNE_STORAGE` set, as
`cluster.yaml` does) uses this one (`search/preflight.py`); otherwise the sweep's driver decodes and
encodes in one local pass (`captune.trainables.features.prepare_with_features`), which on one machine is
faster: no Ray Data start-up and no pixels passed between processes.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from captune.data.cache import EntryNotThere, cached_array, entry_name, nonfinite_rows, write_json
from captune.data.images import ImageError, read_image, read_image_bytes
from captune.data.prepare import DataProblems, PreparedData, checked_data, listed_images, pixels_key
from captune.infra.errors import UserError
from captune.infra.mlflow_store import writable_folder
from captune.infra.storage import download, exists, is_uri, join, read_bytes, upload
from captune.trainables.config import TrainConfig
from captune.trainables.features import (FeatureError, encode_pixels, features_key, for_inference, frozen_encoder,
                                 require_finite, weights_id)

DECODE_BATCH = 64  # images per decoding task's batch
ENCODE_BATCH = 256  # images per encoder call in an actor
DECODER = "pil"  # what decodes here: part of the key, as in the local cache


class StorageError(UserError, ValueError):
    """No storage every node can read, where one is needed."""


@dataclass
class FeatureSet:
    data: PreparedData  # pixels None: a trial needs only the features
    shape: tuple[int, int]  # (images, values per image)
    folder: str  # the features folder (a path, or a URI in object storage)
    manifest: str  # where the manifest is, in that folder
    built: bool  # False: it was there already
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.shape[0] / self.seconds if self.seconds else float("inf")


def feature_folder(storage: str | None = None) -> str:
    """`features/` of the shared storage: --storage, else $CAPTUNE_STORAGE (a folder every node
    mounts, or object storage such as s3://)."""
    storage = storage or os.environ.get("CAPTUNE_STORAGE", "")
    if not storage:
        raise StorageError("no storage for shared features: pass --storage or set CAPTUNE_STORAGE")
    return join(storage if is_uri(storage) else str(Path(storage).resolve()), "features")


def shared_feature_folder() -> str | None:
    """$CAPTUNE_STORAGE/features when CAPTUNE_STORAGE is set (as cluster.yaml sets it), else None:
    the switch between this path and the local one-pass path (see the module's docstring)."""
    return feature_folder() if os.environ.get("CAPTUNE_STORAGE") else None


def build_features(data_root: str | Path, cfg: TrainConfig, folder: str, echo: Callable[[str], None] = print,
                   images_from: str | None = None, connect: Callable[[], None] | None = None) -> FeatureSet:
    """The features of every image of the dataset for cfg's frozen encoder, in `folder`: found
    there (read without writing: the folder may be read-only), else built on the Ray cluster this
    process is connected to, or that `connect()` connects it to (into `folder` when it is a path,
    refused first if it cannot be written; into this machine's cache, then uploaded, when it is a
    URI). Raises DataProblems naming every bad item (as `captune data check` does) unless
    cfg.skip_bad; the features of the good images are kept either way. `images_from`: a URI holding
    a copy of the dataset folder (s3://…), where the job's tasks read the images, so that only this
    machine needs the folder itself."""
    root = Path(data_root)
    t0 = time.perf_counter()
    corpus, images, paths = listed_images(root, cfg.split_seed)
    key_pixels = pixels_key(paths, cfg.image_size, DECODER)
    key = features_key(cfg.encoder, weights_id(cfg.encoder, cfg.pretrained, cfg.seed), key_pixels)
    name = entry_name(f"features-{cfg.encoder}", key)
    remote = is_uri(folder)
    built = False
    meta = _valid_meta(folder, name, key) if remote else None
    if meta is None:
        sources = [join(images_from, p.relative_to(root).as_posix()) for p in paths] if images_from \
            else [str(p) for p in paths]

        def build(out: np.ndarray) -> dict:
            nonlocal built
            built = True
            errors = _encode_on_cluster(sources, images, cfg, out, echo)
            require_finite(out, images, cfg.encoder, weights_id(cfg.encoder, cfg.pretrained, cfg.seed))
            return {"errors": errors}

        local = cfg.cache_path() if remote else Path(folder)
        width = frozen_encoder(cfg, torch.device("cpu")).out_features
        meta = _found_or_built(local, f"features-{cfg.encoder}", key, (len(images), width), build,
                               None if remote else folder, connect)
        if remote:  # the features, then their sidecar: a reader takes the entry as valid only then
            upload(local / f"{name}.npy", join(folder, f"{name}.npy"))
            upload(local / f"{name}.json", join(folder, f"{name}.json"))
    seconds = time.perf_counter() - t0
    try:
        data = checked_data(root, corpus, images, None, key_pixels, meta["info"]["errors"], cfg.skip_bad)
    except DataProblems as e:  # in this command's words
        raise DataProblems(root, e.problems, "the features of the other images are kept",
                           "--set skip_bad=true") from None
    manifest = join(folder, f"{name}.skip{int(cfg.skip_bad)}.data.json")
    _write_manifest(manifest, data)
    return FeatureSet(data, tuple(meta["shape"]), folder, manifest, built, seconds)


def _found_or_built(local: Path, kind: str, key: dict, shape: tuple[int, int], build: Callable[[np.ndarray], dict],
                    store: str | None, connect: Callable[[], None] | None) -> dict:
    """The sidecar of the entry in `local`: read if valid, else built, once the `store` folder
    (None: `local` is this machine's cache) is known to be writable and `connect` has been called."""
    try:
        cached_array(local, kind, key, shape, "float32", None)
    except EntryNotThere:
        if store is not None:  # before Ray starts: a read-only or immutable store is named, not a traceback
            writable_folder(Path(store), "shared features (--storage, or CAPTUNE_STORAGE)")
        if connect is not None:
            connect()
        cached_array(local, kind, key, shape, "float32", build)
    return json.loads((local / f"{entry_name(kind, key)}.json").read_text())


def load_feature_set(manifest: str, cache_dir: Path) -> PreparedData:
    """The prepared dataset a feature set was built for. From object storage, its features entry
    is fetched into `cache_dir` first (once per node: the cache's lock; again if the copy there
    was damaged), where `train` reads it by the same key; from a folder, the folder is the cache
    (give it as `cache_dir`), read without writing anything."""
    if is_uri(manifest):
        folder, file = manifest.rsplit("/", 1)
        _fetch(folder, file.split(".skip")[0], cache_dir)
    return PreparedData.from_manifest(json.loads(read_bytes(manifest)))


def _fetch(folder: str, name: str, cache_dir: Path) -> None:
    """The entry `name` of object storage `folder` into `cache_dir`, unless a whole copy is there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{name}.npy") + ".lock"):  # the lock captune.data.cache.cached_array takes
        sidecar = read_bytes(join(folder, f"{name}.json"))
        here, npy = cache_dir / f"{name}.json", cache_dir / f"{name}.npy"
        fetched = here.is_file() and here.read_bytes() == sidecar and npy.is_file() \
            and npy.stat().st_size == json.loads(sidecar)["bytes"] and not _damage(npy)
        if fetched:
            return
        here.unlink(missing_ok=True)  # the features, then their sidecar: the entry is valid only then
        download(join(folder, f"{name}.npy"), npy)
        damage = _damage(npy)
        if damage:
            npy.unlink()
            raise FeatureError(f"{join(folder, name)}.npy: {damage} (damaged after it was written): delete it and "
                               f"its sidecar {name}.json, then build the features again with `captune features`")
        here.write_bytes(sidecar)


def _damage(npy: Path) -> str:
    """What makes a features file unusable ("" for nothing)."""
    try:
        bad = len(nonfinite_rows(np.load(npy, mmap_mode="r")))
    except (OSError, ValueError) as e:
        return f"not a NumPy array file ({e})"
    return f"{bad:,} of its rows hold NaN or infinite values" if bad else ""


def _valid_meta(folder: str, name: str, key: dict) -> dict | None:
    """The sidecar of the entry in object storage, if it is there for this key."""
    try:
        meta = json.loads(read_bytes(join(folder, f"{name}.json")))
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == key and exists(join(folder, f"{name}.npy")) else None


def _write_manifest(location: str, data: PreparedData) -> None:
    if not is_uri(location):
        path = Path(location)
        if path.is_file() and path.read_text() == json.dumps(data.manifest()):
            return  # there already: nothing is written, so a read-only store serves it
        writable_folder(path.parent, "shared features (--storage, or CAPTUNE_STORAGE)")
        write_json(path, data.manifest())
        return
    with tempfile.TemporaryDirectory(prefix="captune-manifest-") as tmp:
        write_json(Path(tmp) / "m.json", data.manifest())
        upload(Path(tmp) / "m.json", location)


# --- the Ray Data job -------------------------------------------------------------------------------

def _encode_on_cluster(paths: list[str], images: list[str], cfg: TrainConfig, out: np.ndarray,
                       echo: Callable[[str], None]) -> dict[str, str]:
    """Fill out[i] with the features of paths[i] (files, or URIs); returns {image: error} for those
    that failed to decode."""
    # Here, not at the top: trials import this module for load_feature_set, and Ray Data's import
    # (pyarrow datasets, its operators) would add to every trial process.
    import ray
    import ray.data

    # This command prints its own progress (images/s, below): Ray Data's bars stay (on a terminal),
    # its status block, logged every few seconds where there is none, goes.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    items = [{"row": i, "path": p} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // DECODE_BATCH, 4 * cpus)))
    ds = ds.map_batches(_decode_batch, fn_kwargs={"size": cfg.image_size}, batch_size=DECODE_BATCH,
                        batch_format="numpy", num_cpus=1)
    encoders = ray.data.ActorPoolStrategy(min_size=1, max_size=gpus or max(1, cpus // 2))  # autoscaling
    ds = ds.map_batches(_Encode, fn_constructor_kwargs={"config": cfg.to_dict()}, batch_size=ENCODE_BATCH,
                        batch_format="numpy", num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                        compute=encoders)
    # Ray Data runs a task again, and restarts an actor, whose worker or node was lost (its defaults:
    # no limit); an exception of ours (a node that does not see the images) fails the job at once.
    errors: dict[str, str] = {}
    done, t0, shown = 0, time.perf_counter(), 0.0
    echo(f"encoding {len(items):,} images with {cfg.encoder} at {cfg.image_size}px on "
         f"{f'{gpus} GPU(s)' if gpus else f'{cpus} CPU(s)'} (Ray Data)")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok = batch["error"] == ""
        out[batch["row"][ok]] = batch["features"][ok]
        errors.update((images[row], str(error)) for row, error in zip(batch["row"][~ok], batch["error"][~ok]))
        done += len(batch["row"])
        elapsed = time.perf_counter() - t0
        if elapsed - shown >= 10 or done == len(items):
            shown = elapsed
            echo(f"  {done:,}/{len(items):,} images, {done / elapsed:,.0f} images/s")
    if done != len(items):  # every row comes back, bad ones with their error: a gap is a bug
        raise RuntimeError(f"Ray Data returned {done} of {len(items)} images")
    return errors


def _decode_batch(batch: dict, size: int) -> dict:
    """A CPU task: pixels (B, 3, S, S) uint8 of batch["path"], an error message ("" when decoded)
    per image instead of an exception, so one bad image is reported, not a failed job."""
    pixels = np.zeros((len(batch["path"]), 3, size, size), dtype=np.uint8)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            pixels[i] = _read(path, size)
            errors.append("")
        except ImageError as e:
            errors.append(str(e))
    return {"row": batch["row"], "pixels": pixels, "error": np.array(errors, dtype=object)}


def _read(path: str, size: int) -> np.ndarray:
    """The driver saw every image in its copy of the dataset: one missing here means this node, or
    the object storage copy, does not hold the dataset it read (not a bad image: the job fails)."""
    if is_uri(path):
        try:
            content = read_bytes(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not there, though the dataset folder given to --data has it: "
                                    f"the copy the images are read from differs") from None
        return read_image_bytes(content, size, name=path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: not on node {socket.gethostname()}; the dataset folder must be one "
                                f"every node of the cluster mounts at the same path (or give --images-from)")
    return read_image(path, size)


class _Encode:
    """An actor holding the frozen encoder: features (B, F) float32 of a batch's pixels."""

    def __init__(self, config: dict):
        cfg = TrainConfig(**config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # the one CPU this actor reserves
        self.encoder = for_inference(frozen_encoder(cfg, self.device), self.device)
        self.width = self.encoder.out_features

    def __call__(self, batch: dict) -> dict:
        ok = batch["error"] == ""
        features = np.zeros((len(ok), self.width), dtype=np.float32)
        if ok.any():
            features[ok] = encode_pixels(self.encoder, torch.from_numpy(batch["pixels"][ok]), self.device).cpu().numpy()
        return {"row": batch["row"], "features": features, "error": batch["error"]}
