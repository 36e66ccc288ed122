"""Every image mode PIL opens becomes the right 8-bit RGB, or is refused by name."""
import numpy as np
import pytest
from PIL import Image

from captune.data.images import ImageError, read_image

RAMP16 = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # 16-bit grey: 0, 1, 128, 255 in 8 bits
GREY8 = np.array([[0, 1, 128, 255]] * 4, dtype=np.uint8)


def rgb(grey: np.ndarray) -> np.ndarray:
    return np.stack([grey] * 3)


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "g16.png")  # PIL opens it as mode I;16 (or I)
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    assert (read_image(tmp_path / "g16.png", 4) == rgb(GREY8)).all()


@pytest.mark.parametrize("name,make,expected", [
    ("i32.tif", lambda: Image.fromarray(RAMP16.astype(np.int32)), rgb(GREY8)),  # 32-bit integer holding 16-bit values
    ("f32.tif", lambda: Image.fromarray(GREY8.astype(np.float32) / 255), rgb(GREY8)),  # float 0..1
    ("one.png", lambda: Image.fromarray(GREY8 >= 128), rgb(np.where(GREY8 >= 128, 255, 0).astype(np.uint8))),
    ("l.png", lambda: Image.fromarray(GREY8), rgb(GREY8)),
    ("cmyk.jpg", None, None),  # checked against PIL's own CMYK conversion below
])
def test_each_mode_matches_its_known_conversion(tmp_path, name, make, expected):
    if make is None:
        cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
        cmyk.save(tmp_path / name, quality=100)
        out = read_image(tmp_path / name, 4)
        assert out[0].min() > 240 and out[1].max() < 15 and out[2].max() < 15
        return
    make().save(tmp_path / name)
    assert (read_image(tmp_path / name, 4) == expected).all()


def test_transparency_is_shown_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, half of it transparent
    rgba[:, :2, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png", 4)
    assert (out[:, :, :2] == np.array([200, 0, 0])[:, None, None]).all()  # opaque: as drawn
    assert (out[:, :, 2:] == 255).all()  # transparent: white, not the black under it
    Image.fromarray(np.stack([GREY8, np.full_like(GREY8, 0)], -1), "LA").save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png", 4) == 255).all()  # fully transparent grey: white
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    assert (read_image(tmp_path / "p.png", 4) == 255).all()


def test_images_of_unknown_scale_are_refused_by_name(tmp_path):
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match="big.tif: 32-bit integer image with values 70000..70000"):
        read_image(tmp_path / "big.tif", 4)
    Image.fromarray(np.full((4, 4), 3.5, dtype=np.float32)).save(tmp_path / "hdr.tif")
    with pytest.raises(ImageError, match="hdr.tif: floating-point image with values 3.5..3.5, outside 0..1"):
        read_image(tmp_path / "hdr.tif", 4)


def bomb_png(path, side: int = 30000):
    """A PNG whose header claims side x side pixels: PIL refuses it on opening, before decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) +
                     chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_a_bad_image_not_a_traceback(tmp_path):
    with pytest.raises(ImageError, match="bomb.png: too large to decode safely"):
        read_image(bomb_png(tmp_path / "bomb.png"), 4)
