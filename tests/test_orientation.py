"""A photo stored sideways or mirrored with the EXIF orientation saying so (a phone's photo: 6)
decodes to the pixels of the same photo stored upright, through every path that reads images:
one file, its bytes (a served model's request), the PIL pool (`data check`), the batched
decode_jpeg path (nvJPEG on a GPU), the pixel cache and features training reads, and Ray Data's
decoding task. A pixel cache built before orientations were applied is not read."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from captune.data.cache import cached_array
from captune.data.images import decode_jpegs, default_decoder, read_image, read_image_bytes, read_images
from captune.data.prepare import listed_images, prepare_data
from captune.data.synth import write_synthetic
from captune.infra.fingerprint import files_fingerprint
from captune.trainables.config import TrainConfig
from captune.trainables.feature_job import _decode_batch
from captune.trainables.features import prepare_with_features

SIZE = 16
CORNERS = {(0, 0): (220, 30, 30), (0, 1): (30, 200, 40), (1, 0): (30, 60, 220), (1, 1): (250, 250, 250)}

# How the EXIF 2.3 specification says each orientation was stored, from the upright picture
# (H, W, 3): written from its table (where row 0 and column 0 of the stored image lie in the
# picture), not from PIL's, so that the decoders are checked against the standard itself.
STORED = {1: lambda a: a,
          2: lambda a: a[:, ::-1],  # row 0 at the top, column 0 on the right
          3: lambda a: a[::-1, ::-1],  # bottom, right
          4: lambda a: a[::-1],  # bottom, left
          5: lambda a: a.transpose(1, 0, 2),  # row 0 on the left, column 0 at the top
          6: lambda a: np.rot90(a, 1),  # right, top: the camera turned a quarter clockwise
          7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # right, bottom
          8: lambda a: np.rot90(a, -1)}  # left, bottom


def upright() -> np.ndarray:
    """64 wide, 32 high, a colour per corner: each of the 8 orientations moves them differently."""
    a = np.zeros((32, 64, 3), dtype=np.uint8)
    for (row, col), colour in CORNERS.items():
        a[row * 16:(row + 1) * 16, col * 32:(col + 1) * 32] = colour
    return a


def save(path, orientation: int | None) -> None:
    """The upright picture as a JPEG; with an orientation, stored as it says, tagged with it."""
    pixels = upright() if orientation is None else np.ascontiguousarray(STORED[orientation](upright()))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, subsampling=0, exif=exif.tobytes())


def assert_upright(pixels: np.ndarray, reference: np.ndarray, what: str) -> None:
    diff = np.abs(pixels.astype(int) - reference.astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 95) < 16, f"{what}: mean difference {diff.mean():.1f}"


@pytest.fixture()
def photos(tmp_path):
    """{orientation: its file}, and the pixels of the upright file."""
    (tmp_path / "photos").mkdir()
    files = {o: tmp_path / "photos" / f"o{o}.jpg" for o in STORED}
    for o, path in files.items():
        save(path, o)
    save(tmp_path / "upright.jpg", None)
    return files, read_image(tmp_path / "upright.jpg", SIZE)


def test_the_reference_tells_every_orientation_apart(photos):
    # Ignoring the tag must fail the check below for each orientation but 1, or it proves nothing.
    files, reference = photos
    for o, path in files.items():
        as_stored = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        far = np.abs(as_stored.transpose(2, 0, 1).astype(int) - reference).mean()
        assert (far < 3) == (o == 1), f"orientation {o}: {far:.1f}"


def test_one_file_and_its_bytes_decode_upright(photos):
    files, reference = photos
    for o, path in files.items():
        assert_upright(read_image(path, SIZE), reference, f"read_image, orientation {o}")
        assert_upright(read_image_bytes(path.read_bytes(), SIZE, name=path.name), reference,
                       f"read_image_bytes, orientation {o}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="nvJPEG needs a GPU"))])
def test_the_batched_jpeg_decoder_turns_each_image_as_pil_does(photos, device):
    files, _ = photos
    paths = [files[o] for o in sorted(files)] + [files[1].parents[1] / "upright.jpg"]
    out = np.zeros((len(paths), 3, SIZE, SIZE), dtype=np.uint8)
    seen = {}
    left = decode_jpegs(paths, SIZE, out, device, batch=3,
                        on_batch=lambda rows, pixels: seen.update(zip(rows.tolist(), pixels.cpu().numpy())))
    assert left == []  # every one decoded on this path, none left for PIL
    reference = out[-1]  # this decoder's own pixels differ a little from PIL's at the edges
    for row, o in enumerate(sorted(files)):
        assert_upright(out[row], reference, f"decode_jpegs on {device}, orientation {o}")
        assert_upright(seen[row], reference, f"decode_jpegs' on_batch on {device}, orientation {o}")


def test_the_pil_pool_and_ray_datas_decoding_task_turn_each_image(photos, tmp_path):
    files, reference = photos
    paths = [files[o] for o in sorted(files)]
    pixels, errors = read_images(paths, SIZE, decoder="pil")  # as `captune data check` reads them
    batch = _decode_batch({"row": np.arange(len(paths)), "path": np.array([str(p) for p in paths])}, SIZE)
    uris = _decode_batch({"row": np.arange(len(paths)), "path": np.array([f"file://{p}" for p in paths])}, SIZE)
    assert not errors and (batch["error"] == "").all() and (uris["error"] == "").all()
    for row, o in enumerate(sorted(files)):
        for what, got in (("read_images", pixels), ("Ray Data's decoding", batch["pixels"]),
                          ("Ray Data's decoding from object storage", uris["pixels"])):
            assert_upright(got[row], reference, f"{what}, orientation {o}")


def twin_datasets(tmp_path):
    """Two copies of a small dataset whose first 8 images are the corners picture: in one stored
    as each orientation says (tagged), in the other upright."""
    roots = []
    for name, tagged in (("tagged", True), ("upright", False)):
        root = write_synthetic(tmp_path / name, images=12, seed=2)
        for o, path in zip(STORED, sorted((root / "Images").iterdir())):
            save(path, o if tagged else None)
        roots.append(root)
    return roots


def test_the_pixel_cache_and_features_training_reads_are_upright(tmp_path):
    tagged, straight = twin_datasets(tmp_path)
    cfg = TrainConfig(arch="cnn-lstm", encoder="vgg-small", pretrained=False, image_size=SIZE)
    cpu = torch.device("cpu")
    data, features = prepare_with_features(tagged, cfg, tmp_path / "cache", cpu, progress=False)
    reference, expected = prepare_with_features(straight, cfg, tmp_path / "cache", cpu, progress=False)
    assert data.images == reference.images
    np.testing.assert_array_equal(data.pixels[8:], reference.pixels[8:])  # the untouched images
    for row in range(8):
        assert_upright(data.pixels[row], reference.pixels[row], f"pixel cache, orientation {row + 1}")
    scale = np.abs(expected[:8]).mean()
    assert np.abs(features[:8] - expected[:8]).mean() < 0.05 * scale  # JPEG noise, not a turned picture


def test_a_pixel_cache_built_before_orientations_were_applied_is_not_read(tmp_path):
    # The cache key holds each file's name, size and time, which an upgrade does not change: the
    # key of a cache built before (same files) must differ, or its sideways pixels are read.
    [tagged, _] = twin_datasets(tmp_path)
    _, images, paths = listed_images(tagged, 0)
    before = {"files": files_fingerprint(paths), "count": len(paths), "size": SIZE, "decoder": default_decoder()}

    def as_stored(out):
        for i, path in enumerate(paths):
            out[i] = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE))).transpose(2, 0, 1)
        return {"errors": {}}

    cached_array(tmp_path / "cache", f"pixels{SIZE}", before, (len(paths), 3, SIZE, SIZE), "uint8", as_stored)
    data = prepare_data(tagged, SIZE, tmp_path / "cache", progress=False)
    for row in range(8):
        assert_upright(data.pixels[row], read_image(paths[0], SIZE), f"orientation {row + 1}")
