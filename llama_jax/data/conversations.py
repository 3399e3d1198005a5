"""Post-training examples (SFT conversations, DPO preference pairs) from JSON Lines files (.jsonl, compressed as
.jsonl.gz or .jsonl.zst) or Parquet files, whose rows are read as the same records: datasets on the Hugging Face Hub
come as Parquet (UltraFeedback, UltraChat), and gzipped JSON Lines (Anthropic HH).

Real post-training data is messy: a scraped or generated file always has a few lines with a typo, a missing field or
an unknown role. Stopping a run for one such line wastes the run; dropping lines silently hides a broken file. So a
bad line is skipped and counted with its file:line, the counts are printed once at the end, and a file with no
usable line at all is a `DataError`, because that is a wrong format rather than noise.

Tokens and loss masks come from `ChatFormat.render_with_mask`, so a model is trained on exactly the layout it is
prompted with at generation time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
from etils import epath

from llama_jax.data.chat import LLAMA3_ROLES, ChatFormat, Message
from llama_jax.data.documents import RECORD_SUFFIXES, NotUtf8, json_line, list_files, read_records
from llama_jax.errors import DataError

_MESSAGES_EXAMPLE = ('{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
                     "(or ShareGPT's conversations, TRL's prompt and completion, Alpaca's instruction and output)")
_PREFERENCE_EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
_PROMPT_EXAMPLE = '{"prompt": "..."}'
_Record = TypeVar("_Record")
_TRANSCRIPT_START = "\n\nHuman:"
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool", "user": "user",
                   "assistant": "assistant"}


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing arrays field by field has no truth value
class SFTExample:
    """One conversation for supervised fine-tuning.

    `loss_mask` is 1 on exactly the tokens the model must learn to produce: each assistant message's content and its
    end token. The prompt side (bos, headers, system, user and tool turns) is context the model is given, not text
    it should learn to write, so the Llama 3 recipe masks it from the loss.
    """

    tokens: np.ndarray  # uint32 [n]
    loss_mask: np.ndarray  # uint8 [n]


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceExample:
    """A prompt with a preferred and a dispreferred response, for DPO.

    Both sequences begin with exactly `prompt_tokens`, so a DPO loss compares the log-probabilities of the responses
    alone. The DPO masks leave out headers and end tokens, as the Llama 3 recipe does: both responses share them, so
    they only add noise to the preference margin. The chosen response's extra NLL term (0.2 x NLL in the recipe)
    must still teach the model to stop, so `chosen_nll_mask` keeps the end tokens.
    """

    prompt_tokens: np.ndarray  # uint32 [p]: the prompt with the assistant's generation header
    chosen_tokens: np.ndarray  # uint32 [c]: prompt + chosen response
    rejected_tokens: np.ndarray  # uint32 [r]: prompt + rejected response
    chosen_mask: np.ndarray  # uint8 [c]: the chosen response's assistant contents
    rejected_mask: np.ndarray  # uint8 [r]: the rejected response's assistant contents
    chosen_nll_mask: np.ndarray  # uint8 [c]: the chosen response's assistant contents and end tokens
    rejected_nll_mask: np.ndarray  # uint8 [r]: the same for the rejected response (what a prepared store keeps)


@dataclasses.dataclass
class SkipReport:
    """What was skipped and why, with the first few places of each reason, so a user can open the file there."""

    max_examples: ClassVar[int] = 3  # per reason: enough to find the pattern, few enough to read
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        places = self.examples.setdefault(reason, [])
        if len(places) < self.max_examples:
            places.append(f"{where} ({detail})")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"skipped {self.total} post-training records:"]
        for reason, count in self.counts.most_common():
            lines.append(f"  {reason}: {count}, e.g. " + "; ".join(self.examples[reason]))
        return "\n".join(lines)


class _BadLine(Exception):
    """A line that cannot be used; raised by the parsers so that reading stays one loop."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def read_conversations(
    path_or_pattern: str | os.PathLike, *, report: SkipReport | None = None
) -> Iterator[list[Message]]:
    """Conversations from JSON Lines in the common `messages` format, in sorted file order.

    The files are found now, so a wrong path fails at the call rather than deep inside a data pipeline. With
    `report=None` the skips are printed to stderr at the end; pass a report to collect several stages' skips
    (reading, then `sft_examples`) and print them once.
    """
    return _read(_files(path_or_pattern), _conversation, _MESSAGES_EXAMPLE, report)


