"""PNG and other Pillow images (`latticewatch.io.readers.image`) on files written by Pillow."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latticewatch.io.readers import count_sections
from reader_files import json_ok, raises_read_error, random_image, read_one


def test_png_8_and_16_bit(tmp_path):
    for dtype in ("uint8", "uint16"):
        data = random_image((32, 40), dtype)
        path = tmp_path / f"{dtype}.png"
        Image.fromarray(data).save(path)
        frame = read_one(path)
        assert frame.frame_id == str(path)
        assert frame.pixels.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame.pixels, data)
        assert frame.pixel_size_nm is None and frame.acquired_at is None
        json_ok(frame.meta)
        assert count_sections(path) == 1


def test_png_rgb_and_grey_alpha(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 200
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    raises_read_error(path, r"RGB image \(3 samples per pixel\)")
    assert (read_one(path, permissive=True).pixels == round(0.114 * 200)).all()

    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0], la[..., 1] = 42, 255
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    raises_read_error(path, r"grey \+ alpha image")
    frame = read_one(path, permissive=True)
    assert (frame.pixels == 42).all() and frame.meta["converted_from"] == "grey + alpha"


def test_png_palette(tmp_path):
    img = Image.fromarray(np.full((32, 32), 3, np.uint8), mode="L").convert("P")
    path = tmp_path / "pal.png"
    img.save(path)
    raises_read_error(path, "palette-colour PNG")
    assert (read_one(path, permissive=True).pixels == 3).all()


def test_png_text_and_jpeg_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    raises_read_error(path, "cannot read as PNG")
    jpeg = tmp_path / "photo.png"
    Image.fromarray(random_image((32, 32), "uint8")).save(jpeg, format="JPEG")
    raises_read_error(jpeg, "cannot read as PNG")
