"""A corpus of bad inputs, each run through a public entry point, each with its documented outcome.

Every row of ``CASES`` is (case, how to make it, entry point, expected outcome). Outcomes:

- ``Raises(Error, *fragments)``: a :class:`~captioner.errors.CaptionerError` of that type
  whose one-line message holds every fragment.
- ``Exits(*fragments)``: ``captioner ...`` exits with code 2 and prints one line,
  ``error: ...``, with every fragment and no traceback.
- ``Skips(kept, *fragments)``: the bad part is left out and counted: ``kept`` items remain,
  and the fragments are in the count (``ImageCheck.summary()`` or the loader's warning).
- ``Loads(check, what)``: accepted; ``check(result)`` asserts the values.

The loaders' own tests (tests/data/test_*.py, test_config.py, test_checkpoint.py) go
through every entry error of each layout; this corpus takes one case per kind of mistake
through the entry points a user reaches (``load_split``, ``load_config``, the command line).

A case marked ``xfail`` is a gap: its outcome is what the code should do, and the reason
says what it does instead. The mark is strict, so fixing the code fails the test until the
mark goes.

``python tests/test_bad_inputs.py`` prints the table as markdown, for the docs.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import itertools
import json
import logging
import os
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from captioner.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from captioner.cli import main as cli_main
from captioner.config import DataConfig, SplitConfig, config_to_dict, load_config
from captioner.data import load_split
from captioner.data.dataset import CaptionDataset
from captioner.data.images import check_images, load_image
from captioner.data.records import Caption, ImageRecord
from captioner.errors import CaptionerError, CheckpointError, ConfigError, DataError
from captioner.model import Captioner
from captioner.vocab import Vocabulary

# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Report:
    """What an entry point that can skip returns: what it kept, and the text that counts the rest."""

    kept: list
    text: str


@dataclass(frozen=True)
class Exit:
    code: int
    stderr: str


class Raises:
    def __init__(self, error: type[CaptionerError], *fragments: str) -> None:
        self.error, self.fragments = error, fragments

    def verify(self, run: Callable[[], Any]) -> None:
        with pytest.raises(CaptionerError) as info:
            run()
        message = str(info.value)
        assert isinstance(info.value, self.error), f"{type(info.value).__name__}, not {self.error.__name__}: {message}"
        assert "\n" not in message, message
        for fragment in self.fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"

    def describe(self) -> str:
        return f"{self.error.__name__}: " + " ... ".join(f"`{f}`" for f in self.fragments)


class Exits:
    """Exit 2 with one line; or, with ``code=1`` (an inference command whose images were
    partly unreadable), each bad image's line and a closing count, ``lines`` in all."""

    def __init__(self, *fragments: str, code: int = 2, lines: int = 1) -> None:
        self.fragments, self.code, self.lines = fragments, code, lines

    def verify(self, run: Callable[[], Any]) -> None:
        result = run()
        assert isinstance(result, Exit), result
        assert result.code == self.code, result
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == self.lines, result.stderr
        assert "Traceback" not in result.stderr
        for fragment in self.fragments:
            assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"

    def describe(self) -> str:
        lines = "one line" if self.lines == 1 else f"{self.lines} lines"
        return f"exit {self.code}, {lines} `error: ...` with " + " ... ".join(f"`{f}`" for f in self.fragments)


class Skips:
    def __init__(self, kept: int, *fragments: str) -> None:
        self.kept, self.fragments = kept, fragments

    def verify(self, run: Callable[[], Any]) -> None:
        result = run()
        assert isinstance(result, Report), result
        assert len(result.kept) == self.kept, (len(result.kept), result.text)
        assert "\n" not in result.text.strip(), result.text
        for fragment in self.fragments:
            assert fragment in result.text, f"{fragment!r} not in {result.text!r}"

    def describe(self) -> str:
        return f"skipped and counted ({self.kept} kept): " + " ... ".join(f"`{f}`" for f in self.fragments)


class Loads:
    def __init__(self, check: Callable[[Any], bool], what: str) -> None:
        self.check, self.what = check, what

    def verify(self, run: Callable[[], Any]) -> None:
        result = run()
        assert self.check(result), f"{self.what}: {result!r}"

    def describe(self) -> str:
        return f"accepted: {self.what}"