def read_preferences(
    path_or_pattern: str | os.PathLike, *, report: SkipReport | None = None
) -> Iterator[tuple[list[Message], list[Message], list[Message]]]:
    """(prompt, chosen, rejected) message lists from lines {"prompt": ..., "chosen": ..., "rejected": ...}.

    Each field is a messages list or a string; a string prompt is one user message and a string response one
    assistant message, because most preference data is single-turn and written that way. "chosen" and "rejected" may
    also be whole conversations that begin with the prompt (see `_preference`). Bad lines are handled as in
    `read_conversations`.
    """
    return _read(_files(path_or_pattern), _preference, _PREFERENCE_EXAMPLE, report)


def read_prompts(path: Path | epath.Path, *, report: SkipReport | None = None) -> Iterator[list[Message]]:
    """Prompts as message lists from lines {"prompt": ...}: a string is one user message, a messages list the
    conversation so far. Bad lines are handled as in `read_conversations`."""
    return _read([path], _prompt, _PROMPT_EXAMPLE, report)


def sft_example(fmt: ChatFormat, messages: list[Message]) -> SFTExample:
    """The conversation's tokens, with the loss on the assistant's turns only."""
    ids, mask = fmt.render_with_mask(messages)
    if not any(mask):
        raise DataError(
            "the conversation has no assistant turn, so SFT has nothing to learn from it: add the assistant's reply"
        )
    return SFTExample(np.asarray(ids, np.uint32), np.asarray(mask, np.uint8))


def preference_example(
    fmt: ChatFormat, prompt: list[Message], chosen: list[Message], rejected: list[Message]
) -> PreferenceExample:
    """Both responses rendered after the same prompt, with the DPO and NLL masks of the Llama 3 recipe."""
    prompt_ids = fmt.render_ids(prompt, add_generation_prompt=True)
    chosen_ids, chosen_nll = _response(fmt, prompt_ids, prompt, chosen)
    rejected_ids, rejected_nll = _response(fmt, prompt_ids, prompt, rejected)
    return PreferenceExample(
        prompt_tokens=np.asarray(prompt_ids, np.uint32),
        chosen_tokens=np.asarray(chosen_ids, np.uint32),
        rejected_tokens=np.asarray(rejected_ids, np.uint32),
        chosen_mask=without_end_tokens(chosen_nll),
        rejected_mask=without_end_tokens(rejected_nll),
        chosen_nll_mask=chosen_nll,
        rejected_nll_mask=rejected_nll,
    )


def sft_examples(
    fmt: ChatFormat,
    conversations: Iterable[list[Message]],
    *,
    max_tokens: int | None = None,
    report: SkipReport | None = None,
) -> Iterator[SFTExample]:
    """SFT examples; a conversation longer than `max_tokens` is skipped and counted.

    Cutting a long conversation would train the model on an answer that stops mid-sentence without its end token,
    which teaches it to ramble; skipping loses one example and keeps the rest honest.
    """
    own_report = report is None
    report = SkipReport() if report is None else report
    kept, shortest_skipped = 0, None
    for index, messages in enumerate(conversations):
        example = sft_example(fmt, messages)
        length = len(example.tokens)
        if max_tokens is not None and length > max_tokens:
            report.skip("longer than max_tokens", f"conversation {index}", f"{length} tokens > {max_tokens}")
            shortest_skipped = length if shortest_skipped is None else min(shortest_skipped, length)
            continue
        kept += 1
        yield example
    if shortest_skipped is not None and not kept:
        raise DataError(
            f"every conversation is longer than max_tokens={max_tokens} (the shortest has {shortest_skipped} tokens): "
            "raise max_tokens (the sequence length) or use shorter conversations"
        )
    if own_report:
        _print_skips(report)


