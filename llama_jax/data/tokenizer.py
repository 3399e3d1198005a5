"""Tokenizers behind one interface: Llama 3's tiktoken file, SentencePiece models and Hugging Face tokenizer.json.

`Tokenizer.from_file` picks the format from the file's content, so the rest of the data pipeline never asks which
one it holds. `train_bpe` writes a small tokenizer in Llama 3's own format, so the tiny CPU job runs through the very
code path that the real 128K-token tokenizer uses.
"""

from __future__ import annotations

import abc
import base64
import itertools
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece
import tiktoken
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from llama_jax.errors import DataError

# Meta's pre-tokenizer regex for Llama 3 (llama3/tokenizer.py), character for character.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_LLAMA3_SPECIAL_TOKENS = 256

# tiktoken's regex engine overflows its stack on whitespace runs of about a million characters and raises a
# PanicException, which `except Exception` does not catch. Meta cuts runs longer than this before encoding; so do we.
_MAX_WHITESPACE_RUN = 25_000
_LONG_WHITESPACE = re.compile(rf"(?<!\s)\s{{{_MAX_WHITESPACE_RUN},}}")
_EIGHT_WHITESPACE = re.compile(r"\s{8}")
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")
_USAGE = "pass data.tokenizer=PATH to a tokenizer.model (Llama 3 tiktoken), *.model (SentencePiece) or tokenizer.json"


