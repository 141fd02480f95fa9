"""Tests for the procedural shapes set: layout, determinism, truth of captions, grounding."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.shapes import COLOURS, SHAPES, SIZES, ensure_shapes, generate_shapes
from captioner.errors import ConfigError, DataError
from captioner.vocab import tokenize

N, SEED, SIZE = 40, 3, 128
SPLITS = ("train", "val", "test")
ATTRIBUTE_WORDS = set(SHAPES) | set(COLOURS) | set(SIZES)
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path) -> list[dict]:
    """One dict per image: split, image entry, its captions and its instances by id."""
    images = []
    for split in SPLITS:
        caps = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
        inst = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        assert caps["images"] == inst["images"]
        by_image: dict[int, dict] = defaultdict(lambda: {"captions": [], "objects": {}})
        for c in caps["annotations"]:
            by_image[c["image_id"]]["captions"].append(c)
        for o in inst["annotations"]:
            by_image[o["image_id"]]["objects"][o["id"]] = o
        images += [{"split": split, "image": im, **by_image[im["id"]]} for im in caps["images"]]
    return images


def _centre(obj: dict) -> tuple[float, float]:
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    root = tmp_path_factory.mktemp("shapes")
    summary = generate_shapes(root, n=N, seed=SEED, image_size=SIZE)
    return root, summary, _load(root)


# ----------------------------------------------------------------------------- layout

def test_summary_manifest_and_split_folders(shapes_set):
    root, summary, images = shapes_set
    assert summary["n"] == N and summary["splits"] == {"train": 32, "val": 4, "test": 4}
    assert summary["seconds"] >= 0
    manifest = json.loads((root / "shapes.json").read_text())
    assert manifest == {"n": N, "seed": SEED, "image_size": SIZE, "splits": summary["splits"], "version": 1}
    for split in SPLITS:
        names = sorted(im["image"]["file_name"] for im in images if im["split"] == split)
        assert names == sorted(p.name for p in (root / split).iterdir())
    # train first, then val, then test
    assert [im["split"] for im in images] == ["train"] * 32 + ["val"] * 4 + ["test"] * 4
    assert [im["image"]["id"] for im in images] == list(range(1, N + 1))


def test_ids_unique_across_splits(shapes_set):
    _, _, images = shapes_set
    caption_ids = [c["id"] for im in images for c in im["captions"]]
    object_ids = [oid for im in images for oid in im["objects"]]
    assert len(set(caption_ids)) == len(caption_ids) == 5 * N
    assert len(set(object_ids)) == len(object_ids)


@pytest.mark.parametrize("n, expected", [(3, (1, 1, 1)), (2, (2, 0, 0)), (10, (8, 1, 1)), (25, (21, 2, 2))])
def test_split_counts(tmp_path, n, expected):
    summary = generate_shapes(tmp_path, n=n, seed=0, image_size=64)
    assert tuple(summary["splits"][s] for s in SPLITS) == expected
    assert sum(1 for _ in tmp_path.glob("*/*.png")) == n


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 10, "val_fraction": 0.6, "test_fraction": 0.5},
                                    {"n": 10, "image_size": 16}, {"n": 10, "seed": -1}])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        generate_shapes(tmp_path, **kwargs)


# ----------------------------------------------------------------------------- determinism

def test_same_seed_identical_in_process_and_in_pool(tmp_path, shapes_set):
    root, _, _ = shapes_set
    generate_shapes(tmp_path / "a", n=N, seed=SEED, image_size=SIZE, workers=0)
    generate_shapes(tmp_path / "b", n=N, seed=SEED, image_size=SIZE, workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b and a == _files(root)
    assert len(a) == N + 6 + 1


def test_other_seed_differs(tmp_path, shapes_set):
    root, _, _ = shapes_set
    generate_shapes(tmp_path, n=N, seed=SEED + 1, image_size=SIZE)
    for name in ("train/000001.png", "annotations/captions_train.json", "annotations/instances_train.json"):
        assert (tmp_path / name).read_bytes() != (root / name).read_bytes()


# ----------------------------------------------------------------------------- content

def test_images_and_objects(shapes_set):
    root, _, images = shapes_set
    for im in images:
        assert len(im["captions"]) == 5
        assert 1 <= len(im["objects"]) <= 4
        entry = im["image"]
        with Image.open(root / im["split"] / entry["file_name"]) as picture:
            assert picture.mode == "RGB" and picture.size == (SIZE, SIZE) == (entry["width"], entry["height"])
        keys = {(o["attributes"]["size"], o["attributes"]["colour"], o["attributes"]["shape"])
                for o in im["objects"].values()}
        assert len(keys) == len(im["objects"])  # every mention can be unambiguous
        boxes = [o["bbox"] for o in im["objects"].values()]
        for obj in im["objects"].values():
            x, y, w, h = obj["bbox"]
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            # a small object still covers at least 2x2 cells of a 16x16 grid
            assert w >= 2 * SIZE / 16 and abs(w / SIZE - SIZES[obj["attributes"]["size"]]) < 0.03
            assert obj["category_id"] == SHAPES.index(obj["attributes"]["shape"]) + 1
            assert obj["iscrowd"] == 0 and 0 < obj["area"] <= w * h + 0.01
            xs, ys = obj["segmentation"][0][0::2], obj["segmentation"][0][1::2]
            assert len(xs) == {"circle": 24, "triangle": 3}.get(obj["attributes"]["shape"], 4)
            assert min(xs) >= x - 0.01 and max(xs) <= x + w + 0.01 and min(ys) >= y - 0.01 and max(ys) <= y + h + 0.01
        for i, a in enumerate(boxes):  # no two boxes overlap
            for b in boxes[i + 1:]:
                assert a[0] + a[2] < b[0] or b[0] + b[2] < a[0] or a[1] + a[3] < b[1] or b[1] + b[3] < a[1]


def test_centre_pixel_has_object_colour(shapes_set):
    root, _, images = shapes_set
    palette = {name: np.array(rgb, float) for name, rgb in COLOURS.items()}
    checked = 0
    for im in images:
        pixels = np.asarray(Image.open(root / im["split"] / im["image"]["file_name"]), float)
        for obj in im["objects"].values():
            cx, cy = (int(v) for v in _centre(obj))
            patch = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            nearest = min(palette, key=lambda name: np.abs(palette[name] - patch).sum())
            assert nearest == obj["attributes"]["colour"]
            assert np.abs(patch - palette[nearest]).max() < 40
            checked += 1
    assert checked >= N


def test_backgrounds_are_textured_and_muted(shapes_set):
    root, _, images = shapes_set
    for im in images[:10]:
        pixels = np.asarray(Image.open(root / im["split"] / im["image"]["file_name"]), float)
        mask = np.ones(pixels.shape[:2], bool)
        for obj in im["objects"].values():
            x, y, w, h = (int(v) for v in obj["bbox"])
            mask[max(y - 2, 0):y + h + 3, max(x - 2, 0):x + w + 3] = False
        background = pixels[mask]  # (P, 3) pixels away from objects
        assert background.std(0).mean() > 3  # not a flat colour
        assert np.abs(background - background.mean(1, keepdims=True)).mean() < 25  # greyish


def test_captions_are_short_tokenizable_and_use_a_small_vocabulary(shapes_set):
    _, _, images = shapes_set
    vocabulary = set()
    with_colour_and_shape = 0
    for im in images:
        for c in im["captions"]:
            words = tokenize(c["caption"])
            assert 3 <= len(words) <= 20
            vocabulary.update(words)
            named = {tuple(words[i] for i, o in c["grounding"] if o == oid) for oid in im["objects"]}
            with_colour_and_shape += any(set(w) & set(COLOURS) and set(w) & set(SHAPES) for w in named)
        assert len({c["caption"] for c in im["captions"]}) >= 4  # varied
    assert len(vocabulary) < 80
    assert with_colour_and_shape > 0.7 * 5 * N


def test_grounding_points_at_the_named_object(shapes_set):
    _, _, images = shapes_set
    for im in images:
        for c in im["captions"]:
            words = tokenize(c["caption"])
            grounded = {i for i, _ in c["grounding"]}
            for i, oid in c["grounding"]:
                attributes = im["objects"][oid]["attributes"]  # KeyError: not this image's object
                assert words[i] in (attributes["size"], attributes["colour"], attributes["shape"])
            # every attribute word is grounded; nothing else is
            assert grounded == {i for i, w in enumerate(words) if w in ATTRIBUTE_WORDS}
            # each mention names its shape: every grounded object has its shape noun grounded
            for oid in {o for _, o in c["grounding"]}:
                shape = im["objects"][oid]["attributes"]["shape"]
                assert any(words[i] == shape for i, o in c["grounding"] if o == oid)


def test_every_mention_picks_out_one_object(shapes_set):
    _, _, images = shapes_set
    for im in images:
        for c in im["captions"]:
            words = tokenize(c["caption"])
            named = defaultdict(set)
            for i, oid in c["grounding"]:
                named[oid].add(words[i])
            for oid, said in named.items():
                fits = [o for o in im["objects"].values() if said <= set(o["attributes"].values())]
                assert [o["id"] for o in fits] == [oid], c["caption"]


def _nearest_object(grounding: dict[int, int], index: int, *, before: bool) -> int | None:
    positions = sorted((i for i in grounding if i < index), reverse=True) if before else \
        sorted(i for i in grounding if i > index)
    return grounding[positions[0]] if positions else None


def test_spatial_and_count_claims_hold(shapes_set):
    _, _, images = shapes_set
    claims = defaultdict(int)
    third = SIZE / 3
    for im in images:
        objects = im["objects"]
        for c in im["captions"]:
            words = tokenize(c["caption"])
            grounding = {i: oid for i, oid in c["grounding"]}
            relation_words = set()
            for i, w in enumerate(words):
                if w in ("left", "right") and words[i - 2:i] == ["to", "the"] and words[i + 1:i + 2] == ["of"]:
                    relation = w
                elif w in ("above", "over", "below", "under", "beside") or words[i:i + 2] == ["next", "to"]:
                    relation = {"over": "above", "under": "below", "beside": "next", "next": "next"}.get(w, w)
                else:
                    continue
                relation_words.update(range(i - 2, i + 2) if w in ("left", "right") else [i])
                a = objects[_nearest_object(grounding, i, before=True)]
                b = objects[_nearest_object(grounding, i, before=False)]
                (ax, ay), (bx, by) = _centre(a), _centre(b)
                dx, dy = ax - bx, ay - by
                need = max(a["bbox"][2], b["bbox"][2]) / 3
                if relation in ("left", "right", "next"):
                    assert abs(dx) > abs(dy) and abs(dx) > need, c["caption"]
                    assert relation == "next" or (dx < 0) == (relation == "left"), c["caption"]
                else:
                    assert abs(dy) > abs(dx) and abs(dy) > need and (dy < 0) == (relation == "above"), c["caption"]
                claims["relation"] += 1
            where = [i for i, w in enumerate(words) if i not in relation_words
                     and w in ("top", "bottom", "left", "right", "middle", "centre")]
            if where:
                oid = _nearest_object(grounding, where[0], before=True)
                cx, cy = _centre(objects[oid if oid is not None else _nearest_object(grounding, where[0], before=False)])
                for w in (words[i] for i in where):
                    assert {"top": cy < third, "bottom": cy > 2 * third, "left": cx < third,
                            "right": cx > 2 * third}.get(w, abs(cx - SIZE / 2) < SIZE / 6 > abs(cy - SIZE / 2)), c["caption"]
                claims["position"] += 1
            for i, w in enumerate(words[:-1]):
                if w in NUMBERS and words[i + 1] == "shapes":
                    assert NUMBERS[w] == len(objects), c["caption"]
                    claims["count"] += 1
            if "single" in words:
                assert len(objects) == 1
    # the checks above must have had something to check
    assert claims["relation"] > 20 and claims["position"] > 20 and claims["count"] > 5, dict(claims)


# ----------------------------------------------------------------------------- ensure_shapes

def test_ensure_generates_then_reuses(tmp_path):
    out = tmp_path / "shapes"
    assert ensure_shapes(str(out), n=20, seed=1, image_size=64) == out
    stamps = {p: p.stat().st_mtime_ns for p in (out / "shapes.json", out / "train" / "000001.png",
                                                  out / "annotations" / "captions_val.json")}
    os.utime(out / "shapes.json", ns=(1, 1))  # an older stamp that a rewrite would change
    stamps[out / "shapes.json"] = 1
    assert ensure_shapes(out, n=20, seed=1, image_size=64) == out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("change, named", [({"n": 21}, "n=20"), ({"seed": 2}, "seed=1"),
                                           ({"image_size": 96}, "image_size=64")])
def test_ensure_refuses_a_set_with_other_parameters(tmp_path, change, named):
    ensure_shapes(tmp_path, n=20, seed=1, image_size=64)
    with pytest.raises(DataError) as error:
        ensure_shapes(tmp_path, **{"n": 20, "seed": 1, "image_size": 64, **change})
    assert str(tmp_path) in str(error.value) and named in str(error.value)
    assert json.loads((tmp_path / "shapes.json").read_text())["n"] == 20  # untouched


@pytest.mark.parametrize("user_file", ["notes.txt", "train/cat.jpg", "annotations/captions_train2014.json"])
def test_ensure_refuses_a_folder_of_other_files(tmp_path, user_file):
    (tmp_path / user_file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / user_file).write_text("mine")
    with pytest.raises(DataError) as error:
        ensure_shapes(tmp_path, n=20)
    assert str(tmp_path) in str(error.value) and Path(user_file).name in str(error.value)
    assert (tmp_path / user_file).read_text() == "mine"
    assert not (tmp_path / "shapes.json").exists()


def test_ensure_refuses_an_unreadable_manifest(tmp_path):
    (tmp_path / "shapes.json").write_text("{not json")
    with pytest.raises(DataError, match="shapes.json"):
        ensure_shapes(tmp_path, n=20)


def test_a_failed_generation_does_not_look_finished(tmp_path, monkeypatch):
    generate_shapes(tmp_path, n=20, seed=1, image_size=64)

    def crash(job):
        raise RuntimeError("killed")

    monkeypatch.setattr("captioner.data.shapes._make_image", crash)
    with pytest.raises(RuntimeError):
        generate_shapes(tmp_path, n=20, seed=2, image_size=64)
    assert not (tmp_path / "shapes.json").exists()
    monkeypatch.undo()
    ensure_shapes(tmp_path, n=20, seed=2, image_size=64)  # redone, not refused as a seed=1 set
    assert json.loads((tmp_path / "shapes.json").read_text())["seed"] == 2


def test_ensure_redoes_an_interrupted_generation(tmp_path):
    generate_shapes(tmp_path, n=20, seed=1, image_size=64)
    complete = _files(tmp_path)
    (tmp_path / "shapes.json").unlink()  # as if killed before the manifest was written
    (tmp_path / "annotations" / "captions_test.json").unlink()
    (tmp_path / "train" / "000003.png").write_bytes(b"half a png")
    ensure_shapes(tmp_path, n=20, seed=1, image_size=64)
    assert _files(tmp_path) == complete