@dataclass(frozen=True)
class Entry:
    """A public entry point, named as the table shows it."""

    name: str
    call: Callable[[Any], Any]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Any]  # writes the input under a temporary folder; returns the entry point's argument
    entry: Entry
    expect: Raises | Exits | Skips | Loads
    xfail: str = ""  # why the code does not yet meet the expected outcome (strict: fixing it fails the test)
    fails_with: type[BaseException] | tuple[type[BaseException], ...] = AssertionError  # how it falls short today


# ----------------------------------------------------------------------------- entry points


def _records(paths: list[Path]) -> list[ImageRecord]:
    return [ImageRecord(i, p, (Caption("a red square"),), "train") for i, p in enumerate(paths)]


def _check_skip(paths: list[Path]) -> Report:
    found = check_images(_records(paths), policy="skip", workers=2)
    return Report(found.good, found.summary())


def _load_split(cfg: DataConfig) -> Report:
    """load_split's records, and its warnings on the ``captioner.data`` logger."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("captioner.data")
    logger.addHandler(handler)
    try:
        return Report(load_split(cfg, "train"), stream.getvalue())
    finally:
        logger.removeHandler(handler)


def _cli(argv: list[str]) -> Exit:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main([str(a) for a in argv])
    return Exit(code, err.getvalue())


def _cli_with_workers(argv: list[str]) -> Exit:
    """``_cli``, then stop the DataLoader workers the run left behind. A worker's error keeps
    its iterator alive in a reference cycle (torch's ``ExceptionWrapper.reraise``); the
    garbage collector would shut it down later, in some other test, waiting 5 s per worker.
    The command line does not wait: its process exits."""
    try:
        return _cli(argv)
    finally:
        for obj in gc.get_objects():
            if type(obj) is _MultiProcessingDataLoaderIter:  # type(), not isinstance: no lazy attributes touched
                obj._shutdown_workers()


LOAD_IMAGE = Entry("load_image", load_image)
LOAD_IMAGE_100 = Entry("load_image(max_pixels=100)", functools.partial(load_image, max_pixels=100))
CHECK_ERROR = Entry("check_images(policy=error)", lambda paths: check_images(_records(paths), policy="error"))
CHECK_SKIP = Entry("check_images(policy=skip)", _check_skip)
LOAD_SPLIT = Entry("load_split", _load_split)
LOAD_CONFIG = Entry("load_config", load_config)
OVERRIDE = Entry("load_config(None, [override])", lambda override: load_config(None, [override]))
LOAD_CHECKPOINT = Entry("load_checkpoint", load_checkpoint)
FROM_CHECKPOINT = Entry("Captioner.from_checkpoint", Captioner.from_checkpoint)
CLI = Entry("captioner.cli.main", _cli)
CLI_WORKERS = Entry("captioner.cli.main", _cli_with_workers)

# ----------------------------------------------------------------------------- images


def _jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    pixels = np.stack([xx * 4 % 256, yy * 5 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _png(size: tuple[int, int] = (16, 12)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header says ``width`` x ``height`` (CRC fixed): a decompression bomb's header."""
    raw = bytearray(_png((1, 1)))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def _flip(data: bytes, at: float, n: int = 32) -> bytes:
    k = int(len(data) * at)
    return data[:k] + bytes(b ^ 0x5A for b in data[k:k + n]) + data[k + n:]


def a_file(name: str, content: Callable[[], bytes]) -> Callable[[Path], Path]:
    """Writes ``content()`` to ``name``; -> its path."""

    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content())
        return path

    return make


def folder_named(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        return tmp / name

    return make


def among_good(*bad: tuple[str, Callable[[], bytes]]) -> Callable[[Path], list[Path]]:
    """Three good images (JPEG, PNG, JPEG) with the ``bad`` ones between them."""

    def make(tmp: Path) -> list[Path]:
        good = [a_file(f"good{k}.{'png' if k % 2 else 'jpg'}", _png if k % 2 else _jpeg)(tmp) for k in range(3)]
        bad_paths = [a_file(name, content)(tmp) for name, content in bad]
        return [p for pair in itertools.zip_longest(good, bad_paths) for p in pair if p is not None]

    return make


def _rgb(size: tuple[int, int]) -> Callable[[Image.Image], bool]:
    return lambda im: im.mode == "RGB" and im.size == size


# ----------------------------------------------------------------------------- annotations


def _coco_data(uncaptioned: bool) -> dict:
    """Images 1-3 with captions, and image 4 without when ``uncaptioned`` (its file exists)."""
    return {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2, 3, 4)[: 4 if uncaptioned else 3]],
        "annotations": [{"id": 10 + i, "image_id": i, "caption": f"a red square number {i}"} for i in (1, 2, 3)],
    }


