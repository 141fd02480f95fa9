"""The shapes set: a procedural captioning data set in COCO format.

Each image shows one to four filled shapes (circle, square, triangle, diamond; small or
large; six colours) on a muted textured background (stripes, blurred noise or a smooth
gradient, plus per-pixel noise). Every image gets five template captions whose spatial
claims ("to the left of", "above", "in the top left corner") are true for the drawn
positions, and every caption word that names an object (its size, colour and shape
word) is grounded as ``[word_index, object_id]``, pointing into the COCO instances file.
That grounding is the ground truth for attention correctness: does the model look at
the red circle while it says "red circle"?

Each image is drawn from its own generator seeded by ``(seed, image index)``, so a set
is byte-identical however many worker processes made it. S is the image side in pixels.

Layout (as the COCO download)::

    out_dir/{train,val,test}/000001.png ...        image ids are unique across splits
    out_dir/annotations/captions_{split}.json      COCO captions, plus "grounding"
    out_dir/annotations/instances_{split}.json     bbox, polygon, attributes per object
    out_dir/shapes.json                            the manifest, written last
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from captioner.errors import ConfigError, DataError

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = MappingProxyType({
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215),
    "yellow": (235, 205, 35), "purple": (145, 60, 185), "orange": (240, 135, 25),
})
SIZES = MappingProxyType({"small": 0.14, "large": 0.28})  # object side / image side
BACKGROUNDS = ("striped", "noisy", "smooth")
SPLITS = ("train", "val", "test")
VERSION = 1

_MAX_OBJECTS = 4
_CAPTIONS_PER_IMAGE = 5
_NUMBERS = ("one", "two", "three", "four")
_MIN_WORDS, _MAX_WORDS = 3, 20
_OWN_FILES = {"annotations": re.compile(r"(captions|instances)_(train|val|test)\.json"),
              **{split: re.compile(r"\d{6,}\.png") for split in SPLITS}}
_TEMP_FILE = re.compile(r"\..+\.tmp")

Pieces = list[tuple[str, int | None]]  # caption words (or "," ":") with the object each names


# ----------------------------------------------------------------------------- drawing

def _polygon(shape: str, x: float, y: float, side: float) -> list[tuple[float, float]]:
    """The outline of a shape filling the box (x, y, side, side); a circle is a 24-gon."""
    cx, cy, r = x + side / 2, y + side / 2, side / 2
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24))
                for k in range(24)]
    if shape == "square":
        return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]
    if shape == "triangle":  # apex up
        return [(cx, y), (x + side, y + side), (x, y + side)]
    return [(cx, y), (x + side, cy), (cx, y + side), (x, cy)]  # diamond


def _place_objects(rng: np.random.Generator, size: int, first_id: int) -> list[_Object]:
    """1-4 objects with distinct (colour, shape), inside the image, boxes a gap apart."""
    count = int(rng.integers(1, _MAX_OBJECTS + 1))
    colours = list(COLOURS)
    gap = max(2.0, 0.04 * size)
    objects: list[_Object] = []
    for k in rng.permutation(len(colours) * len(SHAPES))[:count]:
        size_name = "large" if rng.random() < 0.5 else "small"
        for _ in range(50):  # rejection sampling; an object that finds no room is left out
            side = round(SIZES[size_name] * size * rng.uniform(0.93, 1.07), 2)
            x, y = (round(float(v), 2) for v in rng.uniform(1.0, size - 1.0 - side, 2))
            if all(x + side + gap <= o.x or o.x + o.side + gap <= x
                   or y + side + gap <= o.y or o.y + o.side + gap <= y for o in objects):
                objects.append(_Object(first_id + len(objects), SHAPES[k % len(SHAPES)],
                                       colours[k // len(SHAPES)], size_name, x, y, side))
                break
    return objects


def _draw(rng: np.random.Generator, size: int, objects: list[_Object]) -> tuple[Image.Image, str]:
    """A muted textured background, the filled objects, then per-pixel noise over all."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) each, in [0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    if background == "striped":
        period, phase = rng.uniform(0.08, 0.2), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
        field, amplitude = np.tanh(2.5 * wave), rng.uniform(15, 25)
    elif background == "noisy":  # bicubic upsampling of coarse noise = blurred noise
        coarse = rng.standard_normal((int(rng.integers(4, 11)),) * 2).astype(np.float32)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        field, amplitude = field / max(float(np.abs(field).max()), 1e-6), rng.uniform(20, 35)
    else:  # smooth gradient
        field = 1.4 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
        amplitude = rng.uniform(20, 35)
    grey = rng.uniform(95, 165) + rng.uniform(-12, 12, 3)  # greyish, slightly tinted
    pixels = grey + amplitude * field[..., None]  # (S, S, 3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = tuple(int(c) for c in np.clip(np.add(COLOURS[obj.colour], rng.integers(-10, 11, 3)), 0, 255))
        if obj.shape == "circle":
            draw.ellipse([obj.x, obj.y, obj.x + obj.side, obj.y + obj.side], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, obj.x, obj.y, obj.side), fill=fill)
    noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(4, 9), (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), background


