"""Object hallucination (CHAIR) and the accuracy of stated spatial relations.

Rohrbach, Hendricks, Burns, Darrell and Saenko (2018), "Object Hallucination in Image
Captioning" (EMNLP): of the objects a caption names, how many are not in the image?

- ``CHAIR_i`` = |hallucinated object mentions| / |object mentions|, over all captions;
- ``CHAIR_s`` = |captions with at least one hallucinated mention| / |captions|.

What counts as a mention, and when it is in the image (:func:`find_mentions`):

- shapes-style objects (instances whose ``attributes`` carry ``"shape"``, as the built-in
  shapes set writes them): a noun phrase ``[size] [colour] shape`` ("a large yellow
  square") names an existing object only if one object has every attribute the phrase
  gives: size, colour and shape must all match *one* object ("a yellow square" where
  there is a yellow circle and a blue square is a hallucination);
- COCO-style objects (no ``"shape"`` attribute): a category name, synonym or plural of
  any category of the instances file (``captioner.correctness.COCO_SYNONYMS``; the
  longest phrase wins, "hot dog" is not a dog) names an existing object when the image
  has an instance of that category. With the 80 COCO categories this is Rohrbach et
  al.'s word list; with other categories (shape names, say) their names and plurals.

Relations (:func:`relation_accuracy`): "A <relation> B", where A and B are mentions that
each pick out exactly one object of the image and only the relation phrase (and "is",
an article) stands between them ("the red circle is to the left of a blue square").
The relation words are the shapes generator's: to the left of, to the right of, next
to, beside, above, over, below, under. A stated relation holds when its direction is the
dominant axis of the difference of the two objects' box centres, with the right sign
("left of": dx < 0 and |dx| >= |dy|; "next to", "beside": |dx| >= |dy|). The accuracy is
the share of such relations that hold.

Letters: T words of a caption; M mentions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from captioner.correctness import Region, _category_phrases, shape_phrases
from captioner.data._io import check_new, coco_annotations, describe_json, get, optional, read_json
from captioner.errors import DataError
from captioner.vocab import tokenize

# Relation phrase -> the direction it states of the first object relative to the second.
RELATIONS: Mapping[tuple[str, ...], str] = MappingProxyType({
    ("to", "the", "left", "of"): "left", ("left", "of"): "left", ("on", "the", "left", "of"): "left",
    ("to", "the", "right", "of"): "right", ("right", "of"): "right", ("on", "the", "right", "of"): "right",
    ("above",): "above", ("over",): "above", ("below",): "below", ("under",): "below", ("beneath",): "below",
    ("next", "to"): "beside", ("beside",): "beside",
})
_LEADING = frozenset({"is", "are"})  # "the red circle is above ..."
_ARTICLES = frozenset({"a", "an", "the"})


# ----------------------------------------------------------------------------- types

@dataclass(frozen=True)
class GroundObject:
    """One annotated object.

    Attributes:
        object_id: the instance annotation id.
        category: the category name ("circle", "dog").
        attributes: shapes: ``{"shape", "colour", "size"}``; COCO: ``{}``.
        box: (x, y, width, height) in image pixels (COCO ``bbox``).
    """

    object_id: int
    category: str
    attributes: Mapping[str, str]
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


@dataclass(frozen=True)
class GroundTruth:
    """What the images hold: ``objects`` image id -> its objects; ``categories`` every
    category name of the instances file (the words that can be hallucinated)."""

    objects: Mapping[int, Sequence[GroundObject]]
    categories: tuple[str, ...]


@dataclass(frozen=True)
class Mention:
    """Words ``start .. end - 1`` of a caption name ``matches`` (the objects they fit;
    empty: a hallucination)."""

    start: int
    end: int
    matches: tuple[GroundObject, ...]

    @property
    def hallucinated(self) -> bool:
        return not self.matches


@dataclass
class ChairReport:
    """CHAIR and relation accuracy over a set of captions.

    Attributes:
        chair_i: hallucinated mentions / mentions (NaN when nothing was named).
        chair_s: captions with a hallucinated mention / captions (NaN without captions).
        relation_accuracy: stated relations that hold / stated relations between two
            objects named correctly and unambiguously (NaN when there were none); a relation
            whose two mentions pick out the same object is stated and does not hold.
        captions, mentions, hallucinated, hallucinated_captions, relations, relations_correct: the counts.
        relations_wrong_axis: of the stated relations that do not hold, those whose object is
            on the stated side but further along the other axis ("left of" an object mostly
            below it; "beside" one mostly above or below): the sign right, the comparison of
            the two distances wrong.
        relations_self: of the stated relations that do not hold, those whose two mentions
            pick out the same object: the caption names two where there is one.
        wrong_captions: captions that name an object not in the image or state a relation
            that does not hold: what a reader would call false.
        wrong_s: wrong_captions / captions (NaN without captions); ``1 - wrong_s`` is the
            share of captions with nothing false that CHAIR and the relations can see.
    """

    chair_i: float
    chair_s: float
    relation_accuracy: float
    captions: int
    mentions: int
    hallucinated: int
    hallucinated_captions: int
    relations: int
    relations_correct: int
    relations_wrong_axis: int = 0
    relations_self: int = 0
    wrong_captions: int = 0
    wrong_s: float = math.nan

    def as_dict(self) -> dict:
        """JSON-ready: NaN (nothing to count) becomes None."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {key: clean(value) for key, value in vars(self).items()}

    def line(self) -> str:
        """One line for tables and logs (x100)."""
        def pct(v: float) -> str:
            return "n/a" if math.isnan(v) else f"{100 * v:.1f}"
        return (f"CHAIR_i {pct(self.chair_i)}  CHAIR_s {pct(self.chair_s)}  ({self.hallucinated} of "
                f"{self.mentions} named objects not in the image, {self.hallucinated_captions} of {self.captions} "
                f"captions); relation accuracy {pct(self.relation_accuracy)} ({self.relations_correct} of "
                f"{self.relations} stated relations hold; {self.relations_wrong_axis} of the others on the "
                f"stated side, the other axis dominant, {self.relations_self} relate an object to itself); "
                f"captions wrong {pct(self.wrong_s)} ({self.wrong_captions} "
                f"of {self.captions}: an object not there or a relation that does not hold)")


