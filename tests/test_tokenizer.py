"""Tokenizer tests. Every tokenizer file is built here from the standard library's sources; nothing is downloaded."""

import base64
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
import tokenizers

from stdlib_text import stdlib_sources

from llama_jax.data import tokenizer as tk
from llama_jax.errors import DataError

VOCAB_SIZE = 1024  # 768 BPE ranks + 256 Llama 3 specials
SAMPLE = "naïve café — 東京 🙂\n\ttabs"
WITH_SPECIALS = "<|begin_of_text|>Hi there<|eot_id|> naïve café<|end_of_text|>"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_sources(skip=0, limit_chars=600_000)


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    """Text the tokenizers were not trained on, plus the awkward cases."""
    return stdlib_sources(skip=100, limit_chars=100_000) + [SAMPLE, "", "   \n\n  x", "12345 'll'S"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus) -> dict[str, Path]:
    """One file per format. The SentencePiece file is also named tokenizer.model, to test detection by content."""
    root = tmp_path_factory.mktemp("tokenizers")
    tk.train_bpe(corpus, VOCAB_SIZE, root / "tiktoken" / "tokenizer.model")

    (root / "sentencepiece").mkdir()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for text in corpus for line in text.splitlines() if line.strip()]),
        model_writer=model,
        model_type="bpe",
        vocab_size=2000,
        byte_fallback=True,  # like Llama 2: unseen characters (🙂, 東) become bytes, not <unk>
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        bos_piece="<|begin_of_text|>",
        eos_piece="<|end_of_text|>",
        control_symbols=["<|eot_id|>"],
        user_defined_symbols=["<|python_tag|>"],
        minloglevel=2,
    )
    (root / "sentencepiece" / "tokenizer.model").write_bytes(model.getvalue())

    (root / "huggingface").mkdir()
    _hf_llama3_style(corpus).save(str(root / "huggingface" / "tokenizer.json"))
    return {
        "tiktoken": root / "tiktoken" / "tokenizer.model",
        "sentencepiece": root / "sentencepiece" / "tokenizer.model",
        "huggingface": root / "huggingface" / "tokenizer.json",
    }