# ----------------------------------------------------------------------------- captions

def _region(obj: _Object, size: int) -> tuple[str | None, str | None]:
    """(row, column) of the object's centre: top/middle/bottom, left/middle/right, or None
    near a border between thirds, where a position word would not clearly hold."""
    def third(v: float, low: str, high: str) -> str | None:
        f = v / size
        return low if f < 0.3 else high if f > 0.7 else "middle" if 0.4 < f < 0.6 else None
    cx, cy = obj.centre
    return third(cy, "top", "bottom"), third(cx, "left", "right")


def _positions(row: str | None, col: str | None) -> list[list[str]]:
    """Phrases like "in the top left corner" that hold for the region (maybe none)."""
    if row in ("top", "bottom") and col in ("left", "right"):
        return [["in", "the", row, col, "corner"], ["at", "the", row, col]]
    if row == col == "middle":
        return [["in", "the", "middle"], ["in", "the", "centre"]]
    return ([["at", "the", row]] if row in ("top", "bottom") else []) + \
        ([["on", "the", col]] if col in ("left", "right") else [])


def _relation(a: _Object, b: _Object) -> str | None:
    """Where a is relative to b ("left", "right", "above", "below"), from the dominant axis
    of the centre difference; None unless that axis clearly dominates and the centres
    differ by more than a third of the larger object's side on it."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy, need = ax - bx, ay - by, max(a.side, b.side) / 3
    if abs(dx) > 1.2 * abs(dy) and abs(dx) > need:
        return "left" if dx < 0 else "right"
    if abs(dy) > 1.2 * abs(dx) and abs(dy) > need:
        return "above" if dy < 0 else "below"
    return None


_RELATION_WORDS = {"left": (["to", "the", "left", "of"], ["next", "to"], ["beside"]),
                   "right": (["to", "the", "right", "of"], ["next", "to"], ["beside"]),
                   "above": (["above"], ["over"]), "below": (["below"], ["under"])}


def _mention(obj: _Object, objects: list[_Object], rng: np.random.Generator, *,
             definite: bool = False) -> Pieces:
    """ "a small red circle": the shape always, colour and size at random, but always
    enough attributes to pick out this object alone (colour + shape is unique)."""
    use_size, use_colour = rng.random() < 0.4, rng.random() < 0.85
    same = [o for o in objects if o.shape == obj.shape and (not use_size or o.size == obj.size)]
    use_colour = use_colour or len(same) > 1
    words = [obj.size] * use_size + [obj.colour] * use_colour + [obj.shape]
    article = "the" if definite else "an" if words[0][0] in "aeiou" else "a"
    return [(article, None), *((w, obj.id) for w in words)]


def _plain(*words: str) -> Pieces:
    return [(w, None) for w in words]


def _t_single(objects: list[_Object], rng: np.random.Generator, size: int, bg: str) -> Pieces | None:
    obj = objects[int(rng.integers(len(objects)))]
    prefix = [(), ("there", "is"), ("a", "picture", "of"), ("an", "image", "with"),
              ("a", "drawing", "of")][int(rng.integers(5))]
    return _plain(*prefix) + _mention(obj, objects, rng)


def _t_position(objects: list[_Object], rng: np.random.Generator, size: int, bg: str) -> Pieces | None:
    placed = [(o, phrases) for o in objects if (phrases := _positions(*_region(o, size)))]
    if not placed:
        return None
    obj, phrases = placed[int(rng.integers(len(placed)))]
    where = _plain(*phrases[int(rng.integers(len(phrases)))])
    form = int(rng.integers(4))
    if form == 0:
        return _mention(obj, objects, rng) + where
    if form == 1:
        return _plain("there", "is") + _mention(obj, objects, rng) + where
    if form == 2:
        return _mention(obj, objects, rng, definite=True) + _plain("is") + where
    return where + _plain("there", "is") + _mention(obj, objects, rng)


def _t_relation(objects: list[_Object], rng: np.random.Generator, size: int, bg: str) -> Pieces | None:
    pairs = [(a, b, r) for a in objects for b in objects if a is not b and (r := _relation(a, b))]
    if not pairs:
        return None
    a, b, rel = pairs[int(rng.integers(len(pairs)))]
    options = _RELATION_WORDS[rel]
    words = _plain(*options[0 if rng.random() < 0.6 else int(rng.integers(1, len(options)))])
    form = int(rng.integers(3))
    first = _mention(a, objects, rng, definite=form == 2)
    head = _plain("there", "is") + first if form == 1 else first + _plain("is") if form == 2 else first
    return head + words + _mention(b, objects, rng)


def _t_list(objects: list[_Object], rng: np.random.Generator, size: int, bg: str) -> Pieces | None:
    if len(objects) < 2:
        return None
    order = [objects[i] for i in rng.permutation(len(objects))]
    count = _plain(_NUMBERS[len(objects) - 1], "shapes")
    form = int(rng.integers(3))
    if form == 2:
        return count + _plain("including") + _mention(order[0], objects, rng)
    listed: Pieces = []
    for i, obj in enumerate(order):
        listed += [(",", None)] if 0 < i < len(order) - 1 else _plain("and") if i else []
        listed += _mention(obj, objects, rng)
    return count + [(":", None)] + listed if form == 0 else listed


def _t_background(objects: list[_Object], rng: np.random.Generator, size: int, bg: str) -> Pieces | None:
    k = len(objects)
    if rng.random() < 0.5:
        what = _mention(objects[int(rng.integers(k))], objects, rng)
    else:
        what = _plain(_NUMBERS[k - 1], "shapes") if k > 1 else _plain("a", "single", "shape")
    if rng.random() < 0.7:
        return what + _plain("on", "a", bg, "background")
    return _plain("a", bg, "background", "with") + what


_TEMPLATES: tuple[tuple[Callable[..., Pieces | None], float], ...] = (
    (_t_single, 1.0), (_t_position, 1.5), (_t_relation, 2.5), (_t_list, 1.0), (_t_background, 0.7))


def _render_caption(pieces: Pieces) -> tuple[str, list[str], list[list[int]]]:
    """Text, its words (as ``tokenize`` splits it) and ``[word_index, object_id]`` pairs."""
    text, words, grounding = "", [], []
    for piece, object_id in pieces:
        if piece in (",", ":"):
            text += piece
            continue
        if object_id is not None:
            grounding.append([len(words), object_id])
        words.append(piece)
        text += (" " if text else "") + piece
    return text, words, grounding


def _captions(rng: np.random.Generator, objects: list[_Object], size: int,
              bg: str) -> list[tuple[str, list[list[int]]]]:
    """Five captions from random templates, distinct where the templates allow."""
    weights = np.array([w for _, w in _TEMPLATES])
    captions: list[tuple[str, list[list[int]]]] = []
    attempts = 0
    while len(captions) < _CAPTIONS_PER_IMAGE:
        attempts += 1
        template = _TEMPLATES[int(rng.choice(len(_TEMPLATES), p=weights / weights.sum()))][0]
        pieces = template(objects, rng, size, bg)
        if pieces is None:
            continue
        text, words, grounding = _render_caption(pieces)
        fresh = all(text != t for t, _ in captions) or attempts > 40
        if _MIN_WORDS <= len(words) <= _MAX_WORDS and fresh:
            captions.append((text, grounding))
    return captions


# ----------------------------------------------------------------------------- files

def _make_image(job: tuple[int, int, int, str, str]) -> dict:
    """Draw, save and caption image ``index``; runs in a worker process when workers > 0.

    Args:
        job: (index, seed, image_size, split, out_dir). All randomness comes from
            ``default_rng([seed, index])``; all ids are derived from ``index``.
    """
    index, seed, size, split, out_dir = job
    rng = np.random.default_rng([seed, index])
    image_id = index + 1
    objects = _place_objects(rng, size, first_id=index * _MAX_OBJECTS + 1)
    image, background = _draw(rng, size, objects)
    file_name = f"{image_id:06d}.png"
    image.save(Path(out_dir) / split / file_name)
    captions = [{"id": index * _CAPTIONS_PER_IMAGE + j + 1, "image_id": image_id, "caption": text,
                 "grounding": grounding}
                for j, (text, grounding) in enumerate(_captions(rng, objects, size, background))]
    instances = []
    for obj in objects:
        outline = [round(v, 2) for point in _polygon(obj.shape, obj.x, obj.y, obj.side) for v in point]
        xs, ys = outline[0::2], outline[1::2]
        area = abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2  # shoelace
        instances.append({"id": obj.id, "image_id": image_id, "category_id": SHAPES.index(obj.shape) + 1,
                          "bbox": [obj.x, obj.y, obj.side, obj.side], "area": round(area, 2),
                          "iscrowd": 0, "segmentation": [outline],
                          "attributes": {"shape": obj.shape, "colour": obj.colour, "size": obj.size}})
    return {"split": split, "captions": captions, "instances": instances,
            "image": {"id": image_id, "file_name": file_name, "width": size, "height": size}}


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    if n < 1:
        raise ConfigError(f"shapes: n must be at least 1, got {n}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"shapes: val_fraction={val_fraction} and test_fraction={test_fraction} "
                          "must be in [0, 1) and sum to less than 1")
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if n >= 3:
        n_val, n_test = max(n_val, int(val_fraction > 0)), max(n_test, int(test_fraction > 0))
    if n - n_val - n_test < 1:
        raise ConfigError(f"shapes: n={n} leaves no training images")
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def _write_json(path: Path, data: dict, **kwargs) -> None:
    """Write through a temp file and rename, so a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, **kwargs))
    os.replace(temp, path)


