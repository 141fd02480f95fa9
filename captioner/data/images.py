"""Reading images: any file PIL can decode becomes an RGB image, anything else a DataError.

:func:`load_image` is what the datasets and ``Captioner.caption`` call for every image;
:func:`check_images` runs the same decoding over a split before training starts, so an
unreadable file stops the run (``data.bad_images: error``) or is left out and counted
(``skip``) before the first epoch, not hours into it.

Policies (one place, so training, evaluation and captioning see the same pixels):

- Colour: every mode becomes RGB. Alpha (``RGBA``, ``LA``, ``PA``, and palette or
  ``tRNS`` transparency) is composited on white: transparent pixels usually hold black or
  junk RGB, and white is what a person sees the image on (a browser page). ``CMYK`` uses
  PIL's plain conversion (embedded ICC profiles are ignored, for every mode).
- Depth: 16-bit integers (``I;16*``) are scaled by 255 / 65535, keeping the exposure.
  32-bit integers (``I``) in 0..65535 are taken as 16-bit data (what ``I`` images
  usually hold) and scaled the same; floats (``F``) in [0, 1] are scaled by 255.
  Other ranges are stretched min..max to 0..255; NaN becomes 0. (PIL's own ``convert``
  clips instead: a 16-bit photo comes out nearly white.)
- Orientation: the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a
  phone photo taken upright is upright. An unreadable EXIF block is ignored (the pixels
  are fine; only the orientation is unknown).
- Size: images of more than ``max_pixels`` pixels (default :data:`MAX_PIXELS`, PIL's own
  limit of 89,478,485, about 9,459 x 9,459; 270 MB once decoded to RGB, per DataLoader
  worker) are refused from the header, before any decoding: a decompression bomb costs
  nothing. PIL's own guard still runs when the header is read (a warning above
  ``PIL.Image.MAX_IMAGE_PIXELS``, an error above twice that, which becomes the same
  DataError), so ``max_pixels`` lowers the limit freely but raises it only up to twice PIL's
  process-wide ``Image.MAX_IMAGE_PIXELS``.
- Bad files: missing, empty, not an image (an HTML error page saved as ``.jpg``),
  truncated, corrupt, too large or in a mode with no RGB conversion: a DataError whose
  one-line message names the file and the reason. A JPEG whose entropy-coded data is
  damaged but complete decodes with grey or garbled blocks, as in every viewer; it is not
  refused (nothing short of looking at it tells it apart).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.data.records import ImageRecord
from captioner.errors import DataError
from captioner.progress import tqdm

MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS
POLICIES = ("error", "skip")

# What PIL raises on malformed files: mostly OSError, but a damaged header reaches parsing
# code that raises any of these. Caught only around PIL's calls, never around our own code.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  ZeroDivisionError, struct.error, zlib.error)
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIGNATURES = {  # magic bytes of image formats: a file that starts so but fails is damaged, not foreign
    b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF",
    b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
}
_FOREIGN = {  # magic bytes of files that are often saved with an image's name
    b"%PDF": "a PDF document", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive",
    b"{": "JSON text", b"[": "JSON text",
}


class _Unreadable(Exception):
    """Internal: why one image cannot be used (the reason, without the path)."""


# ----------------------------------------------------------------------------- helpers


def _format_of(head: bytes) -> str | None:
    """The image format the first bytes of a file announce, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if head.startswith(magic)), None)


def _sniff(head: bytes) -> str:
    """What a file PIL cannot identify looks like, from its first bytes."""
    fmt = _format_of(head)
    if fmt:
        return f"truncated or corrupt {fmt} header"
    text = head.lstrip()
    if text[:1] == b"<" and (b"html" in text[:256].lower() or b"<!doctype" in text[:256].lower()):
        return "not an image: an HTML page (a failed download?)"
    if text[:5] == b"<?xml" or text[:4] == b"<svg":
        return "not an image: XML or SVG text (vector images are not supported)"
    for magic, what in _FOREIGN.items():
        if text.startswith(magic):
            return f"not an image: {what}"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an image: unknown binary format"
    return "not an image: a text file"


def _why(err: BaseException, path: Path, fmt: str | None) -> str:
    """A short reason for an error from PIL, with PIL's words where they help."""
    if isinstance(err, Image.DecompressionBombError):  # PIL's guard, above twice Image.MAX_IMAGE_PIXELS
        return f"too large: {' '.join(str(err).split())[:160]}"
    if isinstance(err, PermissionError):
        return f"cannot read the file ({err.strerror or err})"
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if isinstance(err, UnidentifiedImageError):
        return _sniff(head)
    detail = " ".join(str(err).split())[:120] or type(err).__name__
    name = fmt or _format_of(head) or "image"
    if "truncated" in detail.lower() or isinstance(err, EOFError):
        return f"truncated {name} file (it ends before the image data does)"
    return f"corrupt {name} data ({detail})"


