"""Feature caches and shared feature stores that are damaged or cannot be written: features that
are not finite are never written, nor read as valid (local cache, shared folder, object storage);
a read-only store serves the features built in it, without a lock file; `captune features` on a
store it cannot write is refused by name before Ray starts."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from captune.cli import main
from captune.data.cache import CacheNotWritable, cached_array, entry_name
from captune.data.prepare import PreparedData, prepare_data
from captune.data.synth import write_synthetic
from captune.trainables import feature_job
from captune.trainables.config import TrainConfig, replace
from captune.trainables.feature_job import build_features, load_feature_set
from captune.trainables.features import FeatureError, encoder_features, frozen_encoder, frozen_features, weights_id
from captune.trainables.loop import WorkerContext, train
from tests.filesystems import immutable, read_only, tmpfs

CPU = torch.device("cpu")
CFG = TrainConfig(arch="cnn-lstm", encoder="vgg-small", pretrained=False, image_size=32, embed_size=16,
                  hidden_size=32, batch_size=16, epochs=1, vocab_threshold=1)


def fill_nan(npy: Path) -> None:
    """Overwrite an entry's values with NaN in place: its size, header and sidecar stay valid."""
    values = np.load(npy, mmap_mode="r+")
    values[:] = np.nan
    values.flush()


def test_features_that_are_not_finite_are_refused_naming_the_encoder_and_images(tmp_path):
    root = write_synthetic(tmp_path / "data", images=12, seed=6)
    data = prepare_data(root, CFG.image_size, tmp_path / "cache", progress=False)
    encoder = frozen_encoder(CFG, CPU)
    with torch.no_grad():
        next(encoder.parameters()).fill_(float("nan"))  # as a damaged weights file would load
    with pytest.raises(FeatureError, match=rf"the vgg-small encoder \(w1 weights\) gave NaN or infinite features "
                                           rf"for 12 of 12 images \({re.escape(data.images[0])}, .* and 7 more\); "
                                           rf"nothing was written"):
        encoder_features(encoder, "vgg-small", "w1", data, tmp_path / "cache", CPU, progress=False)
    assert not [p for p in (tmp_path / "cache").glob("features-*") if p.suffix != ".lock"]


def test_a_cached_entry_holding_nan_is_built_again_with_a_warning_naming_it(tmp_path):
    root = write_synthetic(tmp_path / "data", images=12, seed=7)
    data = prepare_data(root, CFG.image_size, tmp_path / "cache", progress=False)
    good = np.array(frozen_features(CFG, data, tmp_path / "cache", CPU, progress=False))
    [npy] = (tmp_path / "cache").glob("features-vgg-small-*.npy")
    fill_nan(npy)  # the right size, a valid sidecar: it was read as valid, and every trial diverged
    with pytest.warns(UserWarning, match=rf"{npy}: 12 of its 12 rows hold NaN or infinite values; building it again"):
        again = frozen_features(CFG, data, tmp_path / "cache", CPU, progress=False)
    np.testing.assert_array_equal(again, good)

    # A dataset read from a feature set's manifest has no pixels to build them from: named, not read.
    fill_nan(npy)
    manifest = PreparedData.from_manifest(data.manifest())
    with pytest.raises(FeatureError, match=rf"no valid vgg-small features .*{npy}: 12 of its 12 rows hold NaN.*"
                                           rf"build them again with `captune features`"):
        frozen_features(CFG, manifest, tmp_path / "cache", CPU, progress=False)


def build_ones(out):
    out[:] = 1.0
    return {"n": len(out)}


def test_a_read_only_or_immutable_cache_serves_its_entries_and_names_itself_for_others(tmp_path):
    with tmpfs(tmp_path / "ro") as folder:
        cached_array(folder, "features-test", {"k": 1}, (10, 4), "float32", build_ones)
        read_only(folder)
        array, info = cached_array(folder, "features-test", {"k": 1}, (10, 4), "float32", build_ones)
        assert float(array.min()) == 1.0 and info == {"n": 10}
        with pytest.raises(CacheNotWritable, match=rf"{folder}: cannot write there \(Read-only file system\), and "
                                                   rf"features-test-\w+.npy must be built \(not built yet\)"):
            cached_array(folder, "features-test", {"k": 2}, (10, 4), "float32", build_ones)
    folder = tmp_path / "immutable"
    cached_array(folder, "features-test", {"k": 1}, (10, 4), "float32", build_ones)
    (folder / f"{entry_name('features-test', {'k': 2})}.npy.lock").touch()  # a lock file left, no entry
    with immutable(folder):
        array, _ = cached_array(folder, "features-test", {"k": 1}, (10, 4), "float32", build_ones)
        assert float(array.min()) == 1.0
        for k in (2, 3):  # the lock taken, its entry not writable; the lock itself not writable
            with pytest.raises(CacheNotWritable, match=rf"{folder}: cannot write there \(Operation not permitted\)"):
                cached_array(folder, "features-test", {"k": k}, (10, 4), "float32", build_ones)


