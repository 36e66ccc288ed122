"""Features built by Ray Data (captune.trainables.feature_job, `captune features`): equal to the local
one-pass path's, built once, read back by a trial through the manifest without any image, and a
bad image reported as `data check` reports it, the good images' features kept."""
import contextlib
import io
import shutil

import numpy as np
import pytest
import torch

from captune.cli import main
from captune.data.prepare import DataProblems
from captune.data.synth import write_synthetic
from captune.trainables.config import TrainConfig, replace
from captune.trainables.feature_job import build_features, load_feature_set
from captune.trainables.features import prepare_with_features
from captune.trainables.loop import WorkerContext, train

CFG = TrainConfig(arch="resnet-gru", encoder="resnet18", pretrained=False, image_size=32, embed_size=16,
                  hidden_size=32, batch_size=16, epochs=1, vocab_threshold=1)


def test_ray_data_features_equal_the_local_path_and_a_trial_reads_them_without_images(ray_cluster, tmp_path):
    root = write_synthetic(tmp_path / "data", images=40, seed=3)
    lines = []
    built = build_features(root, CFG, str(tmp_path / "shared"), echo=lines.append)
    assert built.built and built.shape == (40, 512)
    assert "images/s" in lines[-1] and lines[-1].startswith("  40/40 images")
    local_data, local = prepare_with_features(root, CFG, tmp_path / "local", torch.device("cpu"), progress=False)
    assert built.data.images == local_data.images
    [entry] = (tmp_path / "shared").glob("features-resnet18-*.npy")
    np.testing.assert_allclose(np.load(entry), local, atol=1e-5)

    written = entry.stat().st_mtime_ns
    again = build_features(root, CFG, str(tmp_path / "shared"))
    assert not again.built and entry.stat().st_mtime_ns == written  # built once

    # A trial given the manifest holds no image: train on it with the images gone.
    data = load_feature_set(built.manifest, tmp_path / "shared")
    assert data.pixels is None and data.captions("val") == local_data.captions("val")
    assert list(data.rows("train")) == list(local_data.rows("train"))
    shutil.rmtree(root / "Images")
    metrics = train(replace(CFG, cache_dir=str(tmp_path / "shared")), root, WorkerContext(echo=lambda line: None),
                    data=data)
    assert metrics["epoch"] == 1 and 0.0 <= metrics["bleu4"] <= 1.0


def test_object_storage_gets_one_entry_that_each_node_fetches_once(ray_cluster, tmp_path):
    # A file:// URI takes the object-storage path (pyarrow's filesystems, as s3:// does): built in
    # this machine's cache, uploaded; a trial on another "node" (its own cache) fetches the entry.
    # The images are read from the bucket's copy of the dataset (--images-from), not the folder.
    root = write_synthetic(tmp_path / "data", images=20, seed=5)
    shutil.copytree(root, tmp_path / "bucket" / "data")
    lost = sorted((tmp_path / "bucket" / "data" / "Images").iterdir())[0]
    lost.rename(lost.with_suffix(".moved"))
    store, images = f"file://{tmp_path / 'bucket'}/features", f"file://{tmp_path / 'bucket'}/data"
    with pytest.raises(Exception, match=f"{lost.name}: not there, though the dataset folder given to --data has it"):
        build_features(root, replace(CFG, cache_dir=str(tmp_path / "driver-cache")), store, images_from=images)
    lost.with_suffix(".moved").rename(lost)
    built = build_features(root, replace(CFG, cache_dir=str(tmp_path / "driver-cache")), store, images_from=images)
    assert built.built and built.manifest.startswith(store) and built.manifest.endswith(".skip0.data.json")
    assert sorted(p.suffix for p in (tmp_path / "bucket" / "features").iterdir()) == [".json", ".json", ".npy"]
    again = build_features(root, replace(CFG, cache_dir=str(tmp_path / "elsewhere")), store)
    assert not again.built and not (tmp_path / "elsewhere").exists()  # found in the bucket: nothing built
    node = tmp_path / "node-cache"
    data = load_feature_set(built.manifest, node)
    [fetched] = node.glob("features-resnet18-*.npy")
    np.testing.assert_array_equal(np.load(fetched), np.load(next((tmp_path / "driver-cache").glob("features-*.npy"))))
    mtime = fetched.stat().st_mtime_ns
    load_feature_set(built.manifest, node)
    assert fetched.stat().st_mtime_ns == mtime  # fetched once per node
    metrics = train(replace(CFG, cache_dir=str(node)), root, WorkerContext(echo=lambda line: None), data=data)
    assert metrics["epoch"] == 1


def test_a_bad_image_is_named_and_the_good_images_features_are_kept(ray_cluster, tmp_path):
    root = write_synthetic(tmp_path / "data", images=20, seed=4)
    bad = sorted((root / "Images").iterdir())[3]
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataProblems, match=f"{bad.name}: corrupt_image: not an image PIL can read"):
        build_features(root, CFG, str(tmp_path / "shared"))
    # Nothing is lost: with skip_bad the same entry is read, not built again.
    kept = build_features(root, replace(CFG, skip_bad=True), str(tmp_path / "shared"))
    assert not kept.built and [p.image for p in kept.data.skipped] == [bad.name]
    assert bad.name not in kept.data.corpus.splits["train"] + kept.data.corpus.splits["val"]


def test_features_command_needs_a_storage_and_says_where_it_wrote(ray_cluster, synth_dir, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.delenv("CAPTUNE_STORAGE", raising=False)
    assert main(["features", "--data", str(synth_dir), "--encoder", "resnet18"]) == 2
    assert "pass --storage or set CAPTUNE_STORAGE" in capsys.readouterr().err
    assert main(["features", "--data", str(synth_dir), "--encoder", "resnet18", "--set", "lr=0.1"]) == 2
    assert "--set lr: features do not depend on it" in capsys.readouterr().err
    monkeypatch.setenv("CAPTUNE_STORAGE", str(tmp_path / "storage"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["features", "--data", str(synth_dir), "--encoder", "vgg-small", "--image-size", "32"]) == 0
    assert "features of 60 images (vgg-small, 32px, " in out.getvalue()
    assert str(tmp_path / "storage" / "features") in out.getvalue()