# ----------------------------------------------------------------------------- mentions

def _shape_mentions(words: Sequence[str], objects: Sequence[GroundObject]) -> list[Mention]:
    """``[size] [colour] shape`` phrases and the objects matching every attribute given."""
    mentions = []
    for start, end, given in shape_phrases(words, [o.attributes for o in objects]):
        matches = tuple(o for o in objects if all(o.attributes.get(k) == v for k, v in given.items()))
        mentions.append(Mention(start, end, matches))
    return mentions


def _category_mentions(words: Sequence[str], objects: Sequence[GroundObject],
                       categories: Sequence[str]) -> list[Mention]:
    """Category names, synonyms and plurals of any category; longest phrase first."""
    lexicon = {phrase: c for c in categories for phrase in _category_phrases(c)}
    longest = max((len(p) for p in lexicon), default=0)
    words = [w.removesuffix("'s") for w in words]
    mentions, t = [], 0
    while t < len(words):
        for n in range(min(longest, len(words) - t), 0, -1):
            category = lexicon.get(tuple(words[t:t + n]))
            if category is not None:
                mentions.append(Mention(t, t + n, tuple(o for o in objects if o.category == category)))
                t += n
                break
        else:
            t += 1
    return mentions


def find_mentions(words: Sequence[str], objects: Sequence[GroundObject],
                  categories: Sequence[str] = ()) -> list[Mention]:
    """The objects a caption names, in word order (see the module doc for the rules).

    Args:
        words: the caption, tokenized as ``captioner.vocab.tokenize`` does.
        objects: the image's objects. When any carries a ``"shape"`` attribute the shapes
            rules apply, else the category rules.
        categories: every category name that can be named (the instances file's); the
            image's own categories are always included.

    Returns:
        One :class:`Mention` per object phrase, with the objects it fits (none: hallucinated).
    """
    if any("shape" in o.attributes for o in objects):
        return _shape_mentions(words, objects)
    return _category_mentions(words, objects, list(dict.fromkeys([*categories, *(o.category for o in objects)])))