# --- the shared store (trainables/feature_job.py, `captune features`) ---------------------------

def test_the_ray_data_job_refuses_features_that_are_not_finite(tmp_path, monkeypatch):
    # The encoding runs in Ray Data's actors; what the driver writes is what is checked here, so the
    # cluster's output is stood in for by NaN, as an encoder with damaged weights gives.
    root = write_synthetic(tmp_path / "data", images=12, seed=8)

    def encoder_gives_nan(paths, images, cfg, out, echo):
        out[:] = np.nan
        return {}

    monkeypatch.setattr(feature_job, "_encode_on_cluster", encoder_gives_nan)
    with pytest.raises(FeatureError, match=r"the vgg-small encoder \(random-seed0-torch.*\) gave NaN or infinite "
                                           r"features for 12 of 12 images \(synth_8_000000.jpg, .*nothing was written"):
        build_features(root, CFG, str(tmp_path / "shared"))
    assert not [p for p in (tmp_path / "shared").glob("features-*") if p.suffix != ".lock"]


def test_a_shared_entry_holding_nan_is_not_already_there_but_built_again(ray_cluster, tmp_path):
    root = write_synthetic(tmp_path / "data", images=12, seed=9)
    built = build_features(root, CFG, str(tmp_path / "shared"), echo=lambda line: None)
    [npy] = (tmp_path / "shared").glob("features-vgg-small-*.npy")
    good = np.load(npy)
    fill_nan(npy)
    with pytest.warns(UserWarning, match=rf"{npy}: 12 of its 12 rows hold NaN"):
        again = build_features(root, CFG, str(tmp_path / "shared"), echo=lambda line: None)
    assert again.built and built.built
    np.testing.assert_array_equal(np.load(npy), good)


def test_a_damaged_entry_in_object_storage_is_named_where_a_node_fetches_it(ray_cluster, tmp_path):
    root = write_synthetic(tmp_path / "data", images=12, seed=10)
    store = f"file://{tmp_path / 'bucket'}/features"
    built = build_features(root, replace(CFG, cache_dir=str(tmp_path / "driver")), store, echo=lambda line: None)
    [npy] = (tmp_path / "bucket" / "features").glob("*.npy")
    load_feature_set(built.manifest, tmp_path / "node")
    [copy] = (tmp_path / "node").glob("*.npy")
    fill_nan(copy)  # the node's copy damaged: fetched again
    load_feature_set(built.manifest, tmp_path / "node")
    assert np.isfinite(np.load(copy)).all()
    fill_nan(npy)  # the bucket's: named, with what to do
    with pytest.raises(FeatureError, match=rf"{store}/{npy.stem}.npy: 12 of its rows hold NaN .*delete it and its "
                                           rf"sidecar {npy.stem}.json, then build the features again"):
        load_feature_set(built.manifest, tmp_path / "elsewhere")


def test_a_read_only_store_serves_prebuilt_features_to_the_command_and_to_training(ray_cluster, tmp_path):
    root = write_synthetic(tmp_path / "data", images=12, seed=11)
    with tmpfs(tmp_path / "mount") as mount:
        shared = str(mount / "features")
        build_features(root, CFG, shared, echo=lambda line: None)
        read_only(mount)
        found = build_features(root, CFG, shared, connect=lambda: pytest.fail("nothing to build: no Ray"))
        assert not found.built
        data = load_feature_set(found.manifest, Path(shared))
        metrics = train(replace(CFG, cache_dir=shared), root, WorkerContext(echo=lambda line: None), data=data)
        assert metrics["epoch"] == 1


def test_features_command_refuses_a_store_it_cannot_write_before_ray_starts(synth_dir, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr("captune.infra.raycluster.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    command = ["features", "--data", str(synth_dir), "--encoder", "vgg-small", "--image-size", "32", "--storage"]
    with tmpfs(tmp_path / "ro") as folder:
        read_only(folder)
        assert main(command + [str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"captune: error: shared features (--storage, or CAPTUNE_STORAGE): cannot write in {folder}/features " \
               f"(Read-only file system)" in err and "Traceback" not in err
    (tmp_path / "frozen" / "features").mkdir(parents=True)
    with immutable(tmp_path / "frozen" / "features"):
        assert main(command + [str(tmp_path / "frozen")]) == 2
        assert f"cannot write in {tmp_path / 'frozen' / 'features'} (Operation not permitted)" in capsys.readouterr().err
