"""Attention correctness: does the model look at the object while it names it?

Liu, Mao, Sha and Yuille (2017), "Attention Correctness in Neural Image Captioning"
(AAAI): for a generated word that refers to an annotated region R, the
attention correctness is the share of the attention mass inside R,
``AC = sum_{i in R} alpha_hat_i``, where alpha_hat is the attention map upsampled to the
image and renormalised to sum 1. We report its mean over all grounded words, next to
what uniform attention would score on the same words (the region's share of the image
area): a model beats the baseline only if it looks *more* at the object than chance.

Convention: the map covers the whole ORIGINAL image. The encoder resizes every image to
a square without cropping (``captioner.encoder``), so grid cell (r, c) of an h x w map
covers rows r*H/h .. (r+1)*H/h and columns c*W/w .. (c+1)*W/w of the H x W original,
whatever its aspect ratio. The map is upsampled bilinearly; by default cell (r, c)'s value
sits at that rectangle's centre (``F.interpolate``'s ``align_corners=False``). A CNN
feature's receptive field is centred elsewhere, though (a ResNet's stride-8 feature at
(r, c) looks at pixel (8r, 8c), near the cell's top-left corner): ``origin`` places the
value there (``Encoder.cell_origin`` computes it), so the map is drawn where the
feature looked. Maps are row-major over the
L = h * w locations, as everywhere in the package.

Which words refer to which region (:func:`ground_words`):

- shapes set (regions with a ``"shape"`` attribute): a noun phrase ``[size] [colour]
  shape`` names the one object matching every attribute given, if exactly one does;
- COCO: a category word, plural or synonym (:data:`COCO_SYNONYMS`) names the union of
  all instances of that category in the image.

Letters: H, W image height and width in pixels; h x w the attention grid, L = h * w;
T generated words; N grounded words of one image.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from pycocotools import mask as mask_utils  # installed with pycocoevalcap
from torch import Tensor

from captioner.data._io import check_new, coco_annotations, describe_json, get, optional, read_json
from captioner.data.shapes import COLOURS, SHAPES, SIZES
from captioner.errors import DataError

# ----------------------------------------------------------------------------- lexicons

# Words that are colours or sizes but no shapes object has: "a pink circle" then names
# nothing (its colour matches no object) instead of falling back to "circle".
_OTHER_COLOURS = frozenset({
    "black", "white", "grey", "gray", "brown", "pink", "cyan", "magenta", "violet", "teal",
    "turquoise", "gold", "golden", "silver", "beige", "navy", "maroon", "indigo", "lime",
    "olive", "tan", "crimson", "scarlet", "lavender", "lilac", "aqua", "amber",
})
_OTHER_SIZES = frozenset({"big", "tiny", "little", "medium", "huge", "giant", "mini"})

# Extra words (singular) for each of the 80 COCO categories; the category name itself
# always counts, and plurals are made by :func:`_plural`. No word names two categories.
COCO_SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "person": ("man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady",
               "gentleman", "adult", "teenager", "player", "skier", "surfer", "snowboarder",
               "skateboarder", "rider", "pedestrian", "batter", "catcher", "pitcher"),
    "bicycle": ("bike", "cycle"), "car": ("automobile", "taxi", "cab", "sedan"),
    "motorcycle": ("motorbike", "motor bike", "scooter", "moped"),
    "airplane": ("plane", "aeroplane", "jet", "aircraft", "airliner"), "bus": (),
    "train": ("locomotive",), "truck": ("pickup",),
    "boat": ("ship", "sailboat", "canoe", "kayak", "yacht"),
    "traffic light": ("stoplight", "stop light", "traffic signal"), "fire hydrant": ("hydrant",),
    "stop sign": (), "parking meter": (), "bench": (),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "parrot"), "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup", "doggy"), "horse": ("pony", "foal"), "sheep": ("lamb",),
    "cow": ("cattle", "bull", "calf", "ox"), "elephant": (), "bear": (), "zebra": (), "giraffe": (),
    "backpack": (), "umbrella": ("parasol",), "handbag": ("purse", "bag"), "tie": ("necktie",),
    "suitcase": ("luggage",), "frisbee": (), "skis": ("ski",), "snowboard": (),
    "sports ball": ("ball", "football", "soccer ball", "tennis ball", "basketball"), "kite": (),
    "baseball bat": ("bat",), "baseball glove": ("glove", "mitt"), "skateboard": ("skate board",),
    "surfboard": ("surf board",), "tennis racket": ("racket", "racquet"), "bottle": (),
    "wine glass": ("wineglass",), "cup": ("mug",), "fork": (), "knife": (), "spoon": (),
    "bowl": (), "banana": (), "apple": (), "sandwich": (), "orange": (), "broccoli": (),
    "carrot": (), "hot dog": ("hotdog",), "pizza": (), "donut": ("doughnut",), "cake": (),
    "chair": (), "couch": ("sofa",), "potted plant": ("plant", "houseplant"), "bed": (),
    "dining table": ("table",), "toilet": (), "tv": ("television", "monitor"), "laptop": (),
    "mouse": (), "remote": ("remote control", "controller"), "keyboard": (),
    "cell phone": ("phone", "cellphone", "smartphone"), "microwave": (), "oven": ("stove",),
    "toaster": (), "sink": (), "refrigerator": ("fridge",), "book": (), "clock": (), "vase": (),
    "scissors": (), "teddy bear": ("teddy",), "hair drier": ("hair dryer", "blow dryer"),
    "toothbrush": (),
})

_IRREGULAR_PLURALS = MappingProxyType({
    "man": "men", "woman": "women", "gentleman": "gentlemen", "person": "people",
    "child": "children", "mouse": "mice", "knife": "knives", "calf": "calves", "ox": "oxen",
    "goose": "geese", "sheep": "sheep", "cattle": "cattle", "luggage": "luggage",
    "broccoli": "broccoli", "skis": "skis", "scissors": "scissors",
})


def _plural(word: str) -> str:
    """English plural of a lexicon word ("dog" -> "dogs", "bus" -> "buses", "man" -> "men")."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def _category_phrases(category: str) -> list[tuple[str, ...]]:
    """Every word sequence that names ``category``: its name and synonyms, singular and plural."""
    phrases = []
    for name in (category, *COCO_SYNONYMS.get(category, ())):
        *head, last = name.split()
        phrases += [(*head, last), (*head, _plural(last))]
    return phrases