def ground_object(region: Region) -> GroundObject:
    """An attention-correctness :class:`~captioner.correctness.Region` as a
    :class:`GroundObject`, boxed from its mask (the box in mask pixels)."""
    rows, cols = np.nonzero(region.mask)
    box = (float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1))
    return GroundObject(region.object_id, region.category, region.attributes, box)


# ----------------------------------------------------------------------------- relations

_HORIZONTAL = frozenset({"left", "right", "beside"})


def _offset(a: GroundObject, b: GroundObject) -> tuple[float, float]:
    """(dx, dy): ``a``'s centre minus ``b``'s."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return ax - bx, ay - by


def relation_side_holds(relation: str, a: GroundObject, b: GroundObject) -> bool:
    """Whether ``a`` is on ``relation``'s side of ``b`` whatever axis dominates ("beside":
    always): :func:`relation_holds` without the comparison of the two distances."""
    dx, dy = _offset(a, b)
    return {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0, "beside": True}[relation]


def relation_holds(relation: str, a: GroundObject, b: GroundObject, *, margin: float = 1.0) -> bool:
    """Whether ``a`` is ``relation`` (left, right, above, below, beside) of ``b``: the
    direction is the dominant axis of the centre difference, with the right sign (with
    ``margin`` > 1, clearly so: that axis at least ``margin`` times the other;
    ``train.layout_margin``)."""
    dx, dy = _offset(a, b)
    along, across = (dx, dy) if relation in _HORIZONTAL else (dy, dx)
    return relation_side_holds(relation, a, b) and along != 0 and abs(along) >= margin * abs(across)


def stated_relations(words: Sequence[str], mentions: Sequence[Mention]) -> list[tuple[str, Mention, Mention]]:
    """``(relation, A, B)`` for every "A [is] <relation> [article] B" of consecutive mentions."""
    found = []
    for a, b in zip(mentions, mentions[1:]):
        gap = list(words[a.end:b.start])
        if gap and gap[0] in _LEADING:
            gap = gap[1:]
        if gap and gap[-1] in _ARTICLES:
            gap = gap[:-1]
        relation = RELATIONS.get(tuple(gap))
        if relation is not None:
            found.append((relation, a, b))
    return found


def relation_accuracy(words: Sequence[str], mentions: Sequence[Mention]) -> tuple[int, int, int, int]:
    """(stated relations between two uniquely matched mentions, how many of them hold, how
    many of the others are on the stated side with the other axis dominant, how many of the
    others relate an object to itself).

    Both mentions picking out the same object ("the blue square is to the left of a blue
    square" beside a blue diamond: the caption names two blue squares where there is one) is
    a stated relation that does not hold."""
    stated = correct = wrong_axis = itself = 0
    for relation, a, b in stated_relations(words, mentions):
        if len(a.matches) == 1 and len(b.matches) == 1:
            stated += 1
            if a.matches[0] is b.matches[0]:
                itself += 1
                continue
            holds = relation_holds(relation, a.matches[0], b.matches[0])
            correct += holds
            wrong_axis += not holds and relation_side_holds(relation, a.matches[0], b.matches[0])
    return stated, correct, wrong_axis, itself


# ----------------------------------------------------------------------------- public

def chair(captions: Mapping[int, str | Sequence[str]], truth: GroundTruth) -> ChairReport:
    """CHAIR_i, CHAIR_s and relation accuracy of generated captions.

    Args:
        captions: image id -> the caption (a string, tokenized here, or its words).
            Images absent from ``truth`` are skipped.
        truth: the images' objects and the category names (:func:`load_ground_truth`).

    Returns:
        The report, with its counts.
    """
    n_captions = n_mentions = n_bad = bad_captions = n_relations = n_correct = n_axis = n_self = n_wrong = 0
    for image_id, caption in captions.items():
        objects = truth.objects.get(image_id)
        if objects is None:
            continue
        words = tokenize(caption) if isinstance(caption, str) else list(caption)
        mentions = find_mentions(words, objects, truth.categories)
        bad = sum(m.hallucinated for m in mentions)
        stated, correct, wrong_axis, itself = relation_accuracy(words, mentions)
        n_captions, n_mentions, n_bad = n_captions + 1, n_mentions + len(mentions), n_bad + bad
        bad_captions += bad > 0
        n_wrong += bad > 0 or correct < stated
        n_relations, n_correct, n_axis = n_relations + stated, n_correct + correct, n_axis + wrong_axis
        n_self += itself
    ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
    return ChairReport(chair_i=ratio(n_bad, n_mentions), chair_s=ratio(bad_captions, n_captions),
                       relation_accuracy=ratio(n_correct, n_relations), captions=n_captions,
                       mentions=n_mentions, hallucinated=n_bad, hallucinated_captions=bad_captions,
                       relations=n_relations, relations_correct=n_correct, relations_wrong_axis=n_axis,
                       relations_self=n_self, wrong_captions=n_wrong, wrong_s=ratio(n_wrong, n_captions))


_EXPECTED = 'a COCO instances file ({"images": [...], "annotations": [{"bbox", "category_id", ...}], "categories": [...]})'


def load_ground_truth(instances_json: str | Path, *, image_ids: Sequence[int] | None = None) -> GroundTruth:
    """The objects of every image of a COCO instances file (the shapes set's or COCO's).

    Args:
        instances_json: the instances file.
        image_ids: only these images (all when None); an image without instances gets an
            empty list, so every object it names is a hallucination.

    Raises:
        DataError: the file is missing, malformed or not an instances file; an entry lacks
            a key or has a bad value; an annotation points to an unknown image or category.
    """
    src = Path(instances_json)
    data = read_json(src)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{src}: expected {_EXPECTED}, found {describe_json(data)}")
    categories: dict[int, str] = {}
    for i, category in enumerate(data["categories"]):
        category_id = get(category, "id", int, src, f"categories[{i}]")
        check_new(category_id, categories, src, "category id", f"categories[{i}]")
        categories[category_id] = get(category, "name", str, src, f"categories[{i}] (id {category_id})").lower()
    known = {get(image, "id", int, src, f"images[{i}]") for i, image in enumerate(data["images"])}
    wanted = known if image_ids is None else set(image_ids)
    objects: dict[int, list[GroundObject]] = {i: [] for i in wanted}
    for ann, object_id, image_id, where in coco_annotations(data, src):
        category_id = get(ann, "category_id", int, src, where)
        if image_id not in known or category_id not in categories:
            what = f"image_id {image_id}" if image_id not in known else f"category_id {category_id}"
            raise DataError(f"{src}: {where}: unknown {what}")
        if image_id not in objects:
            continue
        box = get(ann, "bbox", list, src, where)
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DataError(f"{src}: {where}: 'bbox' must be [x, y, width, height], found {box!r:.60}")
        attributes = optional(ann, "attributes", dict, src, where) or {}
        objects[image_id].append(GroundObject(object_id, categories[category_id], MappingProxyType(dict(attributes)),
                                              tuple(float(v) for v in box)))
    return GroundTruth(objects=MappingProxyType(objects), categories=tuple(categories.values()))


class ChairScorer:
    """CHAIR of one split, its instances file read once: for validation during training and
    for the ablation. ``ChairScorer.for_split(cfg.data, "val", image_ids)`` is None when the
    split has no instances file; ``scorer(captions)`` -> :class:`ChairReport`."""

    def __init__(self, truth: GroundTruth) -> None:
        self.truth = truth

    @classmethod
    def for_split(cls, data, split: str, image_ids: Sequence[int] | None = None) -> ChairScorer | None:
        """``data`` a :class:`~captioner.config.DataConfig`; the instances file is found as
        for attention correctness (``captioner.evaluate.instances_file``)."""
        from captioner.data import instances_file

        path = instances_file(data, split)
        return None if path is None else cls(load_ground_truth(path, image_ids=image_ids))

    def __call__(self, captions: Mapping[int, str | Sequence[str]]) -> ChairReport:
        return chair(captions, self.truth)
