"""The vectorised CIDEr-D against pycocoevalcap's ``Cider``, on real shapes captions."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.cider import CiderD, corpus_cider, ngram_counts
from captioner.metrics import ptb_like_tokenize


@pytest.fixture(scope="module")
def shapes_refs(shapes_root) -> dict[int, list[str]]:
    """image id -> its reference captions, PTB-like tokenized and joined (as caption_metrics scores them)."""
    refs: dict[int, list[str]] = defaultdict(list)
    for split in ("train", "val", "test"):
        data = json.loads((shapes_root / "annotations" / f"captions_{split}.json").read_text())
        for a in data["annotations"]:
            refs[a["image_id"]].append(" ".join(ptb_like_tokenize(a["caption"])))
    return dict(refs)


def _hypotheses(refs: dict[int, list[str]], seed: int = 0) -> dict[int, str]:
    """Plausible and broken captions: another image's reference, shuffled, cut short (to
    nothing, or one word), with words no reference has, or the image's own reference."""
    rng, ids = random.Random(seed), sorted(refs)
    hyps = {}
    for k, i in enumerate(ids):
        words = refs[ids[(k + 1) % len(ids)]][0].split()
        if k % 3 == 0:
            rng.shuffle(words)
        if k % 5 == 0:
            words = words[:rng.randint(0, 1 if k % 2 else len(words))]
        if k % 7 == 0:
            words = words + ["zebra", "purple zebra"]
        if k % 11 == 0:
            words = refs[i][1].split()
        hyps[i] = " ".join(words)
    return hyps


def test_matches_pycocoevalcap_per_image_and_corpus(shapes_refs):
    ids = sorted(shapes_refs)
    hyps = _hypotheses(shapes_refs)
    assert any(h == "" for h in hyps.values()) and any(len(h.split()) == 1 for h in hyps.values())
    expected_corpus, expected = Cider().compute_score({i: shapes_refs[i] for i in ids}, {i: [hyps[i]] for i in ids})
    cider = CiderD([[r.split() for r in shapes_refs[i]] for i in ids])
    got = cider.score([hyps[i].split() for i in ids], np.arange(len(ids)))
    assert got.shape == (len(ids),)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert got.std() > 0.1 and got.max() > 1.0  # the set has real spread, not all zeros
    assert corpus_cider([hyps[i].split() for i in ids], [[r.split() for r in shapes_refs[i]] for i in ids]) \
        == pytest.approx(expected_corpus, rel=1e-6)


def test_many_hypotheses_per_image_each_scored_alone(shapes_refs):
    """k samples of an image in one call score as each would alone (the SCST batch)."""
    ids = sorted(shapes_refs)[:10]
    cider = CiderD([[r.split() for r in shapes_refs[i]] for i in ids])
    hyps = [shapes_refs[ids[j]][0].split() for j in (0, 1, 2)] + [["a"], []]
    images = np.array([0, 0, 0, 3, 3])
    batch = cider.score(hyps, images)
    alone = np.array([cider.score([h], [m])[0] for h, m in zip(hyps, images)])
    np.testing.assert_allclose(batch, alone, rtol=1e-12)
    assert batch[0] > batch[1] and batch[0] > batch[2]  # the image's own reference beats other images'
    assert batch[4] == 0.0


def test_document_frequencies_come_from_the_corpus_not_the_batch(shapes_refs):
    """A score depends on the corpus given at construction, never on what else is scored."""
    ids = sorted(shapes_refs)
    cider = CiderD([[r.split() for r in shapes_refs[i]] for i in ids])
    hyp = shapes_refs[ids[4]][2].split()
    alone = cider.score([hyp], [4])[0]
    with_others = cider.score([hyp, *[shapes_refs[i][0].split() for i in ids[:20]]], [4, *range(20)])[0]
    assert alone == with_others > 0
    small = CiderD([[r.split() for r in shapes_refs[i]] for i in ids[:5]])
    assert small.score([hyp], [4])[0] != pytest.approx(alone)  # fewer images: other idf weights


def test_ngram_counts_and_errors():
    assert ngram_counts(["a", "b", "a"], 2) == {("a",): 2, ("b",): 1, ("a", "b"): 1, ("b", "a"): 1}
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD([[["a"]], []])
    cider = CiderD([[["a", "b"]], [["c"]]])
    with pytest.raises(IndexError, match="2 images"):
        cider.score([["a"]], [2])
    with pytest.raises(ValueError, match="1 hypotheses but 2"):
        cider.score([["a"]], [0, 1])