# ----------------------------------------------------------------------------- helpers

def _interpolation_matrix(n_out: int, cells: int, origin: float) -> Tensor:
    """(n_out, cells) linear interpolation weights from ``cells`` grid values to ``n_out``
    pixels, cell k's value sitting at (k + origin) cells; clamped at the ends (border values).
    ``origin`` 0.5 is ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * cells / n_out - origin).clamp(0, cells - 1)  # (n_out,)
    low = src.floor().long().clamp(max=cells - 1)
    high = (low + 1).clamp(max=cells - 1)
    frac = src - low
    weights = torch.zeros(n_out, cells, dtype=torch.float64)
    weights[torch.arange(n_out), low] += 1 - frac
    weights[torch.arange(n_out), high] += frac
    return weights


def upsample_maps(alphas: Tensor | np.ndarray, grid: tuple[int, int], size: tuple[int, int], *,
                  origin: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """Maps over the grid, bilinearly upsampled to (H, W) pixels (not renormalised).

    Args:
        alphas: (N, L) or (N, h, w), L = h * w row-major.
        grid: (h, w); the grid spans the whole image, cell (r, c) is h/H x w/W of it.
        size: (H, W).
        origin: where a cell's value sits, in cells from the cell's top-left corner:
            (0.5, 0.5) its centre; ``Encoder.cell_origin`` the centre of the receptive
            field of the feature at that cell (a ResNet's is near the top-left corner).

    Returns:
        (N, H, W) float64 on the CPU.
    """
    h, w = grid
    maps = torch.as_tensor(alphas).detach().to("cpu", torch.float64).reshape(-1, h, w)  # (N, h, w)
    rows = _interpolation_matrix(size[0], h, origin[0])  # (H, h)
    cols = _interpolation_matrix(size[1], w, origin[1])  # (W, w)
    return torch.einsum("Yh,nhw,Xw->nYX", rows, maps, cols)  # (N, H, W)


def _upsample(alphas: Tensor | np.ndarray, grid: tuple[int, int], size: tuple[int, int],
              origin: tuple[float, float] = (0.5, 0.5)) -> Tensor:
    """Attention maps upsampled bilinearly to the image and renormalised to sum 1.

    Args:
        alphas: (N, L) or (N, h, w) non-negative maps.
        grid: (h, w), with L = h * w row-major.
        size: (H, W) of the original image.
        origin: where a cell's value sits (see :func:`upsample_maps`).

    Returns:
        (N, H, W) float64 on the CPU, each map summing to 1.
    """
    h, w = grid
    alphas = torch.as_tensor(alphas).detach().to("cpu", torch.float64)
    if alphas.ndim < 2 or alphas[0].numel() != h * w:
        raise ValueError(f"attention maps of shape {tuple(alphas.shape[1:])} do not fit a {h} x {w} grid")
    if (alphas < 0).any():
        raise ValueError("attention maps must be non-negative")
    up = upsample_maps(alphas, grid, size, origin=origin)  # (N, H, W)
    total = up.sum(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    if (total <= 0).any():
        raise ValueError("an attention map has no mass")
    return up / total


def _union(regions: Sequence[Region]) -> Region:
    """One region covering all of ``regions`` (same category); the lowest object id names it."""
    if len(regions) == 1:
        return regions[0]
    mask = np.logical_or.reduce([r.mask for r in regions])  # (H, W)
    return Region(min(r.object_id for r in regions), regions[0].category, {}, mask)


def shape_phrases(words: Sequence[str], attributes: Sequence[Mapping[str, str]]) -> list[tuple[int, int, dict]]:
    """``[size] [colour] shape`` phrases: (start, end, the attributes they give), the phrase
    being ``words[start:end]``. ``attributes`` are the image's objects' (their values count as
    words too, beside the generator's vocabulary). Attention correctness and CHAIR share it."""
    values = {key: {a.get(key) for a in attributes} for key in ("shape", "colour", "size")}
    shapes = set(SHAPES) | values["shape"]
    colours = set(COLOURS) | _OTHER_COLOURS | values["colour"]
    sizes = set(SIZES) | _OTHER_SIZES | values["size"]
    phrases = []
    for t, word in enumerate(words):
        if word not in shapes:
            continue
        given, start = {"shape": word}, t
        if start > 0 and words[start - 1] in colours:
            start -= 1
            given["colour"] = words[start]
        if start > 0 and words[start - 1] in sizes:
            start -= 1
            given["size"] = words[start]
        phrases.append((start, t + 1, given))
    return phrases


def _ground_shapes(words: Sequence[str], regions: Sequence[Region]) -> list[tuple[int, Region]]:
    """``[size] [colour] shape`` phrases that pick out exactly one object."""
    grounded = []
    for start, end, given in shape_phrases(words, [r.attributes for r in regions]):
        matches = [r for r in regions if all(r.attributes.get(k) == v for k, v in given.items())]
        if len(matches) == 1:  # ambiguous ("a circle" with two circles) or unmatched: skipped
            grounded += [(i, matches[0]) for i in range(start, end)]
    return grounded


def _ground_categories(words: Sequence[str], regions: Sequence[Region]) -> list[tuple[int, Region]]:
    """Category words (longest phrase first: "hot dog" before "dog") -> union of that category."""
    by_category: dict[str, list[Region]] = {}
    for region in regions:
        by_category.setdefault(region.category, []).append(region)
    lexicon = {phrase: category for category in by_category for phrase in _category_phrases(category)}
    longest = max((len(p) for p in lexicon), default=0)
    words = [w.removesuffix("'s") for w in words]  # "man's" names the man
    grounded, unions, t = [], {}, 0
    while t < len(words):
        for n in range(min(longest, len(words) - t), 0, -1):
            category = lexicon.get(tuple(words[t:t + n]))
            if category is not None:
                if category not in unions:
                    unions[category] = _union(by_category[category])
                grounded += [(i, unions[category]) for i in range(t, t + n)]
                t += n
                break
        else:
            t += 1
    return grounded


def _decode_segmentation(segmentation: object, height: int, width: int, source: Path, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, or RLE compressed or not) as an (H, W) bool mask."""
    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
            for p in segmentation
        ):
            raise DataError(f"{source}: {where}: 'segmentation' must be a non-empty list of polygons "
                            f"[x1, y1, x2, y2, x3, y3, ...], found {segmentation!r:.60}")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        size = segmentation.get("size")
        if size != [height, width] or not isinstance(segmentation.get("counts"), (list, str)):
            raise DataError(f"{source}: {where}: RLE 'segmentation' needs 'counts' and 'size' "
                            f"[{height}, {width}] (the image's), found {segmentation!r:.60}")
        rle = segmentation
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, height, width)
    else:
        raise DataError(f"{source}: {where}: 'segmentation' must be polygons or RLE, found {segmentation!r:.60}")
    try:
        with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)  # (H, W)
    except Exception as e:  # pycocotools raises bare exceptions on corrupt RLE
        raise DataError(f"{source}: {where}: cannot decode 'segmentation' ({e})") from None


# ----------------------------------------------------------------------------- types

@dataclass(frozen=True, eq=False)  # eq=False: identity equality, a mask array has no truth value
class Region:
    """One annotated region of an image.

    Attributes:
        object_id: the COCO instance annotation id (for a union of instances: the lowest).
        category: the category name (shapes: the shape name, e.g. "circle").
        attributes: shapes: ``{"shape", "colour", "size"}``; COCO: ``{}``.
        mask: (H, W) bool, in original image pixels.
    """

    object_id: int
    category: str
    attributes: dict
    mask: np.ndarray

    def __post_init__(self) -> None:
        if not (isinstance(self.mask, np.ndarray) and self.mask.ndim == 2 and self.mask.dtype == bool):
            raise ValueError(f"Region mask must be a 2-D bool array, got {getattr(self.mask, 'shape', self.mask)!r}")


@dataclass
class CorrectnessReport:
    """Attention correctness over a set of generated captions.

    Attributes:
        score: mean over grounded words of the attention mass inside the word's region
            (NaN when no word was grounded).
        uniform: mean over the same words of the region's area share: the score of
            uniform attention, the chance baseline.
        words: how many words were grounded.
        images: how many images contributed at least one word.
    """

    score: float
    uniform: float
    words: int
    images: int

    def as_dict(self) -> dict:
        """JSON-ready: NaN scores (nothing grounded) become None."""
        clean = lambda v: None if math.isnan(v) else v  # noqa: E731
        return {"score": clean(self.score), "uniform": clean(self.uniform), "words": self.words, "images": self.images}


# ----------------------------------------------------------------------------- public

_EXPECTED = 'a COCO instances file ({"images": [...], "annotations": [{"segmentation", ...}], "categories": [...]})'


def load_regions(instances_json: str | Path, *, image_ids: Sequence[int] | None = None) -> dict[int, list[Region]]:
    """Read the annotated regions of every image of a COCO instances file.

    Works on the shapes set's ``instances_{split}.json`` (whose annotations carry
    ``attributes``) and on COCO's ``instances_val2014.json``. Masks come from
    pycocotools' rasteriser (polygons and RLE alike).

    Args:
        instances_json: the instances file.
        image_ids: only these images (all when None). A full COCO split holds hundreds of
            thousands of instances, whose masks would not fit in memory together.

    Returns:
        image id -> its regions in file order (an empty list for an image without any).

    Raises:
        DataError: the file is missing, malformed or not an instances file; an entry lacks
            a key or has a bad value; an annotation points to an unknown image or
            category; ids repeat; a segmentation cannot be decoded.
    """
    src = Path(instances_json)
    data = read_json(src)
    if not isinstance(data, dict):
        raise DataError(f"{src}: expected {_EXPECTED}, found {describe_json(data)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problem = f"missing key {key!r}" if key not in data else f"{key!r} must be a list"
            raise DataError(f"{src}: {problem}; expected {_EXPECTED}, found {describe_json(data)}")
    wanted = None if image_ids is None else set(image_ids)

    sizes: dict[int, tuple[int, int]] = {}  # image id -> (H, W)
    for i, image in enumerate(data["images"]):
        image_id = get(image, "id", int, src, f"images[{i}]")
        where = f"images[{i}] (id {image_id})"
        check_new(image_id, sizes, src, "image id", where)
        sizes[image_id] = (get(image, "height", int, src, where), get(image, "width", int, src, where))
    categories: dict[int, str] = {}
    for i, category in enumerate(data["categories"]):
        category_id = get(category, "id", int, src, f"categories[{i}]")
        check_new(category_id, categories, src, "category id", f"categories[{i}]")
        categories[category_id] = get(category, "name", str, src, f"categories[{i}] (id {category_id})")

    regions: dict[int, list[Region]] = {i: [] for i in sizes if wanted is None or i in wanted}
    for ann, object_id, image_id, where in coco_annotations(data, src):
        category_id = get(ann, "category_id", int, src, where)
        if image_id not in sizes:
            raise DataError(f"{src}: {where}: unknown image_id {image_id}")
        if category_id not in categories:
            raise DataError(f"{src}: {where}: unknown category_id {category_id}")
        if image_id not in regions:
            continue
        segmentation = get(ann, "segmentation", None, src, where)
        mask = _decode_segmentation(segmentation, *sizes[image_id], src, where)  # (H, W)
        attributes = optional(ann, "attributes", dict, src, where) or {}
        regions[image_id].append(Region(object_id, categories[category_id], dict(attributes), mask))
    return regions


def ground_words(words: Sequence[str], regions: Sequence[Region]) -> list[tuple[int, Region]]:
    """Which generated words name which region of the image.

    Shapes-style regions (``"shape"`` in their attributes): a noun phrase ``[size]
    [colour] shape`` ("small red circle", "blue square", "triangle") refers to the object
    whose attributes match every attribute the phrase gives, if exactly one does; then
    every word of the phrase is grounded to it. Ambiguous phrases ("a circle" with two
    circles) and unmatched ones ("a pink circle", "a diamond" with no diamond) are skipped.

    COCO-style regions (no ``"shape"``): a category name, synonym or plural ("dog",
    "dogs", "puppy"; "man", "people" for person; :data:`COCO_SYNONYMS`) is grounded to
    the union of all instances of that category in the image; every word of a multi-word
    name ("hot dog") is grounded, and the longest name wins ("hot dog" is not a dog).

    Args:
        words: the generated caption, tokenized as ``captioner.vocab.tokenize`` does.
        regions: the image's regions (from :func:`load_regions`).

    Returns:
        ``(word_index, region)`` pairs in word order, at most one per word.
    """
    shaped = [r for r in regions if "shape" in r.attributes]
    grounded = dict(_ground_shapes(words, shaped)) if shaped else {}
    for t, region in _ground_categories(words, [r for r in regions if "shape" not in r.attributes]):
        grounded.setdefault(t, region)
    return sorted(grounded.items(), key=lambda pair: pair[0])


def correctness_of_map(alpha: Tensor | np.ndarray, grid: tuple[int, int], mask: np.ndarray, *,
                       origin: tuple[float, float] = (0.5, 0.5)) -> float:
    """The share of one attention map's mass inside a region (Liu et al. 2017).

    Args:
        alpha: (L,) or (h, w) non-negative attention weights, row-major over the grid.
        grid: (h, w) of the map; it covers the whole original image.
        mask: (H, W) bool region in original image pixels.
        origin: where a cell's value sits, in cells (see :func:`upsample_maps`); (0.5, 0.5),
            the cell's centre, is ``F.interpolate``'s ``align_corners=False``.

    Returns:
        The mass inside ``mask`` of the map upsampled bilinearly to (H, W) and renormalised
        to sum 1: in [0, 1].
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    up = _upsample(torch.as_tensor(alpha)[None], grid, mask.shape, origin)  # (1, H, W)
    return float(up[0][torch.from_numpy(mask)].sum())


def attention_correctness(
    captions: Mapping[int, Sequence[str]],
    alphas: Mapping[int, Tensor],
    grid: tuple[int, int],
    regions: Mapping[int, Sequence[Region]],
    *,
    origin: tuple[float, float] = (0.5, 0.5),
) -> CorrectnessReport:
    """Mean attention correctness over every grounded word of every caption.

    Args:
        captions: image id -> the generated words (T of them).
        alphas: image id -> (T or more, L) attention maps; row t produced word t, extra
            rows (the ``<end>`` step, padding) are ignored.
        grid: (h, w) of the maps, L = h * w.
        regions: image id -> its regions (:func:`load_regions`); images without regions
            are skipped.
        origin: where a cell's value sits, in cells (:func:`upsample_maps`): the cell's
            centre by default; ``model.encoder.cell_origin`` puts it at the centre of the
            feature's receptive field, where the feature looked.

    Returns:
        The report: mean correctness, the uniform-attention baseline on the same words,
        and how many words and images counted.
    """
    scores, uniform, images = [], [], 0
    for image_id, words in captions.items():
        image_regions = regions.get(image_id)
        grounded = ground_words(words, image_regions) if image_regions else []
        if not grounded:
            continue
        if image_id not in alphas:
            raise ValueError(f"no attention maps for image {image_id}")
        alpha = torch.as_tensor(alphas[image_id])  # (T', L)
        if alpha.ndim != 2 or alpha.shape[0] < len(words):
            raise ValueError(f"image {image_id}: {len(words)} words need (T >= {len(words)}, L) attention maps, "
                             f"got shape {tuple(alpha.shape)}")
        size = grounded[0][1].mask.shape  # (H, W): all regions of an image share it
        maps = _upsample(alpha[[t for t, _ in grounded]], grid, size, origin)  # (N, H, W)
        for (_, region), up in zip(grounded, maps):
            scores.append(float(up[torch.from_numpy(region.mask)].sum()))
            uniform.append(float(region.mask.mean()))
        images += 1
    if not scores:
        return CorrectnessReport(score=math.nan, uniform=math.nan, words=0, images=0)
    return CorrectnessReport(score=math.fsum(scores) / len(scores), uniform=math.fsum(uniform) / len(uniform),
                             words=len(scores), images=images)
