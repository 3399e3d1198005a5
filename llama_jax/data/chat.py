"""Conversations -> token ids (and SFT loss masks), in the checkpoint's own chat format.

A chat model only answers well when its prompt is laid out exactly as in its fine-tuning, token for token. The
format therefore comes from the checkpoint, as `transformers` takes it: a Jinja chat template
(`chat_template.jinja`, else `chat_template` in `tokenizer_config.json`), rendered in the same sandbox with the same
variables and tokenized the same way, so `render_ids` equals `apply_chat_template(..., tokenize=True)`. Without a
template, a tokenizer with Llama 3's special tokens gets Llama 3's format, built token by token like Meta's reference
`ChatFormat`: content is always encoded as plain text, so a message cannot forge control tokens. (A Jinja template's
output, like `transformers`' default, is parsed for special-token text, content included.) `LLAMA3_CHAT_TEMPLATE`
renders that same format, so a directory exported with it behaves identically in `transformers`.

Generation and the SFT data pipeline both go through `ChatFormat`, so a model is prompted as it was trained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils
from etils import epath

from llama_jax.data.tokenizer import HFTokenizer, Tokenizer, read_tokenizer_config
from llama_jax.errors import DataError
from llama_jax.workdir import as_path, read_utf8

Message = dict  # {"role": "system" | "user" | "assistant" | "ipython" | "tool", "content": str}

LLAMA3_ROLES = ("system", "user", "assistant", "ipython", "tool")
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Meta's layout: <|begin_of_text|>, then per message <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>
# with the content trimmed, and tool results under the "ipython" header (as Meta's own code and template write them).
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'ipython', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': Llama 3 chats use system, user, assistant, ipython "
    "and tool') }}"
    "{% endif %}"
    "{{ '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# The template variables transformers fills from the tokenizer's named special tokens.
_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatFormat:
    """Renders conversations for one tokenizer: with a Jinja `template`, or Llama 3's built-in format when None.

    `variables` are the special-token names a template may use (bos_token, eos_token, ...); by default the
    tokenizer's bos and eos. `source` names the template in error messages.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | None = None,
        *,
        variables: Mapping[str, str] | None = None,
        source: str = "the chat template",
    ):
        self._tokenizer, self._source = tokenizer, source
        self._text = LLAMA3_CHAT_TEMPLATE if template is None else template
        self._variables = _token_variables(tokenizer, {}) if variables is None else dict(variables)
        if template is None:
            missing = [name for name in _LLAMA3_TOKENS if name not in tokenizer.special_tokens]
            if missing:
                raise DataError(
                    f"no chat template was given and the tokenizer lacks Llama 3's chat tokens ({', '.join(missing)}): "
                    "pass a Jinja chat template (or put chat_template.jinja in the checkpoint directory)"
                )
            self._template = None
            return
        try:
            self._template = _ENVIRONMENT.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{source} has a syntax error at line {e.lineno} ({e.message}): fix the template") from None

    @classmethod
    def from_directory(cls, path: str | os.PathLike, tokenizer: Tokenizer) -> ChatFormat:
        """The format of a checkpoint directory (a file's directory works too), chosen as `transformers` does.

        `chat_template.jinja` wins over `chat_template` in `tokenizer_config.json` (a string, or a list of
        {name, template} of which "default" is used); without either, Llama 3's built-in format.
        """
        directory = _directory(path)
        template, source, config = _find_template(directory)
        if template is None and cls.builtin_template(tokenizer) is None:
            raise DataError(
                f"{directory} has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json) "
                "and its tokenizer lacks Llama 3's chat tokens: write the model's Jinja template to "
                f"{directory / 'chat_template.jinja'}"
            )
        return cls(tokenizer, template, variables=_token_variables(tokenizer, config), source=source)

    @staticmethod
    def template_in(path: str | os.PathLike, tokenizer: Tokenizer) -> str | None:
        """The Jinja template `from_directory` would use, as text to export; None when there is none."""
        template = _find_template(_directory(path))[0]
        return ChatFormat.builtin_template(tokenizer) if template is None else template

    @staticmethod
    def builtin_template(tokenizer: Tokenizer) -> str | None:
        """`LLAMA3_CHAT_TEMPLATE` when the tokenizer has Llama 3's chat tokens, else None."""
        return LLAMA3_CHAT_TEMPLATE if all(name in tokenizer.special_tokens for name in _LLAMA3_TOKENS) else None

    @property
    def template_text(self) -> str:
        """The Jinja source to export with a checkpoint (the built-in format's is `LLAMA3_CHAT_TEMPLATE`)."""
        return self._text

    def render_ids(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """The conversation's token ids; `add_generation_prompt` appends the header of the assistant's reply."""
        messages = _checked(messages)
        if self._template is None:
            return self._llama3(messages, add_generation_prompt)[0]
        return self._render(messages, add_generation_prompt)

    def render_with_mask(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for SFT: the mask is 1 on each assistant turn's tokens (its content and end token).

        For a Jinja template an assistant turn is what rendering it adds to the conversation before it with the
        generation prompt, minus trailing whitespace tokens (formatting after the end token, e.g. ChatML's "\\n",
        which the model never generates). That needs renders that only ever extend earlier ones.
        """
        messages = _checked(messages)
        if self._template is None:
            return self._llama3(messages, add_generation_prompt=False)
        ids = self._render(messages, add_generation_prompt=False)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if through[: len(before)] != before or ids[: len(through)] != through:
                raise DataError(
                    f"{self._source} is not prefix-stable: the tokens of the first {i} messages (with the generation "
                    f"prompt) or of the first {i + 1} do not begin the whole conversation's, so the assistant turns "
                    "cannot be found for the loss mask; use a template that renders earlier turns the same whatever "
                    "follows them"
                )
            end = len(through)
            while end > len(before) and self._tokenizer.decode([ids[end - 1]]).isspace():
                end -= 1
            mask[len(before) : end] = [1] * (end - len(before))
        return ids, mask

    def _render(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self._variables,
            )
        except DataError:
            raise
        except Exception as e:  # the template is user data: whatever it raises is a problem with it or the messages
            raise DataError(f"{self._source} failed on this conversation ({type(e).__name__}: {e})") from None
        return self._tokenizer.encode(text, add_special_tokens=False, allow_special=True)

    def _llama3(self, messages: list[Message], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        special = self._tokenizer.special_tokens
        ids, mask = [special["<|begin_of_text|>"]], [0]

        def header(role: str) -> list[int]:
            return [
                special["<|start_header_id|>"], *self._plain(role), special["<|end_header_id|>"], *self._plain("\n\n")
            ]

        for message in messages:
            role = message["role"]
            if role not in LLAMA3_ROLES:
                raise DataError(
                    f"unknown role {role!r} for the Llama 3 chat format: use one of {', '.join(LLAMA3_ROLES)}"
                )
            head = header("ipython" if role == "tool" else role)
            body = [*self._plain(message["content"].strip()), special["<|eot_id|>"]]
            ids += head + body
            mask += [0] * len(head) + [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            head = header("assistant")
            ids += head
            mask += [0] * len(head)
        return ids, mask

    def _plain(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False, allow_special=False)


def _directory(path: str | os.PathLike) -> Path | epath.Path:
    """The checkpoint directory of a tokenizer file or directory, local or a URL (a tokenizer in a bucket)."""
    path = as_path(path)
    return path if path.is_dir() else path.parent


def _find_template(directory: Path) -> tuple[str | None, str, dict]:
    """(template or None, where it is, tokenizer_config.json's content) of a checkpoint directory."""
    config_path = directory / "tokenizer_config.json"
    config = read_tokenizer_config(directory)
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return read_utf8(jinja_path, "re-save the chat template as UTF-8 text"), str(jinja_path), config
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if "default" not in named:
            raise DataError(
                f"{config_path} lists chat templates {sorted(map(str, named))} but none named 'default': name the "
                "one to use 'default'"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise DataError(f"chat_template in {config_path} is not a string: write the Jinja template as a string")
    return template, f"chat_template in {config_path}", config


def _token_variables(tokenizer: Tokenizer, config: Mapping[str, Any]) -> dict[str, str]:
    """The special-token variables transformers passes: the named tokens of tokenizer_config.json (`config`, over
    those of the one beside a tokenizer.json), else, for the tokenizers transformers cannot open (tiktoken and
    SentencePiece files), the tokenizer's own bos and eos. Beside a tokenizer.json, a token the config leaves unset
    (or null) is unset in the template, as transformers has it: the bos the tokenizer guessed from its vocabulary
    ("<s>") was rendered where transformers renders nothing."""
    if isinstance(tokenizer, HFTokenizer):
        variables = _named_tokens(tokenizer.config)
    else:
        variables = {"bos_token": tokenizer.token_text(tokenizer.bos_id),
                     "eos_token": tokenizer.token_text(tokenizer.eos_id)}
    variables.update(_named_tokens(config))
    return {name: value for name, value in variables.items() if value is not None}


def _named_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    named = {}
    for name in _TOKEN_VARIABLES:
        if (value := config.get(name)) is not None:
            named[name] = value.get("content") if isinstance(value, dict) else value  # older configs: AddedToken
    return named


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names reasoning goes by, first found wins


def _checked(messages: Sequence[Message]) -> list[Message]:
    """Copies of the messages without None values (as transformers drops them), after checking their shape, with
    the reasoning under every name templates read (`reasoning_content`, and `thinking` unless set), as transformers'
    apply_chat_template aliases it: a template reading `reasoning_content` dropped a message's `reasoning`."""
    if isinstance(messages, (str, Mapping)) or not messages:
        raise DataError("the conversation is empty or not a list: pass a list of {'role': ..., 'content': ...} dicts")
    checked = []
    for n, message in enumerate(messages):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(
                f"message {n} ({str(message)[:80]}) lacks a string 'role' or 'content': write each message as "
                "{'role': 'user', 'content': 'text'}"
            )
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        checked.append(message if reasoning is None else
                       {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return checked


def _raise_exception(message: str) -> None:
    raise DataError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore attributes, as transformers' does: names of Python internals, which an
    untrusted template has no business storing."""

    def __init__(*args: Any, **kwargs: Any):  # Jinja's signature, so that namespace(self=...) works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text: renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _Dict:
    """`dict` for templates. The dict type itself would let one mutate data through its unbound methods
    (`dict.update(messages[0], ...)`), which the immutable sandbox only refuses on dict instances."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The environment `transformers`' apply_chat_template renders in: same options, filters and globals."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda format: datetime.now().strftime(format),
        dict=_Dict(),
        namespace=_Namespace,
    )
    return env


_ENVIRONMENT = _environment()