def _hf_llama3_style(corpus: list[str]) -> tokenizers.Tokenizer:
    """A tokenizer.json shaped like a Llama 3 Hub repo's: byte-level BPE, the 256 specials, a bos-adding
    post-processor. Trained independently of train_bpe, so it is a reference for it too."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(tk.LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = tokenizers.decoders.ByteLevel()
    num_regular = VOCAB_SIZE - 256
    tok.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=num_regular, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = tk.llama3_special_tokens(num_regular)
    tok.add_special_tokens([tokenizers.AddedToken(name, special=True) for name in specials])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", specials["<|begin_of_text|>"])])
    return tok


FORMATS = {"tiktoken": tk.TiktokenTokenizer, "sentencepiece": tk.SentencePieceTokenizer, "huggingface": tk.HFTokenizer}


def test_llama3_special_tokens_are_the_published_ones():
    specials = tk.llama3_special_tokens()
    assert len(specials) == 256
    assert sorted(specials.values()) == list(range(128000, 128256))
    assert {name: specials[name] for name in (
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_3|>",
        "<|reserved_special_token_247|>")} == {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011, "<|reserved_special_token_247|>": 128255}
    assert tk.llama3_special_tokens(768)["<|eot_id|>"] == 777


def test_split_pattern_is_the_published_one():
    assert tk.LLAMA3_SPLIT_PATTERN == (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+")


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_file_detects_format_by_content(files, fmt):
    assert type(tk.Tokenizer.from_file(files[fmt])) is FORMATS[fmt]
    assert type(tk.Tokenizer.from_file(str(files[fmt].parent))) is FORMATS[fmt]  # a directory works too


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(files, held_out, fmt):
    tok = tk.Tokenizer.from_file(files[fmt])
    assert (tok.prefix_ids, tok.suffix_ids) == ((tok.bos_id,), ())  # each fixture frames text as Llama 3 does
    batch = tok.encode_batch(held_out)
    for text, ids in zip(held_out, batch, strict=True):
        assert ids == [tok.bos_id, *tok.encode(text, add_special_tokens=False)] == tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids[1:]) == text
    assert tok.encode_documents(held_out) == [ids + [tok.eos_id] for ids in batch]
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode())  # it really merges, not only bytes


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_tokens_only_when_allowed(files, fmt):
    tok = tk.Tokenizer.from_file(files[fmt])
    assert tok.encode("<|begin_of_text|>", allow_special=True, add_special_tokens=False) == [tok.bos_id]
    assert tok.encode("<|end_of_text|>", allow_special=True, add_special_tokens=False) == [tok.eos_id]
    as_text = tok.encode("<|begin_of_text|>", add_special_tokens=False)
    assert len(as_text) > 1 and not set(as_text) & set(tok.special_tokens.values())
    assert tok.decode(as_text) == "<|begin_of_text|>"

    ids = tok.encode(WITH_SPECIALS, allow_special=True, add_special_tokens=False)
    assert [i for i in ids if i in tok.special_tokens.values()] == [
        tok.bos_id, tok.special_tokens["<|eot_id|>"], tok.eos_id]
    assert tok.decode(ids) == WITH_SPECIALS  # specials are neither dropped nor padded with spaces
    assert tok.encode_batch([WITH_SPECIALS, SAMPLE], allow_special=True, add_special_tokens=False) == [ids, tok.encode(SAMPLE, add_special_tokens=False)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickles_for_data_loader_workers(files, fmt):
    tok = tk.Tokenizer.from_file(files[fmt])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(WITH_SPECIALS, allow_special=True, add_special_tokens=False) == tok.encode(WITH_SPECIALS, allow_special=True, add_special_tokens=False)
    assert clone.encode(WITH_SPECIALS, add_special_tokens=False) == tok.encode(WITH_SPECIALS, add_special_tokens=False)
    assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.vocab_size) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)


def test_train_bpe_writes_llama3_format_that_tiktoken_reproduces(files, held_out):
    lines = files["tiktoken"].read_text(encoding="ascii").splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines)}
    assert len(ranks) == len(lines) == VOCAB_SIZE - 256
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(bytes([b]) in ranks for b in range(256))
    assert max(len(token) for token in ranks) > 4  # it learnt merges, not just bytes

    tok = tk.Tokenizer.from_file(files["tiktoken"])
    reference = tiktoken.Encoding(
        name="ref", pat_str=tk.LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
        special_tokens=tk.llama3_special_tokens(len(ranks)))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB_SIZE, 768, 769, 772)
    for text in held_out + [WITH_SPECIALS]:
        assert tok.encode(text, add_special_tokens=False) == reference.encode(text, disallowed_special=())
        assert tok.encode(text, allow_special=True, add_special_tokens=False) == reference.encode(text, allowed_special="all")


def test_train_bpe_ranks_follow_merge_order(files, held_out):
    """Same ids as a Hugging Face BPE trained alike, as Llama 3's tokenizer.json and tokenizer.model agree: the
    ranks were converted from the trainer's byte-level spelling and merge order correctly."""
    tiktoken_tok = tk.Tokenizer.from_file(files["tiktoken"])
    hf_tok = tk.Tokenizer.from_file(files["huggingface"])
    assert (hf_tok.vocab_size, hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (
        tiktoken_tok.vocab_size, tiktoken_tok.bos_id, tiktoken_tok.eos_id, tiktoken_tok.pad_id)
    for text in held_out + [WITH_SPECIALS]:
        for allow_special in (False, True):
            assert tiktoken_tok.encode(text, allow_special=allow_special, add_special_tokens=False) == hf_tok.encode(
                text, allow_special=allow_special, add_special_tokens=False)


def test_train_bpe_is_deterministic(tmp_path, corpus):
    first = tk.train_bpe(corpus[:5], 600, tmp_path / "a.model")
    tk.train_bpe(iter(corpus[:5]), 600, tmp_path / "b.model")
    other = tk.train_bpe(corpus[5:10], 600, tmp_path / "c.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert (tmp_path / "a.model").read_bytes() != (tmp_path / "c.model").read_bytes()
    assert first.vocab_size == other.vocab_size == 600
    assert not list(tmp_path.glob("*.tmp*"))


def test_tiktoken_survives_huge_whitespace_runs(files):
    tok = tk.Tokenizer.from_file(files["tiktoken"])
    text = "x" + " " * 1_100_000 + "y\n"  # tiktoken alone panics (stack overflow) on this
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode_batch([text, "z"], add_special_tokens=False) == [tok.encode(text, add_special_tokens=False), tok.encode("z", add_special_tokens=False)]


@pytest.mark.parametrize("offset", [0, 1, 3124, 3125, 7777])
def test_every_overlong_whitespace_run_is_cut(offset):
    """The cheap screen in front of the exact scan must never miss a run, wherever it starts."""
    limit = tk._MAX_WHITESPACE_RUN
    for run, pieces in ((limit - 1, 1), (limit, 1), (limit + 1, 2), (3 * limit + 5, 4)):
        text = "a" * offset + " \n\t" * (run // 3) + " " * (run % 3) + "b"
        assert len(tk._cut_long_whitespace(text)) == pieces
        assert "".join(tk._cut_long_whitespace(text)) == text


def test_sentencepiece_ids_come_from_the_model(files):
    tok = tk.Tokenizer.from_file(files["sentencepiece"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(files["sentencepiece"]))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), 2000)
    assert sp.pad_id() == -1 and tok.pad_id == tok.eos_id
    assert set(tok.special_tokens) == {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|python_tag|>"}
    assert tok.encode(SAMPLE, add_special_tokens=False) == sp.encode(SAMPLE)


def test_huggingface_reads_tokenizer_config(files, tmp_path):
    shutil.copy(files["huggingface"], tmp_path / "tokenizer.json")
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "pad_token": "<|eom_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tk.Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (768, tok.special_tokens["<|eot_id|>"], 776)
    ids = tok.encode_documents(["hi"])[0]
    assert (ids[0], ids[-1]) == (768, 777)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataError, match=r"eos_token '</s>'.*lacks"):
        tk.Tokenizer.from_file(tmp_path)


def test_user_errors_raise_data_error(tmp_path, files):
    with pytest.raises(DataError, match=r"nope\.model not found: give a tokenizer\.model .* as data\.tokenizer=PATH, "
                                        r"beside the weights of a checkpoint"):
        tk.Tokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(DataError, match="holds no tokenizer.model or tokenizer.json"):
        tk.Tokenizer.from_file(tmp_path)

    (tmp_path / "garbage.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="neither a Llama 3 tiktoken file .* nor a SentencePiece model"):
        tk.Tokenizer.from_file(tmp_path / "garbage.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        tk.Tokenizer.from_file(tmp_path / "empty.model")
    tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="cannot tell the eos"):
        tk.Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid Hugging Face tokenizer.json"):
        tk.Tokenizer.from_file(tmp_path / "tokenizer.json")

    good = files["tiktoken"].read_text().splitlines()
    (tmp_path / "corrupt.model").write_text("\n".join(good[:3] + ["not base64 at all"] + good[3:]))
    with pytest.raises(DataError, match="line 4 is not 'base64"):
        tk.Tokenizer.from_file(tmp_path / "corrupt.model")
    (tmp_path / "no_bytes.model").write_text(f"{base64.b64encode(b'ab').decode()} 0\n")
    with pytest.raises(DataError, match="lacks 256 of the 256 single bytes"):
        tk.Tokenizer.from_file(tmp_path / "no_bytes.model")

    tok = tk.Tokenizer.from_file(files["tiktoken"])
    with pytest.raises(DataError, match=f"token id {VOCAB_SIZE} is outside"):
        tok.decode([1, VOCAB_SIZE])
    with pytest.raises(DataError, match="vocab_size=300 is too small"):
        tk.train_bpe(["abc"], 300, tmp_path / "small.model")
    with pytest.raises(DataError, match="learnt no merges"):
        tk.train_bpe([], 1024, tmp_path / "none.model")


# ---------------------------------------------------------------------------------------------------------
# Framing: the tokenizer's own files decide, exactly as transformers' tokenizer(text)

_BOS_TEMPLATE = tokenizers.processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
    ("<|begin_of_text|>", 768)])
_BOS_EOS_TEMPLATE = tokenizers.processors.Sequence([
    tokenizers.processors.ByteLevel(trim_offsets=False),
    tokenizers.processors.TemplateProcessing(single="<|begin_of_text|> $A <|end_of_text|>", special_tokens=[
        ("<|begin_of_text|>", 768), ("<|end_of_text|>", 769)]),
])
FRAMINGS = {  # post-processor -> the ids it adds before and after the text
    "bos": (_BOS_TEMPLATE, (768,), ()),
    "none": (None, (), ()),
    "bos_eos": (_BOS_EOS_TEMPLATE, (768,), (769,)),
}


@pytest.mark.parametrize("add_bos_token", [True, False, None])
@pytest.mark.parametrize("framing", FRAMINGS)
def test_framing_follows_the_post_processor_as_transformers_does(files, tmp_path, framing, add_bos_token):
    """Like SmolLM2: bos_token names a chat token, and only the post-processor says whether anything is added."""
    import transformers

    post_processor, prefix, suffix = FRAMINGS[framing]
    tok_json = tokenizers.Tokenizer.from_file(str(files["huggingface"]))
    tok_json.post_processor = post_processor
    tok_json.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|start_header_id|>", "eos_token": "<|end_of_text|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    ours = tk.Tokenizer.from_file(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.prefix_ids, ours.suffix_ids) == (prefix, suffix)
    for text in [SAMPLE, "def f(x):\n    return x  # 1234\n", "I'LL don't", " leading space"]:
        assert ours.encode(text) == reference(text).input_ids
        assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False).input_ids
    documents = ours.encode_documents(["x = 1"])
    assert documents == [[*prefix, *ours.encode("x = 1", add_special_tokens=False), 769]]  # one eos, never two


