"""Tokenizers behind one interface: Llama 3's tiktoken file, SentencePiece models and Hugging Face tokenizer.json.

`Tokenizer.from_file` picks the format from the file's content, so the rest of the data pipeline never asks which
one it holds. `train_bpe` writes a small tokenizer in Llama 3's own format, so the tiny CPU job runs through the very
code path that the real 128K-token tokenizer uses.

Framing (which ids `encode` adds around a text) is decided here, once, from the tokenizer's own files, so that
generation, training data and evaluation frame text exactly as `transformers`' `tokenizer(text)` does:
- `tokenizer.json`: its post-processor decides (Llama 3 Hub repositories prepend `<|begin_of_text|>`; SmolLM2-style
  ones add nothing). Like transformers 5, `add_bos_token` / `add_eos_token` in `tokenizer_config.json` are then
  ignored: the post-processor is the single source of truth.
- Llama 3's tiktoken `tokenizer.model`: `<|begin_of_text|>` first, nothing after (Meta's own tokenizer.json).
- SentencePiece `.model`: `add_bos_token` / `add_eos_token` from a `tokenizer_config.json` beside it, else bos
  first and nothing after (the Llama 2 default).
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
from etils import epath
from sentencepiece import sentencepiece_model_pb2

from llama_jax.data import tiktoken_to_hf
from llama_jax.errors import DataError
from llama_jax.workdir import as_path, write_whole

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
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
_USAGE = ("give a tokenizer.model (Llama 3 tiktoken), *.model (SentencePiece) or tokenizer.json: in a training config "
          "as data.tokenizer=PATH, beside the weights of a checkpoint")


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
    bos_id: int | None  # None: the tokenizer has no beginning-of-sequence token (e.g. SmolLM2's)
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]
    prefix_ids: tuple[int, ...]  # the framing: ids `encode` puts before the text ...
    suffix_ids: tuple[int, ...]  # ... and after it

    def encode(self, text: str, *, add_special_tokens: bool = True, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, framed by the tokenizer's own rule unless `add_special_tokens=False`."""
        return self._frame(self._encode(text, allow_special), add_special_tokens)

    def encode_batch(
        self, texts: list[str], *, add_special_tokens: bool = True, allow_special: bool = False
    ) -> list[list[int]]:
        """Like `encode` on each text, but lets the library spread the work over threads outside the GIL."""
        return [self._frame(ids, add_special_tokens) for ids in self._encode_batch(texts, allow_special)]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Training documents: each text framed as `encode` frames it, then ended by eos.

        The trailing eos is what lets a model trained on packed documents learn where a document stops; it is
        added only when the framing does not end with eos already, so no document ever gets two.
        """
        ending = [] if self.suffix_ids[-1:] == (self.eos_id,) else [self.eos_id]
        return [ids + ending for ids in self.encode_batch(texts)]

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token (e.g. bos for a chat template), None for None."""
        return None if token_id is None else self._decode([token_id])

    def save_hf(self, directory: str | os.PathLike, *, chat_template: str | None = None) -> None:
        """Writes the tokenizer as Hugging Face files (`tokenizer.json` or `tokenizer.model`, `tokenizer_config.json`).

        `Tokenizer.from_file(directory)` gives this tokenizer back, and for a tiktoken or tokenizer.json tokenizer
        `AutoTokenizer.from_pretrained(directory)` encodes and frames text as it does. Not for SentencePiece:
        transformers 5 rebuilds a tokenizer from a `tokenizer.model` with its own whitespace rules, so newlines,
        runs of spaces and a leading space encode otherwise there.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in HF_TOKENIZER_FILES:  # an earlier export's files would shadow these (chat_template.jinja would)
            (directory / stale).unlink(missing_ok=True)
        config = self._write_hf_model(directory)
        config.update(
            bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id),
            pad_token=self.token_text(self.pad_id), clean_up_tokenization_spaces=False,  # decode gives the text back
        )
        if chat_template is not None:
            config["chat_template"] = chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

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
        """Loads any supported format; a directory is searched for the file names model repositories use. The path
        may be a URL (gs://...): every format is read as bytes, so nothing is downloaded to a file first."""
        path = _resolve(as_path(path))
        if path.suffix == ".json":
            return HFTokenizer(path)
        data = path.read_bytes()
        if not data:
            raise DataError(f"tokenizer file {path} is empty: {_USAGE}")
        if _TIKTOKEN_LINE.fullmatch(data.split(b"\n", 1)[0].strip()):
            return TiktokenTokenizer(_parse_tiktoken_ranks(data, path))
        return SentencePieceTokenizer(path)

    def _frame(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        return [*self.prefix_ids, *ids, *self.suffix_ids] if add_special_tokens else ids

    @abc.abstractmethod
    def _encode(self, text: str, allow_special: bool) -> list[int]: ...

    def _encode_batch(self, texts: list[str], allow_special: bool) -> list[list[int]]:
        return [self._encode(text, allow_special) for text in texts]

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def _write_hf_model(self, directory: Path) -> dict:
        """Writes the model file(s) into `directory`; returns the tokenizer_config.json entries they need."""


class TiktokenTokenizer(Tokenizer):
    """Llama 3's format: byte-level BPE ranks, Meta's split regex, and 256 specials numbered after the ranks."""

    def __init__(self, ranks: dict[bytes, int]):
        self._ranks = ranks
        self.special_tokens = llama3_special_tokens(len(ranks))
        self._enc = tiktoken.Encoding(
            name="llama3", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.prefix_ids, self.suffix_ids = (self.bos_id,), ()

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

    def _write_hf_model(self, directory: Path) -> dict:
        bos = self.token_text(self.bos_id)
        text = tiktoken_to_hf.tokenizer_json(self._ranks, self.special_tokens, LLAMA3_SPLIT_PATTERN, bos_token=bos)
        (directory / "tokenizer.json").write_text(text, encoding="utf-8")
        return {"tokenizer_class": "PreTrainedTokenizerFast"}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. Llama 2's). Its control and user-defined pieces are the special tokens.

    SentencePiece itself never produces control pieces from text and always produces user-defined ones, so
    `allow_special=True` splits the text on the special pieces here, and user-defined ones match even without it.
    A model without a pad piece (pad_id -1, as Llama 2's) pads with eos: padding is masked out of attention and
    loss, so the id only has to be a valid one.
    """

    def __init__(self, path: Path | epath.Path):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
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
        config = read_tokenizer_config(path.parent)
        self.prefix_ids = (self.bos_id,) if config.get("add_bos_token", True) else ()
        self.suffix_ids = (self.eos_id,) if config.get("add_eos_token", False) else ()

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

    def _write_hf_model(self, directory: Path) -> dict:
        (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bool(self.prefix_ids),
                "add_eos_token": bool(self.suffix_ids)}


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, as Llama 3 Hub repositories ship it (byte-level BPE + added tokens).

    bos/eos/pad come from a tokenizer_config.json next to the file when it names them, else from the usual token
    names. Pad falls back to `<|finetune_right_pad_id|>`, then to eos (see SentencePieceTokenizer for why that is
    safe). The framing is read off the file's post-processor by encoding a probe with and without it, which covers
    every kind of post-processor (template, Roberta, sequences of them) without interpreting any.
    """

    def __init__(self, path: Path | epath.Path):
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
        config = self.config = read_tokenizer_config(path.parent)  # beside the file; the chat template's tokens too

        def token_id(role: str, fallbacks: tuple[str, ...]) -> int | None:
            name = config.get(f"{role}_token")
            name = name.get("content") if isinstance(name, dict) else name  # older configs store an AddedToken
            if name is None:
                return next((vocab[n] for n in fallbacks if n in vocab), None)
            if name not in vocab:
                raise DataError(f"{config_path} names {role}_token {name!r}, which {path} lacks: fix the config")
            return vocab[name]

        bos, eos = token_id("bos", ("<|begin_of_text|>", "<s>")), token_id("eos", ("<|end_of_text|>", "</s>"))
        if eos is None:
            raise DataError(
                f"cannot tell the eos (end-of-sequence) token of {path}: write a tokenizer_config.json next to it "
                'with "eos_token" (and "bos_token", if it has one) set to tokens of its vocabulary'
            )
        pad = token_id("pad", ("<|finetune_right_pad_id|>",))
        self.bos_id, self.eos_id, self.pad_id = bos, eos, eos if pad is None else pad
        self.vocab_size = max(vocab.values()) + 1
        self.prefix_ids, self.suffix_ids = _post_processor_framing(self._plain)

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

    def _write_hf_model(self, directory: Path) -> dict:
        (directory / "tokenizer.json").write_text(self._tok.to_str(), encoding="utf-8")
        return {key: value for key, value in self.config.items() if key != "chat_template"}


def _post_processor_framing(tok: tokenizers.Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix) ids that `tok`'s post-processor puts around a single text."""
    probe = "a"
    plain = tok.encode(probe, add_special_tokens=False).ids
    framed = tok.encode(probe, add_special_tokens=True).ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return tuple(framed[:start]), tuple(framed[start + len(plain) :])
    raise DataError("the tokenizer.json post-processor changes the text's own tokens; llama_jax supports only "
                    "post-processors that add tokens around the text")


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
    byte_of_char = {c: b for b, c in tiktoken_to_hf.gpt2_bytes_to_unicode().items()}
    vocab = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    if len(vocab) == 256:
        raise DataError("train_bpe learnt no merges: the training texts are empty; check the data source")
    lines = [f"{base64.b64encode(bytes(byte_of_char[c] for c in token)).decode()} {rank}\n" for token, rank in vocab]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, "".join(lines))  # readers never see a half-written file
    return Tokenizer.from_file(path)


def tokenizer_files(path: str | os.PathLike) -> list[Path | epath.Path]:
    """The files that make up the tokenizer at `path`: the model file first, then the `tokenizer_config.json` and
    `chat_template.jinja` beside it when present (they set framing, special tokens and the chat template), so that
    copying them carries the tokenizer whole. A URL gives `epath.Path`s."""
    model_file = _resolve(as_path(path))
    siblings = [model_file.parent / name for name in ("tokenizer_config.json", "chat_template.jinja")]
    return [model_file, *(f for f in siblings if f.is_file())]


def _resolve(path: Path | epath.Path) -> Path | epath.Path:
    """The tokenizer file of `path`. In a directory tokenizer.json comes first, since it is what transformers uses
    where a repository has both (Llama 2's ship a SentencePiece tokenizer.model beside it)."""
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
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


def read_tokenizer_config(directory: Path) -> dict:
    """The tokenizer_config.json in `directory` ({} when there is none), which several tokenizer rules read."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}): fix or delete it") from None