def _foreign_files(folder: Path) -> list[str]:
    """Entries of ``folder`` that a shapes generation would not have written."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [str(folder)]
    foreign = []
    for entry in sorted(folder.iterdir()):
        pattern = _OWN_FILES.get(entry.name)
        if pattern is None or not entry.is_dir():
            foreign += [] if _TEMP_FILE.fullmatch(entry.name) else [entry.name]
            continue
        foreign += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                    if not (pattern.fullmatch(f.name) or _TEMP_FILE.fullmatch(f.name))]
    return foreign


# ----------------------------------------------------------------------------- types

@dataclass(frozen=True)
class _Object:
    """One drawn shape; (x, y, side, side) is its bounding box in pixels."""

    id: int
    shape: str
    colour: str
    size: str
    x: float
    y: float
    side: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


# ----------------------------------------------------------------------------- public

def generate_shapes(out_dir: str | Path, *, n: int, seed: int = 0, image_size: int = 128,
                    val_fraction: float = 0.1, test_fraction: float = 0.1,
                    workers: int = 0, progress: bool = False) -> dict:
    """Write a shapes set to ``out_dir`` (created if needed; existing files of the same
    names are overwritten). The manifest ``shapes.json`` is removed first and written last.

    Args:
        out_dir: the folder to write.
        n: number of images; the first go to train, then val, then test.
        seed: the set's seed (>= 0); image ``i`` is drawn from ``default_rng([seed, i])``.
        image_size: side of the square RGB images in pixels (>= 32).
        val_fraction, test_fraction: split sizes ``round(n * fraction)``, at least 1 each
            (when the fraction is > 0 and n >= 3).
        workers: 0 draws in this process; > 0 uses a process pool (identical output).
        progress: show a tqdm progress bar.

    Returns:
        ``{"n": n, "splits": {"train": ..., "val": ..., "test": ...}, "seconds": ...}``.
    """
    start = time.perf_counter()
    counts = _split_counts(n, val_fraction, test_fraction)
    if image_size < 32 or seed < 0 or workers < 0:
        raise ConfigError(f"shapes: need image_size >= 32, seed >= 0 and workers >= 0, "
                          f"got {image_size}, {seed}, {workers}")
    out = Path(out_dir)
    (out / "shapes.json").unlink(missing_ok=True)  # until the end, the set reads as unfinished
    for folder in (*SPLITS, "annotations"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    splits = [split for split in SPLITS for _ in range(counts[split])]
    jobs = [(i, seed, image_size, splits[i], str(out)) for i in range(n)]
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    pool = multiprocessing.Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(_make_image, jobs, chunksize=16) if pool else map(_make_image, jobs)
        if progress:
            from captioner.progress import tqdm
            results = tqdm(results, total=n, desc="shapes", unit="img")
        for record in results:
            records[record["split"]].append(record)
    finally:
        if pool:
            pool.terminate()
    info = {"description": "captioner shapes set", "version": str(VERSION), "seed": seed}
    categories = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]
    for split, recs in records.items():
        images = [r["image"] for r in recs]
        common = {"info": info, "licenses": [], "images": images}
        _write_json(out / "annotations" / f"captions_{split}.json",
                    {**common, "annotations": [c for r in recs for c in r["captions"]]}, separators=(",", ":"))
        _write_json(out / "annotations" / f"instances_{split}.json",
                    {**common, "annotations": [o for r in recs for o in r["instances"]],
                     "categories": categories}, separators=(",", ":"))
    manifest = {"n": n, "seed": seed, "image_size": image_size, "splits": counts, "version": VERSION}
    _write_json(out / "shapes.json", manifest, indent=2)
    return {"n": n, "splits": counts, "seconds": round(time.perf_counter() - start, 3)}


def shapes_manifest(out_dir: str | Path) -> dict | None:
    """What the shapes set in ``out_dir`` was made with: ``n``, ``seed``, ``image_size``,
    ``version`` from its ``shapes.json``; None when there is no manifest (no finished set).

    Raises:
        DataError: the manifest is unreadable or lacks one of those keys.
    """
    path = Path(out_dir) / "shapes.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        return {key: manifest[key] for key in ("n", "seed", "image_size", "version")}
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not a shapes manifest; choose another folder") from None


def ensure_shapes(out_dir: str | Path, *, n: int, seed: int = 0, image_size: int = 128,
                  progress: bool = False) -> Path:
    """Generate a shapes set in ``out_dir`` unless one with the same parameters is there.

    A folder without ``shapes.json`` that holds only files a generation writes is an
    interrupted generation and is redone. Nothing is ever deleted.

    Args:
        out_dir: the folder.
        n, seed, image_size: as for :func:`generate_shapes` (default split fractions).
        progress: show a progress bar while generating.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        DataError: ``out_dir`` holds a shapes set with other parameters, an unreadable
            manifest, or files that are not part of a shapes set.
    """
    out = Path(out_dir)
    made = shapes_manifest(out)
    if made is not None:
        wanted = {"n": n, "seed": seed, "image_size": image_size, "version": VERSION}
        differs = [f"{key}={made[key]!r} (wanted {value!r})" for key, value in wanted.items() if made[key] != value]
        if differs:
            raise DataError(f"{out} holds a shapes set made with {', '.join(differs)}; "
                            "choose another folder or delete this one")
        if all((out / "annotations" / f"{kind}_{split}.json").is_file()
               for kind in ("captions", "instances") for split in SPLITS):
            return out
    else:
        foreign = _foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise DataError(f"{out} is not a shapes set (no shapes.json) and holds other files "
                            f"({shown}); choose an empty or new folder")
    generate_shapes(out, n=n, seed=seed, image_size=image_size, progress=progress)
    return out
