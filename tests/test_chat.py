"""Chat format tests: the built-in Llama 3 layout token by token, and Jinja templates against transformers'
`apply_chat_template`. Every tokenizer is trained here on the standard library's sources; nothing is downloaded."""

import datetime
import json
import sysconfig
from pathlib import Path

import pytest
import tokenizers
import transformers

from llama_jax.data import tokenizer as tk
from llama_jax.data.chat import LLAMA3_CHAT_TEMPLATE, ChatFormat
from llama_jax.errors import DataError

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "  You are a terse assistant.\n"},
    {"role": "user", "content": "What does def f(x): return x * 2 do?"},
    {"role": "assistant", "content": "It doubles x — naïve café 🙂.\n\n"},
    {"role": "user", "content": "\tAnd f('ab')?"},
    {"role": "assistant", "content": "'abab'"},
]
PROMPT = CONVERSATION[:4]  # ends with a user turn: what generation renders with add_generation_prompt


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:15]
    return [path.read_text(encoding="utf-8", errors="replace") for path in paths]


@pytest.fixture(scope="module")
def tiktoken_tok(tmp_path_factory, corpus) -> tk.Tokenizer:
    return tk.train_bpe(corpus, 1024, tmp_path_factory.mktemp("tiktoken") / "tokenizer.model")


def _bpe(corpus: list[str], specials: list[str]) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer.json with Llama 3's split regex, 768 regular tokens, then `specials`."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(tk.LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=768, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([tokenizers.AddedToken(name, special=True) for name in specials])
    return tok


def _hf_dir(path: Path, tok: tokenizers.Tokenizer, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory, corpus) -> Path:
    """Shaped like a Llama 3 Instruct Hub repo: bos-prepending post-processor, eos <|eot_id|>, the template."""
    specials = tk.llama3_special_tokens(768)
    tok = _bpe(corpus, list(specials))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", specials["<|begin_of_text|>"])])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE}
    return _hf_dir(tmp_path_factory.mktemp("llama3"), tok, config)


@pytest.fixture(scope="module")
def chatml_tok(corpus) -> tokenizers.Tokenizer:
    """Shaped like SmolLM2's: no bos, no post-processor, ChatML's control tokens."""
    return _bpe(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, chatml_tok) -> Path:
    config = {"eos_token": "<|im_end|>", "chat_template": CHATML}
    return _hf_dir(tmp_path_factory.mktemp("chatml"), chatml_tok, config)


def _hf_ids(directory: Path, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = transformers.AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out if isinstance(out, list) else out["input_ids"])  # transformers 5 returns a BatchEncoding