def _files(path_or_pattern: str | os.PathLike) -> list[epath.Path]:
    """The files a chat or preference source names, listed as a raw-text source's are (a file, a glob, local or
    remote); a directory gives its .jsonl and Parquet files, recursively, since its other files hold no records."""
    pattern = os.fspath(path_or_pattern)
    files = list_files(pattern)
    if not epath.Path(pattern).is_dir():
        return files
    records = [f for f in files if f.name.lower().endswith(RECORD_SUFFIXES)]
    if not records:
        raise DataError(f"{pattern} holds no {' '.join(RECORD_SUFFIXES)} file: write the conversations as JSON "
                        "lines or Parquet, or name the files with a glob")
    return records


def _read(
    paths: list[Path | epath.Path], parse: Callable[[dict], _Record], example: str, report: SkipReport | None
) -> Iterator[_Record]:
    own_report = report is None
    report = SkipReport() if report is None else report
    for path in paths:
        yield from _read_file(path, parse, example, report)
    if own_report:
        _print_skips(report)


def _read_file(
    path: Path | epath.Path, parse: Callable[[dict], _Record], example: str, report: SkipReport
) -> Iterator[_Record]:
    """The records of one file. A file with none is an error even beside good files: it is in the wrong format."""
    kept, first_bad = 0, None
    for where, raw in read_records(path):
        try:
            record = parse(raw if isinstance(raw, dict) else _json_object(raw))
        except _BadLine as bad:
            report.skip(bad.reason, where, bad.detail)
            first_bad = first_bad or f"{where}: {bad.reason} ({bad.detail})"
            continue
        kept += 1
        yield record
    if not kept:
        found = f"the first bad record is {first_bad}" if first_bad else "it has no records"
        raise DataError(f"{path} holds no usable record ({found}): write one JSON object per line, like {example}, "
                        "or Parquet rows with those columns")


def _json_object(line: bytes) -> dict:
    try:
        value = json_line(line)
    except NotUtf8 as e:
        raise _BadLine("not UTF-8", str(e)) from None
    except json.JSONDecodeError as e:
        raise _BadLine("invalid JSON", f"{e.msg} at column {e.colno}") from None
    if not isinstance(value, dict):
        raise _BadLine("not a JSON object", f"a JSON {type(value).__name__}")
    return value


def _conversation(record: dict) -> list[Message]:
    """The forms SFT data comes in, as TRL and Axolotl read them: `messages` (OpenAI's, TRL's conversational),
    ShareGPT's `conversations` of {"from", "value"}, TRL's `prompt` + `completion`, and Alpaca's `instruction`
    (+ `input`) + `output`."""
    if "messages" in record or not any(key in record for key in ("conversations", "completion", "instruction")):
        messages = _messages(record.get("messages"), "messages")
    elif "conversations" in record:
        messages = _messages(_sharegpt(record["conversations"]), "conversations")
    elif "completion" in record:
        messages = [*_field(record, "prompt", "user"), *_field(record, "completion", "assistant")]
    else:
        messages = _alpaca(record)
    if not any(message["role"] == "assistant" for message in messages):
        raise _BadLine("no assistant message", "nothing for the model to learn")
    return messages


def _sharegpt(turns: object) -> object:
    """ShareGPT's turns as messages; turns that already are messages, or are malformed, as they are (`_messages`
    checks them)."""
    if not isinstance(turns, list) or not all(isinstance(turn, dict) and "from" in turn for turn in turns):
        return turns
    return [{"role": _SHAREGPT_ROLES.get(turn["from"], turn["from"]), "content": turn.get("value")} for turn in turns]


def _alpaca(record: dict) -> list[Message]:
    """Alpaca's instruction, with its input (when not empty) after a blank line, as the user's message."""
    parts = [record.get("instruction"), record.get("input") or ""]
    if not all(isinstance(part, str) for part in parts) or not parts[0]:
        raise _BadLine("missing or empty messages", "'instruction' is not a non-empty string")
    return [{"role": "user", "content": "\n\n".join(part for part in parts if part)},
            *_field(record, "output", "assistant")]


def _prompt(record: dict) -> list[Message]:
    return _field(record, "prompt", "user")


