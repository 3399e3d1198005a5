"""Tests for llama_jax.data.filters: each filter removes exactly the documents it should, and counts them."""

import pytest

from llama_jax.data import filters
from llama_jax.data.filters import (
    DuplicateLines,
    ExactDuplicates,
    Filters,
    SymbolWordRatio,
    TokenLength,
    TopNgramRepetition,
)
from llama_jax.errors import DataError

PROSE = (
    "The committee met on Tuesday to discuss the budget for next year. Several members argued that the "
    "library deserved more money, while others wanted to repair the roads first.\n"
    "After a long debate they agreed to split the difference and revisit the question in spring.\n"
    "Nobody was entirely happy, which the chair took as a sign of a fair compromise."
)


def kept(f, texts):
    return [t for t in texts if f.keep(t)]


def test_exact_duplicates_keep_the_first_occurrence_and_count_the_rest():
    f = ExactDuplicates()
    assert kept(f, ["a", "bb", "a", "ccc", "bb", "a"]) == ["a", "bb", "ccc"]
    assert (f.documents_removed, f.amount_removed) == (3, 1 + 2 + 1)
    assert f.report() == {"name": "exact_duplicates", "settings": {"hash": "sha256"}, "documents_removed": 3,
                          "characters_removed": 4}


def test_exact_duplicates_tell_near_duplicates_apart():
    f = ExactDuplicates()
    assert kept(f, ["text", "text ", "Text", "text"]) == ["text", "text ", "Text"]


def test_symbol_word_ratio_removes_hash_and_ellipsis_heavy_text():
    hashtags = "#deal #sale #today buy now " * 3  # 3 '#' per 6 words
    ellipses = "and then... you will never... believe what... happened next..."  # 4 per 9 words
    unicode_ellipses = "wait\u2026 what\u2026 no\u2026"
    at_threshold = "# " + " ".join(["word"] * 9)  # exactly 1 per 10 words: not above the threshold
    f = SymbolWordRatio()
    assert kept(f, [PROSE, hashtags, ellipses, unicode_ellipses, at_threshold]) == [PROSE, at_threshold]
    assert f.documents_removed == 3
    assert f.amount_removed == len(hashtags) + len(ellipses) + len(unicode_ellipses)


def test_duplicate_lines_by_line_fraction_and_by_character_fraction():
    many_repeats = "\n".join(["Home", "About", "Contact"] * 3 + ["A real sentence of the page."])  # 6 of 10 lines
    long_repeat = "\n".join(["x" * 200, "x" * 200] + [f"line {i}" for i in range(8)])  # 1 of 10 lines, 200/~460 chars
    blank_lines = "first\n\n\n\nsecond\n\n\nthird"  # repeated blank lines are no lines
    f = DuplicateLines()
    assert kept(f, [PROSE, many_repeats, long_repeat, blank_lines]) == [PROSE, blank_lines]
    assert f.documents_removed == 2
    assert kept(DuplicateLines(max_line_fraction=0.7, max_character_fraction=0.5), [many_repeats, long_repeat]) == [
        many_repeats, long_repeat]


def test_top_ngram_repetition_removes_a_dominant_phrase():
    spam = "click here " * 20 + "for the best offers in town"
    three_gram = "buy it now " * 6 + " ".join(f"w{i}" for i in range(40))  # 'buy it now' covers ~25% of characters
    short = "hello world"  # its one 2-gram occurs once: not a repetition
    f = TopNgramRepetition()
    assert kept(f, [PROSE, spam, three_gram, short, ""]) == [PROSE, short, ""]
    assert (f.documents_removed, f.amount_removed) == (2, len(spam) + len(three_gram))
    lenient = TopNgramRepetition({2: 0.5, 3: 0.5, 4: 0.5})
    assert kept(lenient, [spam, three_gram]) == [three_gram]


def test_top_ngram_repetition_counts_the_longest_of_equally_frequent_ngrams():
    # "a b" and "ccccccccc dddddddddd" both occur twice; only the long one covers more than 20% of the characters.
    text = "a b ccccccccc dddddddddd " + " ".join(f"unique{i}" for i in range(6)) + " a b ccccccccc dddddddddd"
    assert TopNgramRepetition({2: 0.2}).rejects(text)
    assert not TopNgramRepetition({2: 0.2}).rejects(text.replace("ccccccccc dddddddddd", "c d"))


def test_token_length_drops_without_truncating_and_counts_tokens():
    f = TokenLength(min_tokens=3, max_tokens=10)
    assert [n for n in [1, 3, 10, 11, 500] if f.keep(n)] == [3, 10]
    assert (f.documents_removed, f.amount_removed) == (3, 1 + 11 + 500)
    assert f.report()["tokens_removed"] == 512
    assert [n for n in [1, 10**6] if TokenLength(max_tokens=5).keep(n)] == [1]


@pytest.mark.parametrize("limits", [(10, 5), (-1, None), (None, 0)])
def test_token_length_refuses_impossible_limits(limits):
    with pytest.raises(DataError):
        TokenLength(*limits)


def test_filters_from_options_in_their_fixed_order():
    everything = Filters.from_options(dedup=True, quality=True, min_tokens=2, max_tokens=100)
    assert [f.name for f in everything.in_order()] == [
        "exact_duplicates", "symbol_word_ratio", "duplicate_lines", "top_ngram_repetition", "token_length"]
    assert Filters.from_options().in_order() == []
    assert [f.name for f in Filters.from_options(max_tokens=7).in_order()] == ["token_length"]


def test_quality_defaults_are_gophers_thresholds():
    symbols, lines, ngrams = filters.quality_filters()
    assert symbols.settings()["max_ratio"] == 0.1
    assert lines.settings() == {"max_line_fraction": 0.30, "max_character_fraction": 0.20}
    assert ngrams.settings() == {"max_character_fraction": {"2": 0.20, "3": 0.18, "4": 0.16}}
