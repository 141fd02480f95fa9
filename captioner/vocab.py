"""Tokenization and the vocabulary.

The tokenizer works offline (no nltk data): lowercase, Unicode NFKC, split into words
on anything that is not a letter or a digit; an apostrophe inside a word is kept
("man's"). This matches the preprocessing of Karpathy's split files closely enough that
their ``tokens`` and our tokenization of their ``raw`` sentences agree on almost all words.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from captioner.errors import CheckpointError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase words, dropping punctuation.

    >>> tokenize("A man's dog, running!")
    ['a', "man's", 'dog', 'running']
    """
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    return _WORD.findall(text)


class Vocabulary:
    """A word <-> id map with the four specials at ids 0-3.

    Args:
        words: the ordinary words, in id order (the specials are added in front).
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = [w for w in words if w not in SPECIALS]
        self.itos: list[str] = [*SPECIALS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int = 1, max_size: int = 0) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties: alphabetical),
        at most ``max_size`` of them (0: all)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[:max_size] if max_size else words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, caption: str | Sequence[str], *, max_len: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` as ids; unknown words become ``<unk>``. A caption longer than
        ``max_len`` words is cut to ``<start> w1 .. w_max_len`` WITHOUT ``<end>``: it did not end
        there, and a model taught that it did learns to stop mid-sentence."""
        words = tokenize(caption) if isinstance(caption, str) else list(caption)
        ids = [self.start_id, *(self.stoi.get(w, self.unk_id) for w in words)]
        if max_len is not None and len(words) > max_len:
            return ids[:max_len + 1]
        return [*ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<end>``; ``<start>`` and ``<pad>`` are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return words

    def to_dict(self) -> dict:
        """Plain data for checkpoints and run folders."""
        return {"words": self.itos[len(SPECIALS):]}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        try:
            words = data["words"]
        except (KeyError, TypeError):
            raise CheckpointError("vocabulary data has no 'words' list") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CheckpointError("vocabulary 'words' must be a list of strings")
        return cls(words)
