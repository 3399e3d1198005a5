"""tiktoken -> tokenizer.json conversion: the Hugging Face file must give tiktoken's ids on every text.

Tokenizers are trained here on the standard library's sources or written by hand; nothing is downloaded.
"""

import itertools
import json

import pytest
import tiktoken
import tokenizers
import transformers

from stdlib_text import stdlib_sources

from llama_jax.data.tiktoken_to_hf import tokenizer_json
from llama_jax.data.tokenizer import (
    LLAMA3_SPLIT_PATTERN,
    TiktokenTokenizer,
    Tokenizer,
    _parse_tiktoken_ranks,
    llama3_special_tokens,
    train_bpe,
)
from llama_jax.errors import DataError

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
MULTILINGUAL = [
    "中文分词测试：我们今天去北京，天气很好。",
    "日本語のテキスト、カタカナとひらがなと漢字。",
    "مرحبا بالعالم، هذا اختبار للترميز.",
    "Привет, мир! Это проверка токенизатора.",
    "emoji 🙂👍🏽 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "naïve café résumé Ångström façade Ελληνικά",
    "x" + " " * 300 + "y\n\n\n\t\t  \r\n" + "\t" * 100 + "  \n" * 50 + " " * 17,
    "1234567 3.14159 2024-06-01 ١٢٣٤ ½",
    "I'LL don't we'Re they've SHE'S it'd I'm 'll",
    "",
    " ",
    "\n",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[TiktokenTokenizer, tiktoken.Encoding, dict[bytes, int]]:
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    train_bpe(stdlib_sources(skip=0, limit_chars=600_000), 2048, path)
    tok = Tokenizer.from_file(path)
    assert isinstance(tok, TiktokenTokenizer)
    ranks = _parse_tiktoken_ranks(path.read_bytes(), path)
    reference = tiktoken.Encoding(
        name="ref", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
    return tok, reference, ranks


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    """Code the tokenizer was not trained on, plus text unlike its training data."""
    return stdlib_sources(skip=150, limit_chars=200_000) + MULTILINGUAL


def _convert(trained, bos_token: str | None) -> str:
    tok, _, ranks = trained
    return tokenizer_json(ranks, tok.special_tokens, LLAMA3_SPLIT_PATTERN, bos_token)


@pytest.fixture(scope="module", params=[BOS, None], ids=["bos", "no_bos"])
def converted(request, trained) -> tuple[tokenizers.Tokenizer, str | None, str]:
    text = _convert(trained, request.param)
    return tokenizers.Tokenizer.from_str(text), request.param, text


def test_same_ids_as_tiktoken(converted, trained, held_out):
    hf, _, _ = converted
    _, reference, _ = trained
    encoded = hf.encode_batch(held_out, add_special_tokens=False)
    for text, encoding in zip(held_out, encoded, strict=True):
        assert encoding.ids == reference.encode_ordinary(text), text[:80]
    assert len(hf.encode(MULTILINGUAL[0], add_special_tokens=False).ids) > 0
    assert len(hf.encode(held_out[0]).ids) < len(held_out[0].encode()) / 2  # it really merges


def test_bos_prepended_exactly_when_given(converted, trained):
    hf, bos_token, _ = converted
    tok, reference, _ = trained
    first, second = MULTILINGUAL[3], MULTILINGUAL[8]
    plain_first, plain_second = reference.encode_ordinary(first), reference.encode_ordinary(second)
    prefix = [tok.bos_id] if bos_token else []
    assert hf.encode(first).ids == [*prefix, *plain_first]
    assert hf.encode(first, second).ids == [*prefix, *plain_first, *prefix, *plain_second]
    assert hf.encode(first, add_special_tokens=False).ids == plain_first


def test_special_tokens_map_to_their_ids(converted, trained):
    hf, _, text = converted
    tok, reference, ranks = trained
    added = json.loads(text)["added_tokens"]
    assert {t["content"]: t["id"] for t in added} == tok.special_tokens
    assert all(t["special"] for t in added)
    sample = f"{BOS}def f():{EOT}\n  return 1{EOS} naïve<|python_tag|>"
    ids = hf.encode(sample, add_special_tokens=False).ids
    assert ids == reference.encode(sample, allowed_special="all")
    assert ids.count(tok.special_tokens[EOT]) == 1
    assert hf.get_vocab_size(with_added_tokens=True) == tok.vocab_size == len(ranks) + 256


def test_decode_round_trips(converted, held_out):
    hf, _, _ = converted
    for text in [*held_out, f"{BOS}Hi{EOT} there 🙂{EOS}"]:
        assert hf.decode(hf.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_llama_jax_reads_the_file_like_the_tiktoken_one(trained, held_out, tmp_path):
    tok, _, _ = trained
    (tmp_path / "tokenizer.json").write_text(_convert(trained, BOS), encoding="utf-8")
    hf_tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (hf_tok.vocab_size, hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (
        tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    assert (hf_tok.prefix_ids, hf_tok.suffix_ids) == (tok.prefix_ids, tok.suffix_ids)
    for text in [*held_out[-len(MULTILINGUAL):], f"{BOS}Hi{EOT}"]:
        for allow_special in (False, True):
            assert hf_tok.encode(text, allow_special=allow_special) == tok.encode(text, allow_special=allow_special)


@pytest.mark.parametrize("bos_token", [BOS, None], ids=["bos", "no_bos"])
def test_transformers_gives_tiktoken_ids(trained, held_out, tmp_path, bos_token):
    tok, reference, _ = trained
    (tmp_path / "tokenizer.json").write_text(_convert(trained, bos_token), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}), encoding="utf-8")
    prefix = [tok.bos_id] if bos_token else []
    for hf in (transformers.AutoTokenizer.from_pretrained(tmp_path),
               transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))):
        batch = hf(held_out)["input_ids"]
        for text, ids in zip(held_out, batch, strict=True):
            assert ids == [*prefix, *reference.encode_ordinary(text)], text[:80]
        assert hf(f"a{EOT}b", add_special_tokens=False)["input_ids"] == reference.encode(
            f"a{EOT}b", allowed_special="all")
        assert hf.decode(hf(MULTILINGUAL[4])["input_ids"], skip_special_tokens=True) == MULTILINGUAL[4]


def _hand_made_ranks() -> dict[bytes, int]:
    """Ranks no merge-list trainer would emit, so each token's merge must be worked out the way tiktoken works.

    "abc": "ab" outranks "bc", so tiktoken joins (ab, c) - not the first split (a, bc). "def": "ef" outranks
    "de", so it joins (d, ef) - not the last split. "abcdef": the parts are abc and def, though "cd" exists.
    """
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"bc", b"abc", b"ef", b"de", b"def", b"cd", b"abcdef", b"zz", b"zzz", b"zzzz"):
        ranks[token] = len(ranks)
    return ranks


