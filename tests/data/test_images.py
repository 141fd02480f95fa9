"""load_image on every mode and odd case, and check_images with both policies.

The bad files themselves (truncated, empty, not images, too large) and their messages are
in the corpus of tests/test_bad_inputs.py; here: the pixel values, and that the quick
check agrees with load_image.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import captioner.data.images as images_module
from captioner.cli import _one_line
from captioner.data.dataset import ImageDataset, collate_images
from captioner.data.images import (
    ImageCheck,
    check_images,
    image_problem,
    load_image,
    to_rgb,
)
from captioner.data.records import Caption, ImageRecord
from captioner.encoder import image_transform
from captioner.errors import DataError

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def row(mode: str, values: list) -> Image.Image:
    """A 1-row image of ``mode`` with these pixel values."""
    im = Image.new(mode, (len(values), 1))
    for x, v in enumerate(values):
        im.putpixel((x, 0), v)
    return im


def palette(transparent: int | None = None) -> Image.Image:
    """Pixels: palette index 0 (red), then 1 (blue)."""
    im = row("P", [0, 1])
    im.putpalette([*RED, *BLUE] + [0] * 762)
    if transparent is not None:
        im.info["transparency"] = transparent
    return im


def array(values: list, dtype) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=dtype))


# (how to make the image, file name, save options, expected RGB pixels of the row)
MODES = {
    "RGB": (lambda: row("RGB", [(10, 20, 30), (40, 50, 60)]), "a.png", {}, [(10, 20, 30), (40, 50, 60)]),
    "L": (lambda: row("L", [0, 100]), "a.png", {}, [(0, 0, 0), (100, 100, 100)]),
    "1": (lambda: row("1", [0, 1]), "a.png", {}, [(0, 0, 0), WHITE]),
    "P": (palette, "a.png", {}, [RED, BLUE]),
    "P, index 1 transparent": (lambda: palette(1), "a.png", {"transparency": 1}, [RED, WHITE]),
    "RGBA on white": (lambda: row("RGBA", [(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]), "a.png", {},
                      [WHITE, BLUE, (127, 127, 127)]),
    "LA on white": (lambda: row("LA", [(0, 0), (50, 255)]), "a.png", {}, [WHITE, (50, 50, 50)]),
    "L, tRNS grey 7": (lambda: row("L", [7, 100]), "a.png", {"transparency": 7}, [WHITE, (100, 100, 100)]),
    "RGB, tRNS colour": (lambda: row("RGB", [(1, 2, 3), (9, 9, 9)]), "a.png", {"transparency": (1, 2, 3)},
                         [WHITE, (9, 9, 9)]),
    "CMYK": (lambda: row("CMYK", [(0, 255, 255, 0), (0, 0, 0, 255)]), "a.tif", {}, [RED, (0, 0, 0)]),
    # 16-bit: scaled by 255 / 65535 (PIL's own convert would clip 1000 to 255)
    "I;16": (lambda: array([0, 25700, 65535, 1000], np.uint16), "a.png", {}, [(0,) * 3, (100,) * 3, WHITE, (4,) * 3]),
    "I, 16-bit range": (lambda: array([0, 25700, 65535], np.int32), "a.tif", {}, [(0,) * 3, (100,) * 3, WHITE]),
    "I, other range: stretched": (lambda: array([-50, 0, 150], np.int32), "a.tif", {}, [(0,) * 3, (64,) * 3, WHITE]),
    "F in [0, 1]": (lambda: array([0.0, 0.2, 1.0], np.float32), "a.tif", {}, [(0,) * 3, (51,) * 3, WHITE]),
    "F, other range: stretched, NaN black": (lambda: array([-1.0, 1.0, 3.0, np.nan], np.float32), "a.tif", {},
                                             [(0,) * 3, (128,) * 3, WHITE, (0,) * 3]),
    "1 x 1": (lambda: row("RGB", [(7, 8, 9)]), "a.png", {}, [(7, 8, 9)]),
}


@pytest.mark.parametrize("case", MODES, ids=list(MODES))
def test_every_mode_becomes_rgb(tmp_path, case):
    make, name, options, expected = MODES[case]
    source = make()
    path = save(source, tmp_path / name, **options)
    assert Image.open(path).mode == source.mode  # the file really is in that mode
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (len(expected), 1)
    np.testing.assert_allclose(np.asarray(out)[0], np.array(expected), atol=1)


@pytest.mark.parametrize("orientation, size, red_corner", [
    (1, (32, 16), (0, 0)),      # as stored
    (3, (32, 16), (31, 15)),    # rotated 180
    (6, (16, 32), (15, 0)),     # the camera was turned: width and height swap, top-left goes top-right
    (8, (16, 32), (0, 31)),
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, red_corner):
    stored = Image.new("RGB", (32, 16), BLUE)
    stored.paste(RED, (0, 0, 8, 8))  # one JPEG block: colours survive compression
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(stored, tmp_path / "photo.jpg", quality=95, exif=exif.tobytes())
    out = load_image(path)
    assert out.size == size
    r, g, b = out.getpixel(red_corner)
    assert r > 200 and b < 60, (r, g, b)
    r, g, b = out.getpixel((size[0] - 1 - red_corner[0], size[1] - 1 - red_corner[1]))  # the opposite corner
    assert b > 200 and r < 60, (r, g, b)
    assert check_images([_record(path)]).good  # and the pre-check takes it


def test_jpeg_modes_and_first_gif_frame(tmp_path):
    cmyk = load_image(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert np.abs(np.asarray(cmyk, dtype=int) - RED).max() < 8
    grey = load_image(save(Image.new("L", (16, 16), 90), tmp_path / "g.jpg"))
    assert grey.mode == "RGB" and np.abs(np.asarray(grey, dtype=int) - 90).max() <= 2
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, BLUE)]
    gif = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((0, 0)) == RED


def test_large_image_refused_from_its_header(tmp_path):
    """A 1-pixel PNG whose header says 9000 x 9000: refused before any decoding."""
    raw = bytearray(_png_bytes((1, 1)))
    raw[16:24] = struct.pack(">II", 9000, 9000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path = tmp_path / "huge.png"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="9000 x 9000 = 81,000,000 pixels, over the limit of 50,000,000"):
        load_image(path, max_pixels=50_000_000)
    assert image_problem(path, max_pixels=50_000_000).startswith("too large")
    with pytest.raises(DataError, match="truncated"):  # allowed: then its missing pixel data is the problem
        load_image(path)


def test_result_does_not_depend_on_the_file(tmp_path):
    path = save(row("RGB", [(1, 2, 3)]), tmp_path / "a.png")
    out = load_image(path)
    path.unlink()
    assert out.getpixel((0, 0)) == (1, 2, 3)


def test_to_rgb_is_a_new_image():
    source = Image.new("RGB", (2, 2), RED)
    out = to_rgb(source)
    out.putpixel((0, 0), BLUE)
    assert source.getpixel((0, 0)) == RED
    assert to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == WHITE


# ----------------------------------------------------------------------------- the quick check


def _png_bytes(size=(16, 12), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 120).save(out, "PNG")
    return out.getvalue()


def _jpeg_bytes(size=(64, 48), **options) -> bytes:
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    out = io.BytesIO()
    Image.fromarray(np.stack([xx * 4 % 256, yy * 5 % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(
        out, "JPEG", quality=90, **options)
    return out.getvalue()


def _other(fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(out, fmt, **options)
    return out.getvalue()


def _bad_crc_text_chunk() -> bytes:
    """A PNG with a tEXt chunk whose CRC is wrong."""
    raw = _png_bytes()
    chunk = b"tEXt" + b"Comment\x00hello"
    bad = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk) ^ 1)
    return raw[:33] + bad + raw[33:]


# Files where a quick check could disagree with a full decode (file name, content).
TRICKY: dict[str, Callable[[], bytes]] = {
    "good.jpg": _jpeg_bytes,
    "progressive.jpg": lambda: _jpeg_bytes(progressive=True),
    "progressive_cut.jpg": lambda: _jpeg_bytes(progressive=True)[:-100],
    "half.jpg": lambda: _jpeg_bytes()[: len(_jpeg_bytes()) * 2 // 3],
    "no_end_marker.jpg": lambda: _jpeg_bytes()[:-2],
    "zero_padded.jpg": lambda: _jpeg_bytes() + b"\0" * 100,
    "trailer.jpg": lambda: _jpeg_bytes() + b"ftypmp42" * 100,
    "cut_trailer.jpg": lambda: _jpeg_bytes()[:-50] + b"ftypmp42" * 100,
    "exif_thumbnail_cut.jpg": lambda: _jpeg_bytes(exif=Image.Exif().tobytes())[:400],
    "good.png": _png_bytes,
    "no_iend.png": lambda: _png_bytes()[:-12],
    "half.png": lambda: _png_bytes((64, 64), "L")[:-40],
    "crc_text.png": _bad_crc_text_chunk,
    "good16.png": lambda: _png_bytes(mode="I;16"),
    "good.gif": lambda: _other("GIF"),
    "cut.gif": lambda: _other("GIF")[:-30],
    "good.bmp": lambda: _other("BMP"),
    "cut.bmp": lambda: _other("BMP")[:-100],
    "good.webp": lambda: _other("WEBP"),
    "cut.webp": lambda: _other("WEBP")[:-20],
    "good.tif": lambda: _other("TIFF"),
    "cut.tif": lambda: _other("TIFF")[:-100],
}


def _load_problem(path: Path) -> str | None:
    try:
        load_image(path)
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    return None


@pytest.mark.parametrize("quick", [False, True], ids=["decode", "quick"])
@pytest.mark.parametrize("name", TRICKY)
def test_check_agrees_with_load_image(tmp_path, name, quick):
    path = tmp_path / name
    path.write_bytes(TRICKY[name]())
    expected = _load_problem(path)
    assert image_problem(path, quick=quick) == expected
    assert (expected is None) == (name.startswith("good") or name in ("progressive.jpg", "zero_padded.jpg",
                                                                      "trailer.jpg", "cut_trailer.jpg", "no_iend.png"))


def test_quick_check_is_blind_to_a_corrupt_huffman_table(tmp_path):
    """The price of quick=True: a complete JPEG with a broken table passes, and fails to load later."""
    blob = _jpeg_bytes()
    k = blob.index(b"\xff\xc4") + 5  # inside the first Huffman table
    path = tmp_path / "table.jpg"
    path.write_bytes(blob[:k] + bytes([blob[k] ^ 0xFF]) + blob[k + 1:])
    assert _load_problem(path) == "corrupt JPEG data (broken data stream when reading image file)"
    assert image_problem(path) == _load_problem(path)
    assert image_problem(path, quick=True) is None
    assert check_images([_record(path)], policy="skip").bad and check_images([_record(path)], quick=True).good


def _record(path: Path, image_id: int = 0) -> ImageRecord:
    return ImageRecord(image_id, path, (Caption("a dog"),), "train")


@pytest.fixture
def mixed(tmp_path) -> list[ImageRecord]:
    """Six records: good, truncated, good, not an image, good, empty."""
    files = {"0.jpg": _jpeg_bytes(), "1.jpg": _jpeg_bytes()[:-2], "2.png": _png_bytes(), "3.jpg": b"<html></html>",
             "4.png": _png_bytes(), "5.png": b""}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [_record(tmp_path / name, i) for i, name in enumerate(files)]


def test_policy_skip_keeps_the_good_and_lists_the_bad(mixed):
    found = check_images(mixed, policy="skip")
    assert found.good == [mixed[0], mixed[2], mixed[4]]
    assert [(p.name, reason.split(" ")[0]) for p, reason in found.bad] == [("1.jpg", "truncated"), ("3.jpg", "not"),
                                                                          ("5.png", "empty")]
    assert found.summary() == (f"3 of 6 images are unreadable: {mixed[1].path} (truncated JPEG file (it ends before "
                               f"the image data does)); {mixed[3].path} (not an image: an HTML page (a failed "
                               f"download?)); {mixed[5].path} (empty file (0 bytes))")
    assert found.summary(shown=1).endswith("; and 2 more")


def test_policy_error_names_the_first_and_counts_the_rest(mixed):
    with pytest.raises(DataError) as info:
        check_images(mixed)
    assert str(info.value) == (f"{mixed[1].path}: truncated JPEG file (it ends before the image data does) "
                               f"(and 2 other unreadable images of 6; data.bad_images=skip leaves them out and "
                               f"logs them)")


def test_all_good(mixed):
    good = [mixed[0], mixed[2]]
    found = check_images(good, policy="error", workers=2, progress=True)
    assert found == ImageCheck(good=good, bad=[])
    assert found.summary() == "all 2 images are readable"


def test_threads_give_the_same_answer_in_the_same_order(mixed):
    assert check_images(mixed * 3, policy="skip", workers=2) == check_images(mixed * 3, policy="skip")


def test_a_shared_file_is_checked_once(mixed, monkeypatch):
    calls = []
    real = images_module.image_problem
    monkeypatch.setattr(images_module, "image_problem", lambda path, **kw: calls.append(path) or real(path, **kw))
    twice = [mixed[1], mixed[0], _record(mixed[1].path, 9)]
    found = check_images(twice, policy="skip")
    assert sorted(calls) == sorted([mixed[0].path, mixed[1].path])
    assert [p for p, _ in found.bad] == [mixed[1].path, mixed[1].path] and found.good == [mixed[0]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        check_images([], policy="ignore")
    with pytest.raises(ValueError, match="workers"):
        check_images([], workers=-1)


def test_dataloader_workers_report_one_clean_line(mixed):
    """A worker's DataError reaches the main process wrapped in the worker's traceback; the
    command line keeps the last line: the file and the reason."""
    loader = DataLoader(ImageDataset(mixed[:2], image_transform(16)), batch_size=1, num_workers=2,
                        collate_fn=collate_images)
    batches = iter(loader)
    try:
        with pytest.raises(DataError) as info:
            list(batches)
    finally:  # now: left to the garbage collector, the shutdown waits 5 s per worker
        batches._shutdown_workers()
    assert "Original Traceback" in str(info.value)  # the worker's wrapping
    assert _one_line(info.value) == f"{mixed[1].path}: truncated JPEG file (it ends before the image data does)"


def test_a_mode_without_rgb_conversion_is_a_data_error(tmp_path, monkeypatch):
    def no_conversion(image):
        raise ValueError(f"conversion from {image.mode} to RGB not supported")

    monkeypatch.setattr(images_module, "to_rgb", no_conversion)
    path = save(row("L", [0]), tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a.png: unsupported colour mode 'L' \(no RGB conversion\)"):
        load_image(path)
    assert image_problem(path) == "unsupported colour mode 'L' (no RGB conversion)"
