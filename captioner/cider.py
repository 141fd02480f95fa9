"""CIDEr-D of many captions at once, against a fixed corpus of references: the SCST reward.

CIDEr-D (Vedantam et al. 2015) as coco-caption computes it (pycocoevalcap's ``CiderScorer``,
which :func:`captioner.metrics.caption_metrics` calls): for n = 1..4, each caption is a
vector of its n-grams' tf * idf with idf = log(I) - log(max(1, df)), I the number of images
of the corpus and df the number of images whose references hold the n-gram; a hypothesis
scores, against each reference, the clipped cosine

    sum_g min(h_g, r_g) r_g / (|h| |r|) * exp(-(len_h - len_r)^2 / (2 sigma^2))

(sigma 6; "len" is, as in coco-caption, the caption's number of bigrams), averaged over n
and over the image's references, times 10.

pycocoevalcap walks Python dictionaries per (hypothesis, reference) pair and recomputes
every reference's vector on each call. Here the references are turned into tf-idf vectors
ONCE (flat arrays of n-gram ids and weights, as a sparse matrix in CSR form), and a batch
of hypotheses is scored in a handful of numpy operations: the (hypothesis, reference) pairs'
shared n-grams are found by intersecting sorted keys ``pair * G + ngram``. The document
frequencies come from the corpus given at construction: for SCST, the training references
(as self-critical.pytorch's ``coco-train-idxs``); for a test set's score, its own references
(then it equals pycocoevalcap's ``Cider`` to float precision, tests/test_cider.py).

Letters: N hypotheses, P (hypothesis, reference) pairs, G distinct n-grams, R references.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

Tokens = Sequence[str]


def ngram_counts(tokens: Tokens, n: int = 4) -> Counter:
    """All 1..n-grams of a token list with their counts (pycocoevalcap's ``precook``)."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _ranges(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated index ranges ptr[r]:ptr[r + 1] for r in ``rows`` (CSR rows), and for
    each index the position in ``rows`` it came from."""
    starts, sizes = ptr[rows], ptr[rows + 1] - ptr[rows]
    owner = np.repeat(np.arange(len(rows)), sizes)
    first = np.cumsum(sizes) - sizes  # where each row's run starts in the output
    return np.arange(sizes.sum()) - np.repeat(first, sizes) + np.repeat(starts, sizes), owner


class CiderD:
    """CIDEr-D against a fixed corpus: document frequencies and the references' tf-idf
    vectors computed once, at construction.

    Args:
        references: for each image of the corpus, its reference captions as token lists
            (position i is image i for :meth:`score`).
        n: the longest n-gram. sigma: the length penalty's width.
    """

    def __init__(self, references: Sequence[Sequence[Tokens]], *, n: int = 4, sigma: float = 6.0) -> None:
        if not references or any(len(refs) == 0 for refs in references):
            raise ValueError("CIDEr-D needs at least one image, each with at least one reference")
        self.n, self.sigma = n, sigma
        cooked = [[ngram_counts(r, n) for r in refs] for refs in references]
        df: Counter = Counter(g for refs in cooked for g in set().union(*refs))  # images per n-gram
        self.ids = {g: i for i, g in enumerate(df)}  # n-gram -> column
        self.order = np.array([len(g) - 1 for g in df], dtype=np.int64)  # (G,) n - 1 of each column
        self.log_images = float(np.log(float(len(references))))
        self.idf = self.log_images - np.log(np.maximum(1.0, np.array(list(df.values()), dtype=np.float64)))  # (G,)
        flat = [c for refs in cooked for c in refs]
        self.ref_ptr, self.ref_ids, self.ref_vals, self.ref_norm, self.ref_len = self._vectors(flat)
        self.image_ptr = np.concatenate([[0], np.cumsum([len(refs) for refs in references])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.image_ptr) - 1

    def _vectors(self, counts: Sequence[Counter]):
        """n-gram counts of R captions -> CSR tf-idf vectors (ptr (R+1,), ids, weights), the
        per-order norms (R, n) and the lengths (R,) in bigrams. An n-gram outside the corpus
        (only a hypothesis can have one) has df 0, so idf log(I); it only adds to the norm,
        and gets the id -1 - (n - 1)."""
        sizes = np.array([len(c) for c in counts], dtype=np.int64)
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = np.array([self.ids.get(g, -len(g)) for c in counts for g in c], dtype=np.int64)
        tf = np.array([v for c in counts for v in c.values()], dtype=np.float64)
        known = ids >= 0
        order = np.where(known, self.order[np.where(known, ids, 0)], -ids - 1)  # n - 1 of every entry
        vals = tf * np.where(known, self.idf[np.where(known, ids, 0)], self.log_images)
        row = np.repeat(np.arange(len(counts)), sizes)
        norm = np.sqrt(np.bincount(row * self.n + order, weights=vals ** 2, minlength=len(counts) * self.n))
        bigrams = np.bincount(row, weights=np.where(order == 1, tf, 0.0), minlength=len(counts))
        return ptr, ids, vals, norm.reshape(len(counts), self.n), bigrams

    def score(self, hypotheses: Sequence[Tokens], images: Sequence[int] | np.ndarray) -> np.ndarray:
        """CIDEr-D of each hypothesis against the references of its image.

        Args:
            hypotheses: N token lists.
            images: (N,) each hypothesis's image: a position in the corpus.

        Returns:
            (N,) float64 scores; their mean over one hypothesis per image is the corpus
            score pycocoevalcap reports when the corpus is those images.
        """
        images = np.asarray(images, dtype=np.int64)
        if len(images) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(images)} image indices")
        if len(images) and (images.min() < 0 or images.max() >= len(self)):
            raise IndexError(f"image index out of range: the corpus has {len(self)} images")
        h_ptr, h_ids, h_vals, h_norm, h_len = self._vectors([ngram_counts(list(h), self.n) for h in hypotheses])
        n_refs = self.image_ptr[images + 1] - self.image_ptr[images]  # (N,)
        pair_ref, pair_hyp = _ranges(self.image_ptr, images)  # (P,) each pair's reference and hypothesis
        num = self._clipped_dot(pair_hyp, pair_ref, h_ptr, h_ids, h_vals)  # (P, n)
        denom = h_norm[pair_hyp] * self.ref_norm[pair_ref]  # (P, n)
        cos = np.where(denom != 0, num / np.where(denom != 0, denom, 1.0), num)
        delta = h_len[pair_hyp] - self.ref_len[pair_ref]
        per_pair = (cos * np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]).mean(axis=1)  # (P,)
        return 10.0 * np.bincount(pair_hyp, weights=per_pair, minlength=len(images)) / np.maximum(n_refs, 1)

    def _clipped_dot(self, pair_hyp, pair_ref, h_ptr, h_ids, h_vals) -> np.ndarray:
        """sum over shared n-grams of min(h_g, r_g) * r_g, per pair and n-gram order: (P, n)."""
        G, P = max(len(self.ids), 1), len(pair_hyp)
        h_idx, h_pair = _ranges(h_ptr, pair_hyp)  # every pair's hypothesis entries
        keep = h_ids[h_idx] >= 0  # n-grams outside the corpus match no reference
        h_idx, h_pair = h_idx[keep], h_pair[keep]
        r_idx, r_pair = _ranges(self.ref_ptr, pair_ref)  # every pair's reference entries
        h_key = h_pair * G + h_ids[h_idx]  # unique: a caption lists each n-gram once
        r_key = r_pair * G + self.ref_ids[r_idx]
        _, hi, ri = np.intersect1d(h_key, r_key, assume_unique=True, return_indices=True)
        hv, rv = h_vals[h_idx[hi]], self.ref_vals[r_idx[ri]]
        cell = h_pair[hi] * self.n + self.order[h_ids[h_idx[hi]]]
        return np.bincount(cell, weights=np.minimum(hv, rv) * rv, minlength=P * self.n).reshape(P, self.n)


def corpus_cider(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], **kw) -> float:
    """The corpus CIDEr-D of one hypothesis per image, with the df of these images' references:
    what pycocoevalcap's ``Cider().compute_score`` returns as its first value."""
    return float(CiderD(references, **kw).score(hypotheses, np.arange(len(references))).mean())