def test_merges_follow_tiktoken_on_a_hand_made_table():
    ranks = _hand_made_ranks()
    specials = llama3_special_tokens(len(ranks))
    text = tokenizer_json(ranks, specials, LLAMA3_SPLIT_PATTERN, None)
    merges = [tuple(m) for m in json.loads(text)["model"]["merges"]]
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("e", "f"), ("d", "e"), ("d", "ef"), ("c", "d"),
                      ("abc", "def"), ("z", "z"), ("zz", "z"), ("zz", "zz")]
    reference = tiktoken.Encoding(name="hand", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=specials)
    hf = tokenizers.Tokenizer.from_str(text)
    # A letter run is one pre-token, so every word goes through BPE: all words of up to 5 of these letters, and
    # "abcdef" with each letter put in at each place.
    words = ["".join(w) for n in range(1, 6) for w in itertools.product("abcdefz", repeat=n)]
    words += ["abcdef"[:i] + c + "abcdef"[i:] for i in range(7) for c in "abcdefz"]
    assert [e.ids for e in hf.encode_batch(words, add_special_tokens=False)] == reference.encode_ordinary_batch(words)


def test_tokens_bpe_cannot_build_from_lower_ranks():
    """Like " Việt" in Llama 3: tiktoken takes such a token whole, and builds it inside longer words whenever two
    tokens that spell it meet, whatever their ranks. Here "xy" and "qr", "rs" rank after the tokens they spell;
    "uvw" has no split into tokens at all."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks |= {b"xyz": 256, b"xy": 257, b"qrs": 258, b"qr": 259, b"rs": 260, b"qrsx": 261, b"uvw": 262}
    specials = llama3_special_tokens(len(ranks))
    text = tokenizer_json(ranks, specials, LLAMA3_SPLIT_PATTERN, BOS)
    merges = [tuple(m) for m in json.loads(text)["model"]["merges"]]
    assert merges == [("xy", "z"), ("x", "y"), ("q", "rs"), ("qr", "s"), ("q", "r"), ("r", "s"), ("qrs", "x")]
    reference = tiktoken.Encoding(name="hand", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
                                  special_tokens=specials)
    hf = tokenizers.Tokenizer.from_str(text)
    words = ["".join(w) for n in range(1, 5) for w in itertools.product("qrsuvwxyz", repeat=n)]
    assert [e.ids for e in hf.encode_batch(words, add_special_tokens=False)] == reference.encode_ordinary_batch(words)
    assert reference.encode_ordinary("xyzq") == [256, ord("q")]  # built inside a word, through "xy"
    assert reference.encode_ordinary("uvw") == [262]


def test_special_ids_must_follow_the_ranks():
    ranks = _hand_made_ranks()
    with pytest.raises(DataError, match="renumber"):
        tokenizer_json(ranks, llama3_special_tokens(len(ranks) + 1), LLAMA3_SPLIT_PATTERN, BOS)