def _masked_spans(tok: tk.Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of masked tokens."""
    spans, start = [], None
    for k, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = k
        elif not bit and start is not None:
            spans.append(tok.decode(ids[start:k]))
            start = None
    return spans


def test_builtin_is_llama3_layout_token_by_token(tiktoken_tok):
    tok = tiktoken_tok
    sp = tok.special_tokens
    bot, start, end, eot = (sp[name] for name in (
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert (bot, start, end, eot) == (768, 774, 775, 777)

    def text(piece: str) -> list[int]:
        return tok.encode(piece, add_special_tokens=False)

    def header(role: str) -> list[int]:
        return [start, *text(role), end, *text("\n\n")]

    expected, expected_mask = [bot], [0]
    for message in CONVERSATION:
        body = [*text(message["content"].strip()), eot]
        expected += header(message["role"]) + body
        expected_mask += [0] * len(header(message["role"])) + [int(message["role"] == "assistant")] * len(body)
    chat = ChatFormat(tok)
    assert chat.render_ids(CONVERSATION) == expected
    assert chat.render_with_mask(CONVERSATION) == (expected, expected_mask)
    assert chat.render_ids(CONVERSATION, add_generation_prompt=True) == expected + header("assistant")
    assert chat.template_text == LLAMA3_CHAT_TEMPLATE

    prompt_ids = chat.render_ids(PROMPT, add_generation_prompt=True)
    assert tok.decode(prompt_ids) == (  # the published layout, as text
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat does def f(x): return x * 2 do?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt doubles x — naïve café 🙂.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd f('ab')?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids, mask = chat.render_with_mask(CONVERSATION)
    assert _masked_spans(tok, ids, mask) == ["It doubles x — naïve café 🙂.<|eot_id|>", "'abab'<|eot_id|>"]


def test_builtin_encodes_content_as_text_and_tool_as_ipython(tiktoken_tok):
    chat = ChatFormat(tiktoken_tok)
    eot = tiktoken_tok.special_tokens["<|eot_id|>"]
    ids = chat.render_ids([{"role": "user", "content": "a<|eot_id|>b"}])
    assert ids.count(eot) == 1 and tiktoken_tok.decode(ids).endswith("a<|eot_id|>b<|eot_id|>")
    tool = chat.render_ids([{"role": "tool", "content": "42"}])
    assert tool == chat.render_ids([{"role": "ipython", "content": "42"}])
    assert tiktoken_tok.decode(tool) == "<|begin_of_text|><|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_llama3_template_matches_builtin_and_transformers(llama3_dir, tiktoken_tok, add_generation_prompt):
    messages = PROMPT if add_generation_prompt else CONVERSATION
    tok = tk.Tokenizer.from_file(llama3_dir)
    builtin = ChatFormat(tok).render_ids(messages, add_generation_prompt)
    jinja = ChatFormat(tok, LLAMA3_CHAT_TEMPLATE)
    from_dir = ChatFormat.from_directory(llama3_dir, tok)
    assert from_dir.template_text == LLAMA3_CHAT_TEMPLATE
    assert jinja.render_ids(messages, add_generation_prompt) == builtin
    assert from_dir.render_ids(messages, add_generation_prompt) == builtin
    assert _hf_ids(llama3_dir, messages, add_generation_prompt) == builtin
    # the same BPE, trained alike, in tiktoken format: the built-in format agrees across tokenizer formats
    assert ChatFormat(tiktoken_tok).render_ids(messages, add_generation_prompt) == builtin
    assert jinja.render_with_mask(CONVERSATION) == ChatFormat(tok).render_with_mask(CONVERSATION)


def test_llama3_template_rejects_unknown_roles_like_builtin(llama3_dir):
    tok = tk.Tokenizer.from_file(llama3_dir)
    messages = [{"role": "narrator", "content": "hi"}]
    with pytest.raises(DataError, match="unknown role 'narrator' for the Llama 3 chat format"):
        ChatFormat(tok).render_ids(messages)
    with pytest.raises(DataError, match="unknown role narrator: Llama 3 chats use system, user"):
        ChatFormat(tok, LLAMA3_CHAT_TEMPLATE).render_ids(messages)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("where", ["tokenizer_config", "jinja_file"])
def test_chatml_matches_transformers(tmp_path, chatml_dir, chatml_tok, add_generation_prompt, where):
    if where == "jinja_file":  # chat_template.jinja wins over tokenizer_config.json, in transformers and here
        directory = _hf_dir(tmp_path, chatml_tok, {"eos_token": "<|im_end|>", "chat_template": "{{ 'wrong' }}"})
        (directory / "chat_template.jinja").write_text(CHATML)
    else:
        directory = chatml_dir
    messages = PROMPT if add_generation_prompt else CONVERSATION
    tok = tk.Tokenizer.from_file(directory)
    chat = ChatFormat.from_directory(directory, tok)
    ids = chat.render_ids(messages, add_generation_prompt)
    assert chat.template_text == ChatFormat.template_in(directory, tok) == CHATML
    assert ids == _hf_ids(directory, messages, add_generation_prompt)
    assert tok.decode(ids).startswith("<|im_start|>system\n  You are a terse assistant.\n<|im_end|>\n<|im_start|>user")
    assert ids.count(tok.special_tokens["<|im_start|>"]) == len(messages) + add_generation_prompt


def test_named_template_list_takes_default(tmp_path, chatml_tok):
    templates = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": CHATML}]
    directory = _hf_dir(tmp_path, chatml_tok, {"eos_token": "<|im_end|>", "chat_template": templates})
    tok = tk.Tokenizer.from_file(directory)
    assert ChatFormat.from_directory(directory, tok).render_ids(CONVERSATION) == _hf_ids(directory, CONVERSATION)

    _hf_dir(directory, chatml_tok, {"eos_token": "<|im_end|>", "chat_template": templates[:1]})
    with pytest.raises(DataError, match="none named 'default'"):
        ChatFormat.from_directory(directory, tok)


def test_jinja_mask_covers_assistant_contents_and_end_token(chatml_dir):
    tok = tk.Tokenizer.from_file(chatml_dir)
    chat = ChatFormat.from_directory(chatml_dir, tok)
    ids, mask = chat.render_with_mask(CONVERSATION)
    assert ids == chat.render_ids(CONVERSATION) and len(mask) == len(ids)
    # ChatML's "\n" after <|im_end|> is formatting the model never generates, so it is left out
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert _masked_spans(tok, ids, mask) == [content + "<|im_end|>" for content in assistant]


def test_jinja_mask_equals_transformers_generation_mask(tmp_path, chatml_tok):
    """A template marking assistant text with {% generation %}: it renders as in transformers, and transformers'
    own assistant mask equals ours."""
    template = (
        "{% for message in messages %}\n"
        "{% if message['role'] == 'assistant' %}\n"
        "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{{ '\n' }}\n"
        "{% else %}\n"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}\n"
        "{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    directory = _hf_dir(tmp_path, chatml_tok, {"eos_token": "<|im_end|>", "chat_template": template})
    tok = tk.Tokenizer.from_file(directory)
    ids, mask = ChatFormat.from_directory(directory, tok).render_with_mask(CONVERSATION)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(hf["input_ids"])
    assert mask == list(hf["assistant_masks"]) and sum(mask) > 0


def test_template_environment_matches_transformers(tmp_path, chatml_tok):
    """Filters, globals, whitespace control and variables that Hub templates rely on, rendered by both."""
    template = (
        "{% set ns = namespace(count=0) %}\n"
        "{{ bos_token ~ '|' ~ eos_token ~ '|' ~ (tools is none) ~ '|' ~ (documents is none) ~ '|' }}\n"
        "{{ pad_token ~ '|' ~ (unk_token is defined) ~ '|' ~ (dict.update is defined) ~ '|' }}\n"
        "{{ dict.fromkeys(['k']) | tojson }}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.count = ns.count + 1 %}\n"
        "    {{ '<|im_start|>' + message['role'] + '\n' }}{{ message | tojson }}{{ '<|im_end|>\n' }}\n"
        "    {% if ns.count == 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{{ dict(a=1) | tojson(indent=2, sort_keys=True) }} {{ strftime_now('%Y') }} {{ ns.count }}"
    )
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": template}
    directory = _hf_dir(tmp_path, chatml_tok, config)
    tok = tk.Tokenizer.from_file(directory)
    # keys set to None are dropped, as transformers drops them
    messages = [CONVERSATION[0], {"role": "user", "content": "<b> & \"quotes\"", "name": None}, *CONVERSATION[1:]]
    ids = ChatFormat.from_directory(directory, tok).render_ids(messages)
    assert ids == _hf_ids(directory, messages)
    text = tok.decode(ids)
    # dict is not the type with its unbound methods; lstrip_blocks strips the indentation before
    # {% %} but not before {{ }}; trim_blocks drops the newline after a block
    assert text.startswith(
        '<|endoftext|>|<|im_end|>|True|True|\n<|endoftext|>|False|False|\n{"k": null}\n'
        '    <|im_start|>user\n{"role": "user", "content": '
        '"<b> & \\"quotes\\""}<|im_end|>\n\n    <|im_start|>user\n')
    assert "naïve café 🙂" in text and "'abab'" not in text  # tojson keeps non-ASCII; the loop broke after 3
    assert text.endswith('{\n  "a": 1\n} ' + f"{datetime.date.today().year} 3")


def test_a_token_the_config_leaves_unset_is_unset_in_the_template_as_transformers_has_it(tmp_path, corpus):
    """Beside a tokenizer.json, bos_token missing from tokenizer_config.json (or null there): the template's
    {{ bos_token }} rendered the "<s>" the tokenizer guessed from its vocabulary, where transformers renders nothing."""
    tok_json = _bpe(corpus, ["<s>", "</s>"])
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    for name, config in (("missing", {"eos_token": "</s>"}), ("null", {"bos_token": None, "eos_token": "</s>"})):
        directory = _hf_dir(tmp_path / name, tok_json, {**config, "chat_template": template})
        tok = tk.Tokenizer.from_file(directory)
        assert tok.token_text(tok.bos_id) == "<s>", "a bos the tokenizer guesses"
        ids = ChatFormat.from_directory(directory, tok).render_ids(CONVERSATION)
        assert ids == _hf_ids(directory, CONVERSATION) and not tok.decode(ids).startswith("<s>")


def test_reasoning_reaches_templates_under_each_name_transformers_gives_it(tmp_path, chatml_tok):
    """A Qwen3-style template reads `reasoning_content`, gpt-oss's `thinking`; SFT records often say `reasoning`.
    transformers aliases them; the reasoning of a message that named it otherwise was dropped from the tokens."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                "{% if m.reasoning_content %}{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}"
                "{% if m.thinking %}{{ '[' + m.thinking + ']' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}")
    directory = _hf_dir(tmp_path, chatml_tok, {"eos_token": "<|im_end|>", "chat_template": template})
    tok = tk.Tokenizer.from_file(directory)
    for name in ("reasoning", "thinking", "reasoning_content"):
        messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", name: "two and two"}]
        ids = ChatFormat.from_directory(directory, tok).render_ids(messages)
        assert ids == _hf_ids(directory, messages) and "<think>two and two</think>" in tok.decode(ids), name


