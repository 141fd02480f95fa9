"""Shared test fixtures: tiny real images and annotation files written into ``tmp_path``."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from captioner.errors import DataError


@pytest.fixture(scope="session")
def tool() -> Callable[[str], object]:
    """``tool("relation_probe")``: the script ``tools/relation_probe.py`` loaded as a module."""

    def load(name: str) -> object:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, size=(4, 3))`` writes a small real image; the suffix picks PNG or JPEG."""

    def make(path: Path, size: tuple[int, int] = (4, 3)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (200, 40, 40)).save(path)
        return path

    return make


@pytest.fixture
def write_json() -> Callable[[Path, object], Path]:
    """``write_json(path, data)`` writes ``data`` as indented JSON and returns the path."""

    def write(path: Path, data: object) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def data_error() -> Callable[..., str]:
    """``data_error(fn, *fragments)`` calls ``fn``, expects a one-line DataError containing every fragment."""

    def check(fn: Callable[[], object], *fragments: object) -> str:
        with pytest.raises(DataError) as info:
            fn()
        message = str(info.value)
        assert "\n" not in message, message
        for fragment in fragments:
            assert str(fragment) in message, f"{fragment!r} not in {message!r}"
        return message

    return check


# ----------------------------------------------------------------------------- tiny runs

TINY_OVERRIDES = [
    "data.format=shapes", "data.shapes.n=40", "data.shapes.image_size=64",
    "vocab.min_count=1", "vocab.max_len=12",
    "model.encoder.backbone=resnet18", "model.encoder.weights=null", "model.encoder.layer=layer1",
    "model.encoder.image_size=64", "model.encoder.positional=true",
    "model.attention.dim=16", "model.decoder.embed_dim=16", "model.decoder.hidden_dim=32",
    "model.decoder.dropout=0.0",
    "train.epochs=2", "train.batch_size=16", "train.lr=3e-3", "train.progress=false",
    "train.val_images=8", "train.log_every=5", "decode.max_len=8",
]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A 40-image shapes set (64 px), generated once per test session."""
    from captioner.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, n=40, seed=0, image_size=64)
    return root


@pytest.fixture
def tiny_config(shapes_root, tmp_path):
    """``tiny_config(*overrides)``: a Config for a tiny model on the tiny shapes set, run folder in tmp_path."""
    from captioner.config import load_config

    def make(*overrides: str):
        return load_config(None, [*TINY_OVERRIDES, f"data.root={shapes_root}", f"train.out_dir={tmp_path}/run",
                                  "name=tiny", *overrides])

    return make