def _write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(_png())


def coco(mutate: Callable[[dict], None] | None = None, *, text: Callable[[str], bytes] | None = None,
         uncaptioned: bool = True):
    """A COCO-layout data set (train and val) with ``mutate`` applied to train's captions json,
    or its text replaced by ``text(json_text)``; -> the DataConfig."""

    def make(tmp: Path) -> DataConfig:
        for split in ("train", "val"):
            data = _coco_data(uncaptioned)
            if split == "train" and mutate:
                mutate(data)
            _write_images(tmp / split, [f"{i}.png" for i in (1, 2, 3, 4)])
            path = tmp / "annotations" / f"captions_{split}.json"
            path.parent.mkdir(exist_ok=True)
            body = json.dumps(data, ensure_ascii=False)
            path.write_bytes(text(body) if split == "train" and text else body.encode("utf-8"))
        return DataConfig(format="coco", root=str(tmp), train=SplitConfig("annotations/captions_train.json", "train"),
                          val=SplitConfig("annotations/captions_val.json", "val"))

    return make


def set_caption(index: int, caption: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        data["annotations"][index]["caption"] = caption

    return mutate


def folder_layout(data: object, files: tuple[str, ...] = ("a.png", "b.png")):
    """A folder-layout set: ``data`` as the captions json (a string is written as is)."""

    def make(tmp: Path) -> DataConfig:
        _write_images(tmp / "images", list(files))
        text = data if isinstance(data, str) else json.dumps(data)
        (tmp / "captions.json").write_text(text, encoding="utf-8")
        return DataConfig(format="folder", root=str(tmp), train=SplitConfig("captions.json", "images"))

    return make


def karpathy(images: list[dict]):
    """A Karpathy split file with these image entries, the images beside it."""

    def make(tmp: Path) -> DataConfig:
        _write_images(tmp, [im["filename"] for im in images])
        (tmp / "dataset.json").write_text(json.dumps({"dataset": "coco", "images": images}), encoding="utf-8")
        return DataConfig(format="karpathy", root=str(tmp), annotations="dataset.json", train=SplitConfig("", ""))

    return make


def flickr(tokens: bytes, split_names: str = "a.jpg\nb.jpg\n"):
    """Flickr8k: ``tokens`` as the token file, ``split_names`` as the train list."""

    def make(tmp: Path) -> DataConfig:
        _write_images(tmp / "images", ["a.jpg", "b.jpg", "c.jpg"])
        (tmp / "Flickr8k.token.txt").write_bytes(tokens)
        (tmp / "Flickr_8k.trainImages.txt").write_text(split_names, encoding="utf-8")
        return DataConfig(format="flickr8k", root=str(tmp), annotations="Flickr8k.token.txt",
                          train=SplitConfig("Flickr_8k.trainImages.txt", "images"))

    return make


FLICKR_TOKENS = "a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog .\nb.jpg#0\tTwo cats .\n"


def _kimage(name: str, sentences: list[dict]) -> dict:
    return {"filename": name, "imgid": 0, "split": "train", "sentences": sentences}


def _encoded_len(report: Report, max_len: int = 20) -> int:
    records = report.kept
    vocab = Vocabulary.build((c.text for r in records for c in r.captions), min_count=1)
    return max(len(tokens) for _, tokens in CaptionDataset(records, vocab, max_len=max_len).items)


# ----------------------------------------------------------------------------- configs


def yaml_file(text: str | bytes, name: str = "bad.yaml") -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    return make


def literal(value: Any) -> Callable[[Path], Any]:
    return lambda tmp: value


CONFIG = Path(__file__).parents[1] / "configs" / "shapes_soft.yaml"
TINY = [  # a model small enough to build in a fraction of a second
    "model.encoder.backbone=resnet18", "model.encoder.weights=null", "model.encoder.layer=layer1",
    "model.encoder.image_size=32", "model.attention.dim=4", "model.decoder.embed_dim=4",
    "model.decoder.hidden_dim=8", "vocab.min_count=1", "train.epochs=1", "train.batch_size=4",
    "train.progress=false", "train.device=cpu", "train.val_images=2",
]


def train(*overrides: str, data: Callable[[Path], DataConfig] | None = None, resume: Callable[[Path], Path] | None = None):
    """``captioner train`` of a tiny model on the COCO-layout set ``data`` (default: all good)."""

    def make(tmp: Path) -> list[str]:
        cfg = (data or coco(uncaptioned=False))(tmp / "data")  # no loader warnings on stderr
        args = ["train", CONFIG, *TINY, "data.format=coco", f"data.root={cfg.root}",
                f"data.train.captions={cfg.train.captions}", f"data.train.images={cfg.train.images}",
                f"data.val.captions={cfg.val.captions}", f"data.val.images={cfg.val.images}",
                f"train.out_dir={tmp}/run", *overrides]
        if resume:
            args.append(f"train.resume={resume(tmp)}")
        return [*args, "--quiet"]

    return make


def with_bad_image(name: str, content: Callable[[], bytes]) -> Callable[[Path], DataConfig]:
    """The default COCO-layout set with train image ``name`` replaced by ``content``."""

    def make(tmp: Path) -> DataConfig:
        cfg = coco(uncaptioned=False)(tmp)
        (tmp / "train" / name).write_bytes(content())
        return cfg

    return make


# ----------------------------------------------------------------------------- checkpoints


@functools.cache
def _tiny_model(words: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """(config dict, vocab dict, state dict) of a tiny model over ``words``, built once."""
    cfg = load_config(None, TINY)
    model = Captioner.from_config(cfg, Vocabulary(list(words)))
    return config_to_dict(cfg), model.vocab.to_dict(), model.state_dict()


def checkpoint(edit: Callable[[bytes], bytes] | None = None, *, words: tuple[str, ...] = ("a", "red", "square"),
               weights_for: tuple[str, ...] | None = None, config_extra: dict | None = None,
               **replace: Any) -> Callable[[Path], Path]:
    """A tiny model's checkpoint; ``weights_for`` saves the weights of a model over other
    words; ``config_extra`` adds keys to its config; ``replace`` replaces top-level entries;
    ``edit`` rewrites the file's bytes."""

    def make(tmp: Path) -> Path:
        config, vocab, _ = _tiny_model(words)
        state = _tiny_model(weights_for or words)[2]
        path = tmp / "model.pt"
        save_checkpoint(path, {"config": {**config, **(config_extra or {})}, "vocab": vocab, "model": state,
                               **replace})
        if edit:
            path.write_bytes(edit(path.read_bytes()))
        return path

    return make


def torch_file(data: Callable[[], Any]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        torch.save(data(), tmp / "model.pt")
        return tmp / "model.pt"

    return make


class _RunsCode:
    def __reduce__(self):  # unpickling would create the folder "pwned" (the test checks it does not)
        return (os.mkdir, ("pwned",))


def _zipped_member_flipped(blob: bytes) -> bytes:
    """Flip bytes inside the stored tensor data (``archive/data/0``), leaving the zip structure intact."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        offset = next(i.header_offset for i in z.infolist() if "/data/" in i.filename)
    name_len, extra_len = struct.unpack("<HH", blob[offset + 26:offset + 30])  # from the local file header
    start = offset + 30 + name_len + extra_len
    return blob[:start + 8] + bytes(b ^ 0xFF for b in blob[start + 8:start + 24]) + blob[start + 24:]


def caption(image_make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        return ["caption", str(image_make(tmp)), "--checkpoint", str(checkpoint()(tmp))]

    return make


# ----------------------------------------------------------------------------- the corpus

TRUNCATED = "truncated JPEG file (it ends before the image data does)"

CASES = [
    # --- images: load_image
    Case("zero-byte .jpg", a_file("empty.jpg", lambda: b""), LOAD_IMAGE, Raises(DataError, "empty.jpg: empty file")),
    Case("missing image file", lambda tmp: tmp / "gone.jpg", LOAD_IMAGE,
         Raises(DataError, "gone.jpg: image file does not exist")),
    Case("folder named like an image", folder_named("dir.jpg"), LOAD_IMAGE, Raises(DataError, "dir.jpg: is a folder")),
    Case("HTML error page saved as .jpg", a_file("page.jpg", lambda: b"<!DOCTYPE html>\n<html><body>404</body></html>"),
         LOAD_IMAGE, Raises(DataError, "page.jpg: not an image: an HTML page")),
    Case("text file named .png", a_file("note.png", lambda: b"just some notes\n"), LOAD_IMAGE,
         Raises(DataError, "note.png: not an image: a text file")),
    Case("PDF named .jpg", a_file("doc.jpg", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"), LOAD_IMAGE,
         Raises(DataError, "not an image: a PDF document")),
    Case("JPEG cut in half", a_file("half.jpg", lambda: _jpeg()[: len(_jpeg()) // 2]), LOAD_IMAGE,
         Raises(DataError, "half.jpg: " + TRUNCATED)),
    Case("JPEG missing its last 2 bytes (end marker)", a_file("cut.jpg", lambda: _jpeg()[:-2]), LOAD_IMAGE,
         Raises(DataError, "cut.jpg: " + TRUNCATED)),
    Case("JPEG cut inside its header", a_file("head.jpg", lambda: _jpeg()[:200]), LOAD_IMAGE,
         Raises(DataError, "head.jpg: truncated")),
    Case("PNG cut in half", a_file("half.png", lambda: _png((64, 64))[:60]), LOAD_IMAGE,
         Raises(DataError, "half.png: truncated")),
    Case("PNG with corrupt pixel data", a_file("flip.png", lambda: _flip(_png((64, 64)), 0.6)), LOAD_IMAGE,
         Raises(DataError, "flip.png: corrupt PNG data")),
    Case("PNG header claiming 30000 x 30000 (decompression bomb)", a_file("bomb.png", lambda: _png_claiming(30000, 30000)),
         LOAD_IMAGE, Raises(DataError, "bomb.png: too large")),
    Case("image over max_pixels", a_file("big.png", lambda: _png((20, 10))), LOAD_IMAGE_100,
         Raises(DataError, "big.png: too large: 20 x 10 = 200 pixels, over the limit of 100")),
    Case("PNG content named .jpg", a_file("really_png.jpg", lambda: _png((5, 4))), LOAD_IMAGE,
         Loads(_rgb((5, 4)), "the content decides the format")),
    Case("PNG without its IEND chunk", a_file("noend.png", lambda: _png((5, 4))[:-12]), LOAD_IMAGE,
         Loads(_rgb((5, 4)), "all pixel data is there")),
    Case("JPEG with data after its end marker (motion photo)", a_file("motion.jpg", lambda: _jpeg() + b"\0\0ftypmp42" * 50),
         LOAD_IMAGE, Loads(_rgb((64, 48)), "decoded; the trailer is ignored")),
    # --- images: the pre-check before training
    Case("2 bad among 5 images, policy error", among_good(("a.jpg", lambda: b""), ("b.jpg", lambda: _jpeg()[:300])),
         CHECK_ERROR, Raises(DataError, "a.jpg: empty file", "and 1 other unreadable image of 5",
                             "data.bad_images=skip")),
    Case("1 bad among 4 images, policy error", among_good(("t.png", lambda: _png((64, 64))[:60])), CHECK_ERROR,
         Raises(DataError, "t.png: truncated", "the only unreadable image of 4")),
    Case("2 bad among 5 images, policy skip", among_good(("a.jpg", lambda: b"<html>"), ("b.jpg", lambda: _jpeg()[:-2])),
         CHECK_SKIP, Skips(3, "2 of 5 images are unreadable", "a.jpg (not an image", "b.jpg (truncated")),
    # --- annotations, through load_split
    Case("COCO json cut in half", coco(text=lambda s: s[: len(s) // 2].encode()), LOAD_SPLIT,
         Raises(DataError, "captions_train.json: malformed JSON at line 1, column")),
    Case("COCO json empty file", coco(text=lambda s: b""), LOAD_SPLIT,
         Raises(DataError, "captions_train.json: malformed JSON at line 1, column 1")),
    Case("COCO json in Latin-1, not UTF-8", coco(set_caption(0, "un café"), text=lambda s: s.encode("latin-1")),
         LOAD_SPLIT, Raises(DataError, "captions_train.json: not UTF-8 text")),
    Case("COCO json with a UTF-8 byte-order mark", coco(text=lambda s: b"\xef\xbb\xbf" + s.encode()), LOAD_SPLIT,
         Loads(lambda r: len(r.kept) == 3, "the mark is dropped")),
    Case("annotation without 'caption'", coco(lambda d: d["annotations"][1].pop("caption")), LOAD_SPLIT,
         Raises(DataError, "annotations[1] (id 12): missing key 'caption'")),
    Case("Karpathy sentence without 'raw' or 'tokens'", karpathy([_kimage("a.jpg", sentences=[{"sentid": 0}])]),
         LOAD_SPLIT, Raises(DataError, "dataset.json: images[0] ('a.jpg') sentence 0: missing key 'raw'")),
    Case("empty caption", folder_layout({"a.png": ["a dog", ""]}), LOAD_SPLIT,
         Skips(1, "captions.json: skipped 1 caption(s) with no words")),
    Case("whitespace caption (tab, no-break and zero-width spaces)", coco(set_caption(2, "\t\u00a0\u200b ")), LOAD_SPLIT,
         Skips(2, "captions_train.json: skipped 1 caption(s) with no words; skipped 2 image(s)")),
    Case("caption of emoji only", coco(set_caption(0, "🐶🐱")), LOAD_SPLIT,
         Skips(2, "skipped 1 caption(s) with no words")),
    Case("non-ASCII captions (French, Chinese, Arabic)",
         coco(lambda d: [a.update(caption=c) for a, c in zip(d["annotations"], ["Un café très chaud", "一只猫", "كلب يجري"])]),
         LOAD_SPLIT, Loads(lambda r: [c.text for x in r.kept for c in x.captions] == ["Un café très chaud", "一只猫", "كلب يجري"],
                           "kept as written")),
    Case("caption of 5,000 words", coco(set_caption(0, "a dog " * 2500)), LOAD_SPLIT,
         Loads(lambda r: len(r.kept[0].captions[0].text.split()) == 5000 and _encoded_len(r) == 21,
               "kept whole; encoded as <start> + vocab.max_len words (cut: no <end>)")),
    Case("image with no captions", coco(), LOAD_SPLIT, Skips(3, "captions_train.json: skipped 1 image(s) of split 'train'")),
    Case("Flickr8k split file names an image with no captions", flickr(FLICKR_TOKENS.encode(), "a.jpg\nb.jpg\nc.jpg\n"),
         LOAD_SPLIT, Skips(2, "Flickr_8k.trainImages.txt: skipped 1 image(s)")),
    Case("caption for an image id not in 'images'", coco(lambda d: d["annotations"][0].update(image_id=99)), LOAD_SPLIT,
         Raises(DataError, "annotations[0] (id 11): image_id 99 is not in 'images'")),
    Case("captions for image files that do not exist", folder_layout({"a.png": ["a dog"], "gone.png": ["a cat"]}),
         LOAD_SPLIT, Raises(DataError, "1 of 2 image files of split 'train' do not exist", "gone.png")),
    Case("duplicated COCO image id", coco(lambda d: d["images"].append({"id": 2, "file_name": "2.png"})), LOAD_SPLIT,
         Raises(DataError, "duplicate image id 2")),
    Case("duplicated file name in a folder captions mapping", folder_layout('{"a.png": ["a dog"], "a.png": ["a cat"]}'),
         LOAD_SPLIT, Raises(DataError, "captions.json: duplicate key 'a.png'")),
    Case("duplicated Flickr8k caption id", flickr((FLICKR_TOKENS + "a.jpg#1\tAgain .\n").encode()), LOAD_SPLIT,
         Raises(DataError, "Flickr8k.token.txt: line 4: duplicate caption id 'a.jpg#1'")),
    Case("Flickr8k token line without a tab", flickr(b"a.jpg#0 A dog runs .\n"), LOAD_SPLIT,
         Raises(DataError, "Flickr8k.token.txt: line 1: expected '<file name>#<index><TAB><caption>'")),
    Case("COCO instances file given as the captions file",
         coco(lambda d: d.update(annotations=[{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 3}])),
         LOAD_SPLIT, Raises(DataError, "expected a COCO captions file", "found a COCO instances file")),
    # --- configs
    Case("unknown key", yaml_file("train:\n  epochz: 3\n"), LOAD_CONFIG,
         Raises(ConfigError, "unknown config key 'train.epochz'", "did you mean 'train.epochs'")),
    Case("wrong type", yaml_file("train:\n  batch_size: lots\n"), LOAD_CONFIG,
         Raises(ConfigError, "train.batch_size must be int; got 'lots'")),
    Case("negative size", literal("model.decoder.hidden_dim=-8"), OVERRIDE,
         Raises(ConfigError, "model.decoder.hidden_dim must be >= 1; got -8")),
    Case("image size 0", literal("model.encoder.image_size=0"), OVERRIDE,
         Raises(ConfigError, "model.encoder.image_size must be >= 16; got 0")),
    Case("beam size 0", literal("decode.beam_size=0"), OVERRIDE, Raises(ConfigError, "decode.beam_size must be >= 1; got 0")),
    Case("dropout 1.5", literal("model.decoder.dropout=1.5"), OVERRIDE, Raises(ConfigError, "model.decoder.dropout", "[0, 1)")),
    Case("unknown bad_images policy", literal("data.bad_images=ignore"), OVERRIDE,
         Raises(ConfigError, "data.bad_images must be one of error, skip; got 'ignore'")),
    Case("Karpathy format without an annotation file", literal("data.format=karpathy"), OVERRIDE,
         Raises(ConfigError, "data.annotations must name the annotation file for format karpathy")),
    Case("malformed YAML", yaml_file("train:\n  lr: [1, 2\n"), LOAD_CONFIG,
         Raises(ConfigError, "bad.yaml: not valid YAML (line")),
    Case("config not UTF-8", yaml_file(b"name: caf\xe9\n"), LOAD_CONFIG, Raises(ConfigError, "bad.yaml: not a UTF-8 text file")),
    Case("config is a list", yaml_file("- 1\n- 2\n"), LOAD_CONFIG, Raises(ConfigError, "a config must be a mapping")),
    Case("config file that does not exist", lambda tmp: tmp / "nope.yaml", LOAD_CONFIG,
         Raises(ConfigError, "config file not found", "nope.yaml")),
    Case("_base_ file that does not exist", yaml_file("_base_: missing_base.yaml\n"), LOAD_CONFIG,
         Raises(ConfigError, "config file not found", "missing_base.yaml")),
    Case("unknown attention name", train("model.attention.name=sofft"), CLI,
         Exits("unknown attention", "'sofft'", "valid names: hard, local, mean, none, soft")),
    Case("unknown backbone name", train("model.encoder.backbone=resnet9"), CLI, Exits("unknown backbone 'resnet9'", "resnet18")),
    Case("data.root that does not exist", train("data.root=/nonexistent/coco"), CLI,
         Exits("/nonexistent/coco/annotations/captions_train.json: annotation file does not exist")),
    Case("train.resume checkpoint that does not exist", train(resume=lambda tmp: tmp / "gone.pt"), CLI,
         Exits("checkpoint not found", "gone.pt")),
    # --- checkpoints
    Case("checkpoint that does not exist", lambda tmp: tmp / "none.pt", LOAD_CHECKPOINT,
         Raises(CheckpointError, "checkpoint not found", "none.pt")),
    Case("zero-byte checkpoint", checkpoint(lambda b: b""), LOAD_CHECKPOINT,
         Raises(CheckpointError, "model.pt: not a readable checkpoint (truncated or corrupted?)")),
    Case("checkpoint cut in half", checkpoint(lambda b: b[: len(b) // 2]), LOAD_CHECKPOINT,
         Raises(CheckpointError, "model.pt: not a readable checkpoint (truncated or corrupted?)")),
    Case("checkpoint missing its last 10 bytes", checkpoint(lambda b: b[:-10]), LOAD_CHECKPOINT,
         Raises(CheckpointError, "model.pt: not a readable checkpoint (truncated or corrupted?)")),
    Case("checkpoint with a corrupted zip header", checkpoint(lambda b: _flip(b, 0.0, 16)), LOAD_CHECKPOINT,
         Raises(CheckpointError, "model.pt: not a readable checkpoint", "corrupted")),
    Case("checkpoint with corrupted tensor bytes", checkpoint(_zipped_member_flipped), LOAD_CHECKPOINT,
         Raises(CheckpointError, "model.pt: not a readable checkpoint", "CRC")),
    Case("short text file as a checkpoint", a_file("model.pt", lambda: b"hello"), LOAD_CHECKPOINT,
         Raises(CheckpointError, "model.pt: not a readable checkpoint")),
    Case("checkpoint holding pickled code", torch_file(lambda: {"format_version": 1, "config": {}, "vocab": {},
                                                                 "model": {}, "x": _RunsCode()}),
         LOAD_CHECKPOINT, Raises(CheckpointError, "model.pt: refused: it is not plain tensors and data")),
    Case("checkpoint of a newer format version", checkpoint(format_version=FORMAT_VERSION + 1), LOAD_CHECKPOINT,
         Raises(CheckpointError, f"checkpoint format version {FORMAT_VERSION + 1} is newer", "upgrade captioner")),
    Case("plain state dict, not a captioner checkpoint", torch_file(lambda: {"weight": torch.ones(2)}), LOAD_CHECKPOINT,
         Raises(CheckpointError, "not a captioner checkpoint (expected keys format_version, config, vocab, model)")),
    Case("weights of a model with another vocabulary", checkpoint(weights_for=("a", "red", "square", "circle")),
         FROM_CHECKPOINT, Raises(CheckpointError, "the saved weights do not fit this model (another vocabulary")),
    Case("checkpoint config with an unknown key", checkpoint(config_extra={"bogus": 1}), FROM_CHECKPOINT,
         Raises(CheckpointError, "its config does not fit this captioner version", "unknown config key 'bogus'")),
    Case("resume from a checkpoint with another vocabulary",
         train(resume=checkpoint(words=("zebra",))), CLI,
         Exits("the checkpoint's vocabulary", "differs from the one built from this training data")),
    Case("caption with a junk checkpoint", lambda tmp: ["caption", str(a_file("x.png", _png)(tmp)), "--checkpoint",
                                                        str(a_file("junk.pt", lambda: b"not a checkpoint at all")(tmp))],
         CLI, Exits("junk.pt")),
    # --- end to end: bad images reach the command line as one line
    Case("caption a truncated JPEG", caption(a_file("cut.jpg", lambda: _jpeg()[:-2])), CLI,
         Exits("cut.jpg: " + TRUNCATED, "1 of 1 images could not be read", code=1, lines=2)),
    Case("caption an HTML page saved as .jpg", caption(a_file("page.jpg", lambda: b"<html><body>gone</body></html>")),
         CLI, Exits("page.jpg: not an image: an HTML page", "1 of 1 images", code=1, lines=2)),
    Case("train on a set with a truncated PNG, 2 DataLoader workers",
         train("data.num_workers=2", data=with_bad_image("2.png", lambda: _png((64, 64))[:60])), CLI_WORKERS,
         Exits("2.png: truncated")),
]


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail, raises=c.fails_with, strict=True)) if c.xfail else c
     for c in CASES],
    ids=[c.name for c in CASES],
)
def test_bad_input(case: Case, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    arg = case.make(tmp_path)
    case.expect.verify(lambda: case.entry.call(arg))
    assert not (tmp_path / "pwned").exists()  # no input ran code


def test_the_corpus_covers_every_kind_of_input():
    entries = {c.entry.name for c in CASES}
    assert len(CASES) >= 30
    assert {"load_image", "check_images(policy=error)", "check_images(policy=skip)", "load_split", "load_config",
            "load_checkpoint", "Captioner.from_checkpoint", "captioner.cli.main"} <= entries
    assert len({c.name for c in CASES}) == len(CASES)  # unique ids


def markdown_table() -> str:
    """The corpus as a markdown table (case, entry point, outcome)."""
    rows = ["| case | entry point | outcome |", "|---|---|---|"]
    for c in CASES:
        outcome = c.expect.describe() + (f" (**not yet**: {c.xfail})" if c.xfail else "")
        cells = (c.name, f"`{c.entry.name}`", outcome)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
