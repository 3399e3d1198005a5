"""Document filters for corpus preparation, each counting what it removed so a manifest can say why data is missing.

A preparation applies its filters in one fixed order (see `Filters`): exact duplicates first (the cheapest test,
and it spares the later ones the repeated work), then the text heuristics, then the length limits, which need the
token count and so run after tokenization. A filter counts a document only when every earlier one kept it, so the
counts add up to the documents removed.

The quality heuristics are those of Gopher (Rae et al. 2021, "Scaling Language Models", appendix A.1.1), which
RefinedWeb reused and the Llama 3 paper (section 3.1.1) describes for its web data. The default thresholds are
Gopher's published ones. They are written for prose: code is full of '#' comments and repeated lines, so they are
off unless asked for (`--quality`).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import ClassVar

import numpy as np

from llama_jax.errors import DataError

# Gopher's thresholds (Rae et al. 2021, A.1.1): a document is removed above each of these.
MAX_SYMBOL_WORD_RATIO = 0.1
MAX_DUPLICATE_LINE_FRACTION = 0.30
MAX_DUPLICATE_LINE_CHARACTER_FRACTION = 0.20
MAX_TOP_NGRAM_CHARACTER_FRACTION = {2: 0.20, 3: 0.18, 4: 0.16}


class Filter(abc.ABC):
    """A named test with its settings and a count of the documents (and characters or tokens) it removed."""

    name: ClassVar[str]
    unit: ClassVar[str]  # what `amount_removed` counts: "characters" or "tokens"

    def __init__(self) -> None:
        self.documents_removed = 0
        self.amount_removed = 0

    @abc.abstractmethod
    def settings(self) -> dict: ...

    def count(self, amount: int) -> None:
        """Records one removed document of `amount` units; split from the test so a worker can judge and the
        process that owns the counters can count."""
        self.documents_removed += 1
        self.amount_removed += amount

    def report(self) -> dict:
        return {
            "name": self.name,
            "settings": self.settings(),
            "documents_removed": self.documents_removed,
            f"{self.unit}_removed": self.amount_removed,
        }


class ExactDuplicates(Filter):
    """Keeps the first occurrence of each exact text, by sha256 of its UTF-8 bytes.

    Memory: 32 bytes of digest per unique document, about 100 bytes with Python's set overhead, i.e. roughly
    10 GB per 100 million unique documents. It is the one filter whose state grows with the corpus.
    """

    name = "exact_duplicates"
    unit = "characters"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[bytes] = set()

    def settings(self) -> dict:
        return {"hash": "sha256"}

    def keep(self, text: str) -> bool:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if digest in self._seen:
            self.count(len(text))
            return False
        self._seen.add(digest)
        return True


class TextFilter(Filter):
    """A stateless test of one text, so that preparation workers can run it in parallel."""

    unit = "characters"

    @abc.abstractmethod
    def rejects(self, text: str) -> bool: ...

    def keep(self, text: str) -> bool:
        if self.rejects(text):
            self.count(len(text))
            return False
        return True


class SymbolWordRatio(TextFilter):
    """Removes text dense in '#' or ellipses (hashtag spam, truncated teasers): either count per word above
    `max_ratio`. Words are whitespace-separated."""

    name = "symbol_word_ratio"

    def __init__(self, max_ratio: float = MAX_SYMBOL_WORD_RATIO) -> None:
        super().__init__()
        self.max_ratio = max_ratio

    def settings(self) -> dict:
        return {"max_ratio": self.max_ratio, "symbols": ["#", "...", "\u2026"]}

    def rejects(self, text: str) -> bool:
        words = max(len(text.split()), 1)
        ellipses = text.count("...") + text.count("\u2026")
        return max(text.count("#"), ellipses) / words > self.max_ratio


class DuplicateLines(TextFilter):
    """Removes boilerplate-heavy text: too many lines that repeat an earlier line of the same document, or too
    many of its characters in such lines. Blank lines are not counted as lines."""

    name = "duplicate_lines"

    def __init__(
        self,
        max_line_fraction: float = MAX_DUPLICATE_LINE_FRACTION,
        max_character_fraction: float = MAX_DUPLICATE_LINE_CHARACTER_FRACTION,
    ) -> None:
        super().__init__()
        self.max_line_fraction = max_line_fraction
        self.max_character_fraction = max_character_fraction

    def settings(self) -> dict:
        return {"max_line_fraction": self.max_line_fraction, "max_character_fraction": self.max_character_fraction}

    def rejects(self, text: str) -> bool:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return False
        seen: set[str] = set()
        duplicate_lines = duplicate_characters = 0
        for line in lines:
            if line in seen:
                duplicate_lines += 1
                duplicate_characters += len(line)
            seen.add(line)
        return (
            duplicate_lines / len(lines) > self.max_line_fraction
            or duplicate_characters / len(text) > self.max_character_fraction
        )


class TopNgramRepetition(TextFilter):
    """Removes text dominated by one repeated phrase: for n = 2, 3, 4, the characters (of its words, spaces not
    counted) covered by the most frequent word n-gram, over all word characters, above that n's threshold.

    Only an n-gram that occurs at least twice counts: Gopher pairs this test with a 50-word minimum, without
    which every short text would fail it (a two-word text is 100% one 2-gram). Among equally frequent n-grams the
    longest counts, so the verdict does not depend on which one a counter happens to list first. The n-grams are
    numbered with numpy (each n-gram's id from the (n-1)-gram's id and the next word's), twice as fast as a
    Counter of word tuples; this is the costliest filter.
    """

    name = "top_ngram_repetition"

    def __init__(self, max_fractions: dict[int, float] | None = None) -> None:
        super().__init__()
        self.max_fractions = dict(MAX_TOP_NGRAM_CHARACTER_FRACTION if max_fractions is None else max_fractions)

    def settings(self) -> dict:
        return {"max_character_fraction": {str(n): f for n, f in self.max_fractions.items()}}

    def rejects(self, text: str) -> bool:
        words = text.split()
        vocabulary: dict[str, int] = {}
        word_ids = np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in words), np.int64, len(words))
        word_chars = np.fromiter(map(len, vocabulary), np.int64, len(vocabulary))[word_ids]
        total = word_chars.sum()
        ids, chars = word_ids, word_chars  # of the n-gram starting at each position
        for n in range(2, max(self.max_fractions, default=1) + 1):
            if len(words) < n:
                break
            ids = np.unique(ids[:-1] * len(vocabulary) + word_ids[n - 1 :], return_inverse=True)[1]
            chars = chars[:-1] + word_chars[n - 1 :]
            if n not in self.max_fractions:
                continue
            occurrences = np.bincount(ids)
            top = occurrences.max()
            if top < 2:
                continue
            ngram_chars = np.zeros(len(occurrences), np.int64)
            ngram_chars[ids] = chars
            if ngram_chars[occurrences == top].max() * top / total > self.max_fractions[n]:
                return True
        return False


class TokenLength(Filter):
    """Removes documents outside [min_tokens, max_tokens], counted in the tokens stored (framing included).

    A long document is dropped, never truncated: a cut document would teach the model an ending that is not one.
    """

    name = "token_length"
    unit = "tokens"

    def __init__(self, min_tokens: int | None = None, max_tokens: int | None = None) -> None:
        super().__init__()
        if (min_tokens is not None and min_tokens < 0) or (max_tokens is not None and max_tokens < 1):
            raise DataError(f"token limits must be positive, got min_tokens={min_tokens}, max_tokens={max_tokens}")
        if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
            raise DataError(
                f"min_tokens={min_tokens} exceeds max_tokens={max_tokens}, which would remove every document: "
                "swap or widen the limits"
            )
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens

    def settings(self) -> dict:
        return {"min_tokens": self.min_tokens, "max_tokens": self.max_tokens}

    def keep(self, num_tokens: int) -> bool:
        too_short = self.min_tokens is not None and num_tokens < self.min_tokens
        too_long = self.max_tokens is not None and num_tokens > self.max_tokens
        if too_short or too_long:
            self.count(num_tokens)
            return False
        return True


def quality_filters() -> list[TextFilter]:
    """Gopher's repetition and symbol heuristics with their published thresholds, in the order they run."""
    return [SymbolWordRatio(), DuplicateLines(), TopNgramRepetition()]


@dataclasses.dataclass
class Filters:
    """The filters of one preparation, grouped by where they run: `dedup` on each text as it is read (it needs
    every text seen so far), `text` in the tokenizing workers, `length` on the token counts they return."""

    dedup: ExactDuplicates | None = None
    text: list[TextFilter] = dataclasses.field(default_factory=list)
    length: TokenLength | None = None

    @classmethod
    def from_options(
        cls, *, dedup: bool = False, quality: bool = False, min_tokens: int | None = None, max_tokens: int | None = None
    ) -> Filters:
        return cls(
            dedup=ExactDuplicates() if dedup else None,
            text=quality_filters() if quality else [],
            length=TokenLength(min_tokens, max_tokens) if (min_tokens, max_tokens) != (None, None) else None,
        )

    def in_order(self) -> list[Filter]:
        return [f for f in (self.dedup, *self.text, self.length) if f is not None]

    def report(self) -> list[dict]:
        return [f.report() for f in self.in_order()]
