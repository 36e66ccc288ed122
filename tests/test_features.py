"""The frozen-encoder feature cache: features computed while the images are decoded equal those
read back from the pixel cache, and a later call reads the cache instead of decoding again."""
import numpy as np
import pytest
import torch

from captune.data.prepare import prepare_data
from captune.data.synth import write_synthetic
from captune.trainables.config import TrainConfig
from captune.trainables.features import (EarlyFeatures, encoder_features, frozen_encoder, frozen_features,
                                 prepare_with_features, weights_id)

CPU = torch.device("cpu")


def test_features_computed_while_decoding_equal_those_read_back(tmp_path):
    root = write_synthetic(tmp_path / "data", images=40, seed=3)
    images = sorted((root / "Images").iterdir())
    images[5].write_bytes(b"not a jpeg")  # its row stays zero pixels, and is encoded as such both ways
    cfg = TrainConfig(arch="resnet-gru", encoder="resnet18", image_size=32, pretrained=False, skip_bad=True)

    early = EarlyFeatures(frozen_encoder(cfg, CPU), CPU)
    data = prepare_data(root, cfg.image_size, tmp_path / "one-pass", skip_bad=True, progress=False,
                        on_batch=early)
    rows, feats = early.result()
    bad = data.images.index(images[5].name)
    assert sorted(rows) == [i for i in range(len(data.images)) if i != bad]  # every good image, once
    one_pass = encoder_features(early.encoder, cfg.encoder, weights_id(cfg.encoder, False, cfg.seed), data,
                                tmp_path / "one-pass", CPU, progress=False, early=(rows, feats))

    reread = frozen_features(cfg, prepare_data(root, cfg.image_size, tmp_path / "two-pass", skip_bad=True,
                                               progress=False), tmp_path / "two-pass", CPU, progress=False)
    assert np.abs(reread).max() > 0
    np.testing.assert_allclose(one_pass, reread, rtol=1e-4, atol=1e-5)

    # The caches are there now: nothing is decoded or encoded early, the same features come back.
    again = EarlyFeatures(frozen_encoder(cfg, CPU), CPU)
    data2 = prepare_data(root, cfg.image_size, tmp_path / "one-pass", skip_bad=True, progress=False,
                         on_batch=again)
    assert again.result() is None and data2.pixels_key == data.pixels_key
    _, cached = prepare_with_features(root, cfg, tmp_path / "one-pass", CPU, progress=False)
    np.testing.assert_array_equal(cached, one_pass)


def test_early_rows_are_taken_as_given_and_the_rest_encoded(tmp_path):
    root = write_synthetic(tmp_path / "data", images=20, seed=4)
    cfg = TrainConfig(arch="cnn-lstm", encoder="vgg-small", pretrained=False, image_size=32)
    data = prepare_data(root, cfg.image_size, tmp_path / "cache", progress=False)
    encoder = frozen_encoder(cfg, CPU)
    given = np.full((3, encoder.out_features), 7.0, dtype=np.float32)
    features = encoder_features(encoder, cfg.encoder, "test-weights", data, tmp_path / "cache", CPU,
                                progress=False, early=(np.array([0, 4, 9]), given))
    reference = frozen_features(cfg, data, tmp_path / "reference", CPU, progress=False)
    assert (features[[0, 4, 9]] == 7.0).all()
    rest = np.setdiff1d(np.arange(len(features)), [0, 4, 9])
    np.testing.assert_allclose(features[rest], reference[rest], rtol=1e-4, atol=1e-5)



def test_a_failing_early_encoder_stops_no_decoding(tmp_path, monkeypatch):
    # Encoding during decoding only saves time: when it fails (say, out of GPU memory), decoding
    # goes on, so the pixel cache is not lost, and the features seen so far are kept.
    import captune.trainables.features as features_module
    from captune.data.images import read_images

    root = write_synthetic(tmp_path / "data", images=20, seed=5)
    paths = sorted((root / "Images").iterdir())
    cfg = TrainConfig(arch="cnn-lstm", encoder="vgg-small", pretrained=False, image_size=32)
    early = EarlyFeatures(frozen_encoder(cfg, CPU), CPU)
    real, calls = features_module.encode_pixels, []

    def failing_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(features_module, "encode_pixels", failing_second)
    with pytest.warns(UserWarning, match="simulated"):
        pixels, errors = read_images(paths, 32, on_batch=early, batch=8)
    assert not errors and len(calls) == 2  # not tried again after the failure
    rows, _ = early.result()
    assert sorted(rows) == list(range(8)) and pixels[8:].any()