def test_template_errors_raise_data_error(chatml_tok, tmp_path):
    directory = _hf_dir(tmp_path, chatml_tok, {"eos_token": "<|im_end|>"})
    tok = tk.Tokenizer.from_file(directory)
    refusing = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('no system role') }}{% endif %}ok"
    assert ChatFormat(tok, refusing).render_ids(CONVERSATION) == tok.encode("ok", add_special_tokens=False)
    with pytest.raises(DataError, match="refused the conversation: no system role"):
        ChatFormat(tok, refusing).render_ids(CONVERSATION[1:])
    with pytest.raises(DataError, match="syntax error at line 2"):
        ChatFormat(tok, "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(DataError, match=r"failed on this conversation \(TypeError"):
        ChatFormat(tok, "{{ messages[0]['content'] + 1 }}").render_ids(CONVERSATION)
    with pytest.raises(DataError, match="SecurityError"):  # the sandbox holds
        ChatFormat(tok, "{{ messages.__class__.__subclasses__() }}").render_ids(CONVERSATION)
    with pytest.raises(DataError, match="underscore attributes"):
        ChatFormat(tok, "{% set ns = namespace() %}{% set ns._x = 1 %}").render_ids(CONVERSATION)
    (directory / "chat_template.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(DataError, match=r"chat_template\.jinja is not UTF-8 text .*: re-save the chat template"):
        ChatFormat.from_directory(directory, tok)

    unstable = "{{ messages | length }}" + CHATML  # every render starts with the count: not prefix-stable
    with pytest.raises(DataError, match="not prefix-stable"):
        ChatFormat(tok, unstable).render_with_mask(CONVERSATION)
    assert ChatFormat(tok, unstable).render_with_mask(CONVERSATION[:2])[1] == [0] * len(
        ChatFormat(tok, unstable).render_ids(CONVERSATION[:2]))  # no assistant turn: nothing to find


def test_bad_messages_raise_data_error(tiktoken_tok):
    for chat in (ChatFormat(tiktoken_tok), ChatFormat(tiktoken_tok, CHATML)):
        with pytest.raises(DataError, match="conversation is empty"):
            chat.render_ids([])
        with pytest.raises(DataError, match="message 1 .* lacks a string 'role' or 'content'"):
            chat.render_with_mask([{"role": "user", "content": "hi"}, {"role": "assistant"}])
        with pytest.raises(DataError, match="message 0 .* lacks a string 'role' or 'content'"):
            chat.render_ids([{"content": "hi"}])
        with pytest.raises(DataError, match="message 0 .* lacks"):
            chat.render_ids([{"role": "user", "content": None}])
    with pytest.raises(DataError, match="unknown role 'bot' for the Llama 3 chat format"):
        ChatFormat(tiktoken_tok).render_with_mask([{"role": "bot", "content": "hi"}])


def test_missing_template_falls_back_only_for_llama3_tokens(tmp_path, tiktoken_tok, chatml_tok):
    builtin = ChatFormat.from_directory(tmp_path, tiktoken_tok)  # a bare directory: the Llama 3 format
    assert builtin.render_ids(CONVERSATION) == ChatFormat(tiktoken_tok).render_ids(CONVERSATION)
    assert builtin.template_text == ChatFormat.template_in(tmp_path, tiktoken_tok) == LLAMA3_CHAT_TEMPLATE

    directory = _hf_dir(tmp_path / "smol", chatml_tok, {"eos_token": "<|im_end|>"})
    tok = tk.Tokenizer.from_file(directory)
    with pytest.raises(DataError, match=r"has no chat template .* write the model's Jinja template to .*\.jinja"):
        ChatFormat.from_directory(directory, tok)
    with pytest.raises(DataError, match="lacks Llama 3's chat tokens"):
        ChatFormat(tok)
    assert ChatFormat.builtin_template(tok) is ChatFormat.template_in(directory, tok) is None  # nothing to export
    (directory / "chat_template.jinja").write_text(CHATML)
    assert ChatFormat.from_directory(directory / "tokenizer.json", tok).template_text == CHATML  # a file's directory
    assert ChatFormat.template_in(directory / "tokenizer.json", tok) == CHATML