def _preference(record: dict) -> tuple[list[Message], list[Message], list[Message]]:
    """Either the prompt apart, or two whole conversations that begin with it (TRL's conversational form, as in
    Anthropic HH and UltraFeedback, or HH's own transcripts): the messages both begin with are the prompt. A "prompt"
    beside such conversations (UltraFeedback has one) must be how they begin."""
    chosen, rejected = _field(record, "chosen", "assistant"), _field(record, "rejected", "assistant")
    shared = _shared_prefix(chosen, rejected)
    if not shared:
        prompt = _field(record, "prompt", "user")
    else:
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if "prompt" in record:
            given = _field(record, "prompt", "user")
            if _plain(given) != _plain(prompt[-len(given):]):
                raise _BadLine("prompt differing from the conversations' beginning",
                               f"'prompt' is not how 'chosen' and 'rejected' begin: {prompt[-1]['content'][:40]!r}")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if response[0]["role"] != "assistant":
            raise _BadLine("response not starting with an assistant message", f"{name}[0] is {response[0]['role']!r}")
    if _plain(chosen) == _plain(rejected):  # a margin of zero whatever the model: nothing to learn, a constant loss
        raise _BadLine("the same response chosen and rejected", "'chosen' equals 'rejected'")
    return prompt, chosen, rejected


def _shared_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    """How many messages both conversations begin with, leaving each its last one (the response)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and _plain([chosen[n]]) == _plain([rejected[n]]):
        n += 1
    return n


def _plain(messages: list[Message]) -> list[tuple[str, str]]:
    return [(message["role"], message["content"]) for message in messages]


def _field(record: dict, name: str, role_of_text: str) -> list[Message]:
    value = record.get(name)
    if isinstance(value, str):
        return _transcript(value) or [{"role": role_of_text, "content": value}]
    return _messages(value, name)


def _transcript(text: str) -> list[Message] | None:
    """The messages of a conversation written as Anthropic's HH-RLHF stores it, "\n\nHuman: ...\n\nAssistant: ...", or
    None for other text: such a string is a whole conversation, not one message. A last "Assistant:" with nothing
    after it (how HH-style prompts end, with the reply in another field) is the cue for the reply, not a message: kept,
    it was an empty assistant turn, whose end token SFT trained on right after the assistant's header."""
    if not text.startswith(_TRANSCRIPT_START):
        return None
    parts = _TRANSCRIPT_TURN.split(text)  # ["", "Human", text, "Assistant", text, ...]
    messages = [{"role": _TRANSCRIPT_ROLES[speaker], "content": content.strip()}
                for speaker, content in zip(parts[1::2], parts[2::2])]
    if len(messages) > 1 and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    return messages


def _messages(value: object, name: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _BadLine("missing or empty messages", f"{name!r} is not a non-empty list")
    for k, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadLine("malformed message", f"{name}[{k}] lacks a string 'role' or 'content'")
        if message["role"] not in LLAMA3_ROLES:
            known = ", ".join(LLAMA3_ROLES)
            raise _BadLine("unknown role", f"{name}[{k}] has role {message['role']!r}, not one of {known}")
    return value


def _response(
    fmt: ChatFormat, prompt_ids: list[int], prompt: list[Message], response: list[Message]
) -> tuple[list[int], np.ndarray]:
    """(prompt + response ids, mask of the response's assistant turns with their end tokens)."""
    ids, mask = fmt.render_with_mask([*prompt, *response])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the prompt's tokens (with the assistant header) do not begin the rendered prompt + response, so DPO "
            "could not compare the responses alone: start each response with an assistant message, and use a chat "
            "template that renders earlier turns the same whatever follows them"
        )
    response_mask = np.asarray(mask, np.uint8)
    response_mask[: len(prompt_ids)] = 0  # the prompt's own assistant turns are context here
    return ids, response_mask


def without_end_tokens(mask: np.ndarray) -> np.ndarray:
    """The mask without the last token of each run: `render_with_mask` ends every assistant turn with its end token."""
    run_ends = (mask == 1) & (np.append(mask[1:], 0) == 0)
    return np.where(run_ends, 0, mask).astype(np.uint8)


def _print_skips(report: SkipReport) -> None:
    if report.total:
        print(report.summary(), file=sys.stderr, flush=True)
