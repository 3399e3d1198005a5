"""Decoding settings as a checkpoint's own files state them, so llama_jax stops and samples where transformers would.

A Llama 3.x Instruct checkpoint stops on any of three ids (`<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`) and samples
at temperature 0.6, top-p 0.9; none of that is in the weights or the tokenizer, only in `generation_config.json`.
Each setting is taken from the first of these that has it, and `origin` records which one did:
  1. a command-line flag (applied by the caller with `override`);
  2. `generation_config.json`;
  3. `config.json` (`eos_token_id`, `bos_token_id`, `pad_token_id`: transformers derives its generation config
     from these when there is no generation_config.json);
  4. the tokenizer: stop on its eos, plus `<|eom_id|>` and `<|eot_id|>` when it has them (Llama 3's turn ends);
     and transformers' own defaults: greedy (`do_sample` false); when sampling, temperature 1.0, top-k 50, top-p 1.0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from etils import epath

from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import CheckpointError, ConfigError

FILE_NAME = "generation_config.json"
_TURN_ENDS = ("<|eom_id|>", "<|eot_id|>")
_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
_FLAG_RANGES = {"temperature": lambda t: t >= 0, "top_k": lambda k: k >= 0, "top_p": lambda p: 0 < p <= 1}
_SAMPLING_TYPES = {"do_sample": (bool,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float)}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    stop_ids: tuple[int, ...]
    bos_id: int | None
    pad_id: int | None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0 keeps every token
    top_p: float = 1.0
    origin: dict[str, str] = dataclasses.field(default_factory=dict)  # setting -> where its value came from
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # other generation_config.json keys, kept on export

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> GenerationSettings:
        """What a checkpoint without generation files gets (our own training runs)."""
        turn_ends = [tokenizer.special_tokens[name] for name in _TURN_ENDS if name in tokenizer.special_tokens]
        stop_ids = tuple(dict.fromkeys([tokenizer.eos_id, *turn_ends]))
        return cls(stop_ids, tokenizer.bos_id, tokenizer.pad_id,
                   origin={name: "tokenizer" for name in ("stop_ids", "bos_id", "pad_id")}
                   | {name: "default" for name in _SAMPLING_DEFAULTS})

    @classmethod
    def from_directory(cls, directory: str | Path, tokenizer: Tokenizer) -> GenerationSettings:
        """The settings of a Hugging Face directory: generation_config.json, then config.json, then the tokenizer."""
        directory = Path(directory)
        settings = cls.for_tokenizer(tokenizer)
        config = _read(directory / "config.json")
        generation = _read(directory / FILE_NAME)
        for source, name in ((config, "config.json"), (generation, FILE_NAME)):  # later sources win
            settings = settings._updated(source, name, sampling=source is generation)
        known = {"eos_token_id", "bos_token_id", "pad_token_id", *_SAMPLING_DEFAULTS, "transformers_version"}
        return dataclasses.replace(settings, extra={k: v for k, v in generation.items() if k not in known})

    def override(self, **flags: Any) -> GenerationSettings:
        """Command-line values; None leaves a setting as it is. A temperature of 0 means greedy, above 0 sampling.
        A value out of range is refused even where greedy decoding would not use it: a typo is never ignored."""
        given = {name: value for name, value in flags.items() if value is not None}
        wrong = [f"--{name} {given[name]}" for name, fits in _FLAG_RANGES.items()
                 if name in given and not fits(given[name])]
        if wrong:
            raise ConfigError(f"{' and '.join(wrong)} out of range: need --temperature >= 0 (0 = greedy), --top_k >= 0 "
                              "and 0 < --top_p <= 1")
        if "temperature" in given:
            given["do_sample"] = given["temperature"] > 0
            if not given["do_sample"]:
                del given["temperature"]
        origin = self.origin | {name: "command line" for name in given}
        settings = dataclasses.replace(self, **given, origin=origin)
        unused = [f"--{name}" for name in ("top_k", "top_p") if name in given]
        if unused and not settings.do_sample:
            verb = "apply" if len(unused) > 1 else "applies"
            raise ConfigError(f"{' and '.join(unused)} {verb} to sampling, and these settings decode greedily "
                              f"(do_sample from {settings.origin['do_sample']}): add --temperature above 0 to sample")
        return settings

    @property
    def sampling(self) -> dict[str, float | int]:
        """The keyword arguments of `generate` these settings stand for."""
        if not self.do_sample:
            return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def describe(self) -> str:
        """One line for the console: each setting in use and where it came from."""
        if self.do_sample:
            decoding = (f"sampling: temperature {self.temperature} ({self.origin['temperature']}), top-k {self.top_k} "
                        f"({self.origin['top_k']}), top-p {self.top_p} ({self.origin['top_p']})")
        else:
            decoding = f"greedy ({self.origin['do_sample']})"
        return f"generation: {decoding}; stop on ids {list(self.stop_ids)} ({self.origin['stop_ids']})"

    def token_ids(self) -> dict[str, Any]:
        """bos and eos (the stop ids) as config.json and generation_config.json state them: readers of config.json
        alone (transformers' `model.config`) take its defaults, bos 1 and eos 2, where they are missing. Not pad:
        in config.json transformers makes it the embedding's padding row, whose gradient it zeroes."""
        return {"bos_token_id": self.bos_id,
                "eos_token_id": self.stop_ids[0] if len(self.stop_ids) == 1 else list(self.stop_ids)}

    def to_hf(self) -> dict[str, Any]:
        """The generation_config.json that makes transformers decode as these settings do."""
        out: dict[str, Any] = {**self.extra, **self.token_ids()}
        if self.pad_id is not None:
            out["pad_token_id"] = self.pad_id
        out["do_sample"] = self.do_sample
        if self.do_sample:
            out.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return out

    def _updated(self, source: dict, name: str, *, sampling: bool) -> GenerationSettings:
        changes: dict[str, Any] = {}
        if source.get("eos_token_id") is not None:
            eos = source["eos_token_id"]
            changes["stop_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
        for key, field in (("bos_token_id", "bos_id"), ("pad_token_id", "pad_id")):
            if source.get(key) is not None:
                changes[field] = source[key]
        if sampling:
            changes |= {key: source[key] for key in _SAMPLING_DEFAULTS if source.get(key) is not None}
        _check(changes, name)
        return dataclasses.replace(self, **changes, origin=self.origin | dict.fromkeys(changes, name))


def file_for_copy(directory: Path | epath.Path) -> bytes | None:
    """The generation_config.json for a copy of a Hugging Face directory's model into a llama_jax run (a conversion,
    a fine-tuning run), which keeps no config.json: the directory's own, or else the token ids its config.json
    states, from which transformers derives its generation settings when there is no generation_config.json and
    which the copy would otherwise lose (its stop ids would be the tokenizer's). None when it has neither."""
    generation = directory / FILE_NAME
    if generation.is_file():
        return generation.read_bytes()
    config = _read(directory / "config.json")
    ids = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None}
    return (json.dumps(ids, indent=2) + "\n").encode() if ids else None


def _check(changes: dict[str, Any], source: str) -> None:
    mistyped = [f"{key}={changes[key]!r}" for key, types in _SAMPLING_TYPES.items() if key in changes
                and (not isinstance(changes[key], types) or isinstance(changes[key], bool) and bool not in types)]
    if mistyped:
        raise CheckpointError(f"{source}: {', '.join(mistyped)}: do_sample must be true or false, temperature and "
                              "top_p numbers and top_k a whole number; fix the file")
    stop_ids = changes.get("stop_ids", (0,))
    if not stop_ids or not all(isinstance(i, int) and i >= 0 for i in stop_ids):
        raise CheckpointError(f"{source}: eos_token_id must be a token id or a list of them, got {list(stop_ids)}")
    if not 0 <= changes.get("temperature", 1.0) or not 0 < changes.get("top_p", 1.0) <= 1 or changes.get("top_k", 0) < 0:
        raise CheckpointError(f"{source}: need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; fix the file")


def _read(path: Path | epath.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or re-save the checkpoint") from None