def llama3_special_tokens(num_regular: int = 128000) -> dict[str, int]:
    """The 256 special tokens exactly as Meta's Llama 3.1 tokenizer numbers them, after `num_regular` BPE ranks."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_LLAMA3_SPECIAL_TOKENS - len(names))]
    return {name: num_regular + i for i, name in enumerate(names)}


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses wrap one library each; callers only see this interface.

    `vocab_size` is the number of embedding rows the tokenizer needs (largest id + 1, specials included).
    With `allow_special=False` (the default for training data) a special token's text, say "<|eot_id|>" inside a
    web page, is encoded as ordinary text, so documents cannot forge control tokens.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        return self._frame(self._encode(text, allow_special), bos, eos)

    def encode_batch(
        self, texts: list[str], *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """Like `encode` on each text, but lets the library spread the work over threads outside the GIL."""
        return [self._frame(ids, bos, eos) for ids in self._encode_batch(texts, allow_special)]

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens come back as their text, so encode(allow_special=True) then decode gives the input back."""
        ids = [int(i) for i in ids]  # accepts numpy arrays, which the libraries reject
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(
                f"token id {bad[0]} is outside this tokenizer's vocabulary (size {self.vocab_size}): the ids come "
                "from a model trained with a different tokenizer; pass the tokenizer the model was trained with"
            )
        return self._decode(ids)

    @staticmethod
    def from_file(path: str | os.PathLike) -> Tokenizer:
        """Loads any supported format; a directory is searched for the file names model repositories use."""
        path = _resolve(Path(path))
        if path.suffix == ".json":
            return HFTokenizer(path)
        data = path.read_bytes()
        if not data:
            raise DataError(f"tokenizer file {path} is empty: {_USAGE}")
        if _TIKTOKEN_LINE.fullmatch(data.split(b"\n", 1)[0].strip()):
            return TiktokenTokenizer(_parse_tiktoken_ranks(data, path))
        return SentencePieceTokenizer(path)

    def _frame(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    @abc.abstractmethod
    def _encode(self, text: str, allow_special: bool) -> list[int]: ...

    def _encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        return [self._encode(text, allow_special) for text in texts]

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...


class TiktokenTokenizer(Tokenizer):
    """Llama 3's format: byte-level BPE ranks, Meta's split regex, and 256 specials numbered after the ranks."""

    def __init__(self, ranks: dict[bytes, int]):
        self.special_tokens = llama3_special_tokens(len(ranks))
        self._enc = tiktoken.Encoding(
            name="llama3", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return _concat([self._enc.encode(piece, allowed_special="all") for piece in _cut_long_whitespace(text)])
        return _concat([self._enc.encode_ordinary(piece) for piece in _cut_long_whitespace(text)])

    def _encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        pieces = [_cut_long_whitespace(text) for text in texts]
        flat = [piece for text_pieces in pieces for piece in text_pieces]
        if allow_special:
            encoded = iter(self._enc.encode_batch(flat, allowed_special="all"))
        else:
            encoded = iter(self._enc.encode_ordinary_batch(flat))
        return [_concat([next(encoded) for _ in text_pieces]) for text_pieces in pieces]

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. Llama 2's). Its control and user-defined pieces are the special tokens.

    SentencePiece itself never produces control pieces from text and always produces user-defined ones, so
    `allow_special=True` splits the text on the special pieces here, and user-defined ones match even without it.
    A model without a pad piece (pad_id -1, as Llama 2's) pads with eos: padding is masked out of attention and
    loss, so the id only has to be a valid one.
    """

    def __init__(self, path: Path):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise DataError(
                f"tokenizer file {path} is neither a Llama 3 tiktoken file (lines 'base64 rank') nor a SentencePiece "
                f"model ({e}): {_USAGE}"
            ) from None
        proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
        kinds = (proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED)
        self.special_tokens = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in kinds}
        self._control = {i: p.piece for i, p in enumerate(proto.pieces) if p.type == proto.SentencePiece.CONTROL}
        self._special_re = _alternation(self.special_tokens)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(
                f"SentencePiece model {path} has no bos or eos piece: retrain it with bos_id/eos_id set "
                "(spm_train --bos_id=1 --eos_id=2)"
            )
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special or self._special_re is None:
            return self._sp.encode(text)
        ids = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:  # split() puts the captured special tokens at odd positions
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def _encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        if allow_special:
            return super()._encode_batch(texts, allow_special)
        return self._sp.encode(texts, num_threads=os.cpu_count())

    def _decode(self, ids: list[int]) -> str:
        # sp.decode drops control pieces; decode the stretches between them and put their text back in.
        parts, start = [], 0
        for k, i in enumerate(ids):
            if i in self._control:
                parts += [self._sp.decode(ids[start:k]), self._control[i]]
                start = k + 1
        parts.append(self._sp.decode(ids[start:]))
        return "".join(parts)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, as Llama 3 Hub repositories ship it (byte-level BPE + added tokens).

    bos/eos/pad come from a tokenizer_config.json next to the file when it names them, else from the usual token
    names. Pad falls back to `<|finetune_right_pad_id|>`, then to eos (see SentencePieceTokenizer for why that is
    safe). Ids are never added implicitly: the file's post-processor (which prepends bos) is bypassed.
    """

    def __init__(self, path: Path):
        try:
            text = path.read_text(encoding="utf-8")
            self._tok = tokenizers.Tokenizer.from_str(text)
            self._plain = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise DataError(f"{path} is not a valid Hugging Face tokenizer.json ({e}): {_USAGE}") from None
        self._plain.encode_special_tokens = True  # specials' text is encoded as ordinary text
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        config_path = path.parent / "tokenizer_config.json"
        config = _read_json(config_path)

        def token_id(role: str, fallbacks: tuple[str, ...]) -> int | None:
            name = config.get(f"{role}_token")
            name = name.get("content") if isinstance(name, dict) else name  # older configs store an AddedToken
            if name is None:
                return next((vocab[n] for n in fallbacks if n in vocab), None)
            if name not in vocab:
                raise DataError(f"{config_path} names {role}_token {name!r}, which {path} lacks: fix the config")
            return vocab[name]

        bos, eos = token_id("bos", ("<|begin_of_text|>", "<s>")), token_id("eos", ("<|end_of_text|>", "</s>"))
        if bos is None or eos is None:
            raise DataError(
                f"cannot tell the bos/eos tokens of {path}: write a tokenizer_config.json next to it with "
                '"bos_token" and "eos_token" set to tokens of its vocabulary'
            )
        pad = token_id("pad", ("<|finetune_right_pad_id|>",))
        self.bos_id, self.eos_id, self.pad_id = bos, eos, eos if pad is None else pad
        self.vocab_size = max(vocab.values()) + 1

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plain.encode_special_tokens = True  # tokenizers does not pickle this flag

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        return (self._tok if allow_special else self._plain).encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        tok = self._tok if allow_special else self._plain
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """Trains a byte-level BPE on `texts` and writes it in Llama 3's tiktoken format at `path`.

    The Hugging Face trainer is used because it is fast (Rust, parallel); the result is converted so that it loads
    through `TiktokenTokenizer`, exactly like Llama 3's tokenizer.model. `vocab_size` counts the 256 special tokens;
    if the texts run out of pairs to merge, the vocabulary comes out smaller (the returned `vocab_size` is the truth).
    The same texts give the same file byte for byte.
    """
    num_regular = vocab_size - NUM_LLAMA3_SPECIAL_TOKENS
    if num_regular <= 256:
        raise DataError(
            f"vocab_size={vocab_size} is too small: it counts 256 byte tokens, 256 special tokens and the merges, so "
            "it must exceed 512 (use 1024 or more)"
        )
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"), byte_level]
    )
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=num_regular, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer)
    # The trainer numbers the 256 bytes first and then each merge in the order it was learnt: exactly BPE ranks.
    byte_of_char = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    vocab = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    if len(vocab) == 256:
        raise DataError("train_bpe learnt no merges: the training texts are empty; check the data source")
    lines = [f"{base64.b64encode(bytes(byte_of_char[c] for c in token)).decode()} {rank}\n" for token, rank in vocab]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # readers never see a half-written file
    tmp.write_text("".join(lines), encoding="ascii")
    os.replace(tmp, path)
    return Tokenizer.from_file(path)


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json", "original/tokenizer.model"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"directory {path} holds no tokenizer.model or tokenizer.json: {_USAGE}")
    if not path.is_file():
        raise DataError(f"tokenizer file {path} not found: {_USAGE}")
    return path


def _parse_tiktoken_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """Reads `base64(token) rank` lines, refusing files tiktoken would load but mis-encode or crash on."""
    ranks = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise DataError(
                f"{path} line {number} is not 'base64(token) rank': the tiktoken file is corrupt; {_USAGE}"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path} has duplicate or missing ranks (they must be 0..N-1 once each): the file is corrupt")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"{path} lacks {len(missing)} of the 256 single bytes (e.g. {missing[0]}), so some text cannot be encoded: "
            "use a byte-level BPE file such as Llama 3's tokenizer.model or one written by train_bpe"
        )
    return ranks


def _cut_long_whitespace(text: str) -> list[str]:
    """Splits whitespace runs longer than _MAX_WHITESPACE_RUN, which tiktoken cannot encode in one piece."""
    # Such a run covers at least 8 consecutive characters of text[::run // 8]: screening those first costs ~1% of
    # a full regex scan, which alone would take a third of the encoding time.
    if not _EIGHT_WHITESPACE.search(text[:: _MAX_WHITESPACE_RUN // 8]):
        return [text]
    cuts = [
        cut
        for run in _LONG_WHITESPACE.finditer(text)
        for cut in range(run.start() + _MAX_WHITESPACE_RUN, run.end(), _MAX_WHITESPACE_RUN)
    ]
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def _concat(lists: list[list[int]]) -> list[int]:
    return lists[0] if len(lists) == 1 else list(itertools.chain.from_iterable(lists))


def _alternation(tokens: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of `tokens` (longest first, so no token shadows a longer one), captured for split()."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}): fix or delete it") from None


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which Hugging Face byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