def _to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel ``I;16*``, ``I`` or ``F`` image -> ``L``, scaled as the module docstring says."""
    a = np.asarray(image).astype(np.float64)  # (H, W)
    if image.mode.startswith("I;16"):
        out = a * (255 / 65535)
    else:
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
        if image.mode == "F" and 0 <= lo and hi <= 1:
            out = a * 255
        elif image.mode != "F" and 0 <= lo and hi <= 65535:
            out = a * (255 / 65535)
        elif hi > lo:
            out = (a - lo) * (255 / (hi - lo))
        else:
            out = np.zeros_like(a)
        out = np.where(finite, out, np.where(np.isposinf(a), 255.0, 0.0))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> a new RGB image: alpha and transparency composited on white,
    16-bit, 32-bit integer and float images scaled to 8 bits (see the module docstring).

    Raises:
        ValueError: PIL has no RGB conversion for the mode (``LAB``, say).
    """
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit(image).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # a copy when already RGB


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, if there is a readable one."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) not in (2, 3, 4, 5, 6, 7, 8):
            return image
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:  # a damaged EXIF block: keep the pixels, lose the orientation
        return image


def _check_file(path: Path) -> None:
    """The reasons that need no decoder: missing, unreadable, a folder, empty."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Unreadable("image file does not exist") from None
    except OSError as err:
        raise _Unreadable(f"cannot read the file ({err.strerror or err})") from None
    if path.is_dir():
        raise _Unreadable("is a folder, not an image file")
    if size == 0:
        raise _Unreadable("empty file (0 bytes)")


def _decode(path: Path, *, max_pixels: int, reduced: bool = False) -> Image.Image:
    """``path`` -> RGB, or :class:`_Unreadable` with the reason.

    ``reduced`` decodes JPEGs at 1/8 scale (libjpeg still reads every byte of the
    entropy-coded data, so truncation is found at a fraction of the cost).
    """
    _check_file(path)
    try:
        im = Image.open(path)  # reads the header only
    except (Image.DecompressionBombError, UnidentifiedImageError, *_DECODE_ERRORS) as err:
        raise _Unreadable(_why(err, path, None)) from None
    with im:
        try:
            if im.width * im.height > max_pixels:
                raise _Unreadable(_too_large(im.width, im.height, max_pixels))
            if reduced and im.format in ("JPEG", "MPO"):
                im.draft(None, (1, 1))  # 1/8 scale
            im.load()
        except _DECODE_ERRORS as err:
            raise _Unreadable(_why(err, path, im.format)) from None
        oriented = _orient(im)
        try:
            return to_rgb(oriented)
        except ValueError:
            raise _Unreadable(f"unsupported colour mode {oriented.mode!r} (no RGB conversion)") from None


def _complete(path: Path, *, max_pixels: int) -> bool:
    """The quick check: True when the header reads, the size is allowed and the file
    provably holds all its data: a JPEG ends with its end-of-image marker (which cannot
    occur inside entropy-coded data; zero padding after it is allowed), a PNG passes
    ``verify`` (every chunk's CRC, up to ``IEND``). False: no proof, a decode must decide
    (other formats, damaged files, a JPEG with data after its end such as a motion
    photo's video)."""
    _check_file(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise _Unreadable(_too_large(im.width, im.height, max_pixels))
            if im.format in ("JPEG", "MPO"):
                with path.open("rb") as f:
                    f.seek(max(0, path.stat().st_size - 4096))
                    return f.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")
            if im.format == "PNG":
                im.verify()
                return True
    except (Image.DecompressionBombError, UnidentifiedImageError, *_DECODE_ERRORS):
        pass  # the decode finds the reason
    return False


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (f"too large: {width} x {height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            f"(a guard against decompression bombs)")


# ----------------------------------------------------------------------------- output types


@dataclass
class ImageCheck:
    """What :func:`check_images` found.

    Attributes:
        good: the records whose image decodes, in their original order.
        bad: ``(path, reason)`` of every record whose image does not, in record order.
    """

    good: list[ImageRecord]
    bad: list[tuple[Path, str]]

    @property
    def total(self) -> int:
        return len(self.good) + len(self.bad)

    def summary(self, shown: int = 3) -> str:
        """One line: how many images are unreadable, and the first ``shown`` with their reasons."""
        if not self.bad:
            return f"all {self.total} images are readable"
        listed = "; ".join(f"{path} ({reason})" for path, reason in self.bad[:shown])
        more = f"; and {len(self.bad) - shown} more" if len(self.bad) > shown else ""
        return f"{len(self.bad)} of {self.total} images are unreadable: {listed}{more}"


# ----------------------------------------------------------------------------- API


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB, whatever its mode, orientation or damage.

    Args:
        path: the image file; its content decides the format, not its name.
        max_pixels: refuse images with more pixels than this (read from the header).

    Returns:
        A new RGB image, EXIF-oriented, alpha composited on white, 8 bits per channel.

    Raises:
        DataError: ``"<path>: <reason>"``, one line, when the file is missing, empty, not
            an image, truncated, corrupt, too large or in a mode with no RGB conversion.
    """
    try:
        return _decode(Path(path), max_pixels=max_pixels)
    except _Unreadable as err:
        raise DataError(f"{path}: {err}") from None


def image_problem(path: str | Path, *, max_pixels: int = MAX_PIXELS, quick: bool = False) -> str | None:
    """Why :func:`load_image` would refuse ``path`` (None: it would not), at a fraction of its cost.

    The image is decoded as :func:`load_image` decodes it, JPEGs at 1/8 scale (libjpeg
    still reads all their data, so truncation and broken tables are found), so the answer
    is the same. ``PIL.Image.verify`` alone is not enough: it does not notice a truncated
    JPEG, and it refuses PNGs without an ``IEND`` chunk that decode fine.

    Args:
        path: the image file.
        max_pixels: as in :func:`load_image`.
        quick: about 10x faster on JPEG and PNG: a JPEG that ends with its end-of-image
            marker, and a PNG whose chunks all pass their CRC (``verify``), pass from the
            header and a few bytes, without decoding. The price: damage inside a complete
            file (a corrupt Huffman table, say) is not seen, and :func:`load_image` refuses
            that file later.
    """
    path = Path(path)
    try:
        if not (quick and _complete(path, max_pixels=max_pixels)):
            _decode(path, max_pixels=max_pixels, reduced=True)
    except _Unreadable as err:
        return str(err)
    return None


def check_images(
    records: Sequence[ImageRecord],
    *,
    policy: str = "error",
    workers: int = 0,
    progress: bool = False,
    max_pixels: int = MAX_PIXELS,
    quick: bool = False,
) -> ImageCheck:
    """Decode every record's image once, before training, and sort out the unreadable ones.

    Each image goes through :func:`image_problem`, so the check passes exactly the images
    :func:`load_image` loads; JPEGs are decoded at 1/8 scale. A path shared by several
    records is checked once.

    Args:
        records: the split's records.
        policy: ``error``: raise on the first unreadable image (after checking all of
            them, so the message can count them); ``skip``: return the readable ones and
            leave logging ``ImageCheck.summary()`` to the caller.
        workers: threads decoding in parallel (PIL releases the GIL while it decodes);
            0 decodes in the calling thread.
        progress: show a progress bar.
        max_pixels: as in :func:`load_image`.
        quick: skip decoding JPEGs and PNGs that are provably complete (see
            :func:`image_problem`): about 10x faster, blind to damage inside a complete file.

    Raises:
        DataError: with ``policy="error"``, one line naming the first unreadable file, its
            reason, how many others are unreadable, and that ``data.bad_images=skip`` skips them.
        ValueError: an unknown ``policy`` or a negative ``workers``.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}")
    paths = list(dict.fromkeys(r.path for r in records))  # unique, in order

    def check(path: Path) -> str | None:
        return image_problem(path, max_pixels=max_pixels, quick=quick)

    bar = {"total": len(paths), "desc": "check images", "disable": not progress, "leave": False}
    if workers:
        with ThreadPoolExecutor(workers) as pool:
            problems = dict(zip(paths, tqdm(pool.map(check, paths), **bar)))
    else:
        problems = {path: check(path) for path in tqdm(paths, **bar)}

    found = ImageCheck(good=[r for r in records if problems[r.path] is None],
                       bad=[(r.path, problems[r.path]) for r in records if problems[r.path] is not None])
    if found.bad and policy == "error":
        path, reason = found.bad[0]
        others = len(found.bad) - 1
        count = (f"and {others} other unreadable image{'s' if others > 1 else ''} of {found.total}" if others
                 else f"the only unreadable image of {found.total}")
        raise DataError(f"{path}: {reason} ({count}; data.bad_images=skip leaves "
                        f"{'them' if others else 'it'} out and logs {'them' if others else 'it'})")
    return found


__all__ = ["MAX_PIXELS", "ImageCheck", "check_images", "image_problem", "load_image", "to_rgb"]