@pytest.mark.parametrize("flags, prefix, suffix", [
    ({}, ("bos",), ()), ({"add_bos_token": False}, (), ()), ({"add_eos_token": True}, ("bos",), ("eos",)),
])
def test_sentencepiece_framing_reads_tokenizer_config(files, tmp_path, flags, prefix, suffix):
    shutil.copy(files["sentencepiece"], tmp_path / "tokenizer.model")
    if flags:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(flags))
    tok = tk.Tokenizer.from_file(tmp_path)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id}
    assert (tok.prefix_ids, tok.suffix_ids) == (tuple(ids[p] for p in prefix), tuple(ids[s] for s in suffix))
    assert tok.encode("hi") == [*tok.prefix_ids, *tok.encode("hi", add_special_tokens=False), *tok.suffix_ids]


def test_tiktoken_frames_with_begin_of_text_only(files):
    tok = tk.Tokenizer.from_file(files["tiktoken"])
    assert (tok.prefix_ids, tok.suffix_ids) == ((tok.special_tokens["<|begin_of_text|>"],), ())
    assert tok.encode_documents(["a", ""]) == [[768, *tok.encode("a", add_special_tokens=False), 769], [768, 769]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_hf_gives_the_same_tokenizer_back(files, held_out, tmp_path, fmt):
    """Our own reader gets an identical tokenizer back from every format; transformers opens the tokenizer.json
    exports (tiktoken's is converted) and encodes, frames and decodes exactly as we do."""
    import transformers

    tok = tk.Tokenizer.from_file(files[fmt])
    tok.save_hf(tmp_path, chat_template="{{ messages[0]['content'] }}")
    again = tk.Tokenizer.from_file(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size, again.prefix_ids, again.suffix_ids) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.prefix_ids, tok.suffix_ids)
    assert again.special_tokens == tok.special_tokens
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages[0]['content'] }}"
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    for text in held_out[-6:] + [WITH_SPECIALS]:
        assert again.encode(text) == tok.encode(text)
    if fmt == "sentencepiece":
        return  # transformers 5 re-derives a tokenizer from tokenizer.model with its own whitespace rules
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in held_out[-6:]:
        assert reference(text).input_ids == tok.encode(text)
        assert reference.decode(tok.encode(text, add_special_tokens=False)) == text
