"""Caption metrics.

BLEU-1..4 here come from nltk's ``corpus_bleu`` on our tokenization (no Java, no data
downloads): the validation metric during training.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.translate.bleu_score import corpus_bleu


def bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> dict[str, float]:
    """Corpus BLEU-1..4.

    Args:
        hypotheses: one word list per image.
        references: for each image, its reference word lists.

    Returns:
        {"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..} in [0, 1].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    weights = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]
    with warnings.catch_warnings():  # nltk warns whenever an n-gram order has no match
        warnings.simplefilter("ignore")
        scores = corpus_bleu([list(r) for r in references], [list(h) for h in hypotheses], weights=weights)
    return {f"bleu{n + 1}": float(s) for n, s in enumerate(scores)}
