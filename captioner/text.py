"""Text side of captioning: one tokenizer for vocabulary and BLEU, and the vocabulary itself.

The same `tokenize()` feeds training targets and BLEU references, so scores are computed on
exactly the tokens the model learns to produce (the COCO/PTB convention: lower-case,
punctuation dropped, whitespace split). No nltk data is needed.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# A caption may not end on these (search bars <end> right after them): articles,
# prepositions, conjunctions and auxiliaries leave a sentence unfinished. Models trained on a
# metric learn to stop early on them ("a brown dog is in the": BLEU's n-gram precision rises
# with every word cut); the list extends self-critical.pytorch's `bad_endings`.
BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near",
               "to", "is", "are", "am", "and", "into", "through", "from", "by", "his", "her", "its", "their")

# Anything that is not a letter, digit, apostrophe-free word char or whitespace is punctuation.
_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace (COCO/PTB caption convention).

    Apostrophes are dropped without a space ("dog's" -> "dogs"), as the PTB tokenizer of the
    COCO toolkit effectively does for BLEU; other punctuation becomes a space ("black-and-white"
    -> "black and white").
    """
    text = text.lower().replace("'", "").replace("\u2019", "")
    return _PUNCT.sub(" ", text).split()


@dataclass
class Vocabulary:
    """Word <-> id map with the four specials at fixed ids 0..3."""

    words: list[str] = field(default_factory=lambda: list(SPECIALS))

    def __post_init__(self) -> None:
        if tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary has duplicate words")
        self._index = {w: i for i, w in enumerate(self.words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str | Sequence[str]], min_freq: int = 5) -> "Vocabulary":
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical)."""
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption) if isinstance(caption, str) else caption)
        kept = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def encode(self, text: str | Sequence[str], add_start_end: bool = True) -> list[int]:
        """Token ids; unknown words map to <unk>."""
        tokens = tokenize(text) if isinstance(text, str) else list(text)
        ids = [self._index.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_start_end else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first <end>; <start> and <pad> are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(words)

    def bad_ending_ids(self) -> list[int]:
        """Ids of the BAD_ENDINGS words in this vocabulary (search bars <end> after them)."""
        return [self._index[w] for w in BAD_ENDINGS if w in self._index]

    def to_json(self) -> str:
        return json.dumps({"words": self.words}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        try:
            data = json.loads(text)
            words = data["words"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a vocabulary JSON: {exc}") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary JSON 'words' must be a list of strings")
        return cls(words)
