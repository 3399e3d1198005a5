"""Post-training examples from JSON Lines: the Llama 3 layout with its real token ids, SFT and DPO masks, and the
bad-data policy (skip and count each bad line with its file:line; a file with no usable line is an error)."""

import base64
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stdlib_text import stdlib_sources

from llama_jax.data import tokenizer as tk
from llama_jax.data.chat import ChatFormat
from llama_jax.data.conversations import (
    SkipReport,
    preference_example,
    read_conversations,
    read_preferences,
    sft_example,
    sft_examples,
)
from llama_jax.errors import DataError

BOS, START, END, EOT = 128000, 128006, 128007, 128009  # <|begin_of_text|> <|start_header_id|> ... <|eot_id|>

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant with a calculator."},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": 'calculator.call(expression="6 * 7")'},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "84 — naïve café 🙂."},
]
ASSISTANT_TEXTS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tk.Tokenizer:
    """A small BPE numbered like Llama 3's: its ranks are padded to 128,000 with byte strings that UTF-8 text never
    contains (0xff), so the special tokens get their real ids and the tests can write them out."""
    directory = tmp_path_factory.mktemp("llama3_ids")
    small = directory / "small.model"
    tk.train_bpe(stdlib_sources(skip=0, limit_chars=300_000), 1024, small)
    lines = small.read_text(encoding="ascii").splitlines()
    unreachable = [b"\xff" + rank.to_bytes(3, "big") for rank in range(len(lines), 128000)]
    lines += [f"{base64.b64encode(token).decode()} {len(lines) + k}" for k, token in enumerate(unreachable)]
    path = directory / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return tk.Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def fmt(tok) -> ChatFormat:
    return ChatFormat(tok)


def _text(tok: tk.Tokenizer, piece: str) -> list[int]:
    return tok.encode(piece, add_special_tokens=False)


def _masked_spans(tok: tk.Tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each run of masked tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tok.decode(ids[start:stop]) for start, stop in zip(edges[::2], edges[1::2], strict=True)]


def _write(path: Path, lines: list) -> Path:
    """Writes each str as a raw line, bytes as raw bytes, anything else as its JSON."""
    data = b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n"
        for line in lines
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_special_tokens_have_llama3_ids(tok):
    names = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")
    assert [tok.special_tokens[name] for name in names] == [BOS, START, END, EOT, 128008]
    assert tok.vocab_size == 128256


def test_sft_renders_published_llama3_format_token_by_token(tok, fmt):
    expected, expected_mask = [BOS], [0]
    for message in CONVERSATION:
        header_role = "ipython" if message["role"] == "tool" else message["role"]  # Meta's name for tool results
        header = [START, *_text(tok, header_role), END, *_text(tok, "\n\n")]
        body = [*_text(tok, message["content"]), EOT]
        expected += header + body
        expected_mask += [0] * len(header) + [int(message["role"] == "assistant")] * len(body)
    example = sft_example(fmt, CONVERSATION)
    assert example.tokens.dtype == np.uint32 and example.loss_mask.dtype == np.uint8
    assert example.tokens.tolist() == expected
    assert example.loss_mask.tolist() == expected_mask
    assert tok.decode(example.tokens) == (  # the published layout, as text
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse assistant with a calculator."
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 6 * 7?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\ncalculator.call(expression="6 * 7")<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 42.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd doubled?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n84 — naïve café 🙂.<|eot_id|>")


def test_sft_loss_mask_is_exactly_assistant_contents_and_eot(tok, fmt):
    example = sft_example(fmt, CONVERSATION)
    assert _masked_spans(tok, example.tokens, example.loss_mask) == [text + "<|eot_id|>" for text in ASSISTANT_TEXTS]
    unmasked = tok.decode(example.tokens[example.loss_mask == 0])
    assert unmasked.count("<|eot_id|>") == 4 and "42" in unmasked and "It is 42." not in unmasked


def test_sft_example_without_assistant_turn_is_refused(fmt):
    with pytest.raises(DataError, match="no assistant turn.*add the assistant's reply"):
        sft_example(fmt, [{"role": "user", "content": "hello"}])


def test_preference_masks_and_shared_prompt_prefix(tok, fmt):
    prompt = CONVERSATION[:6]  # ends with a user turn, and holds earlier assistant turns that must stay unmasked
    chosen = [{"role": "assistant", "content": "84."}]
    rejected = [{"role": "assistant", "content": "Probably 13."}]
    example = preference_example(fmt, prompt, chosen, rejected)
    n = len(example.prompt_tokens)
    assert example.prompt_tokens.tolist() == fmt.render_ids(prompt, add_generation_prompt=True)
    header = [START, *_text(tok, "assistant"), END, *_text(tok, "\n\n")]
    assert example.prompt_tokens[-len(header):].tolist() == header
    assert example.prompt_tokens.tolist() == example.chosen_tokens[:n].tolist() == example.rejected_tokens[:n].tolist()
    assert example.chosen_tokens.tolist() == fmt.render_ids(prompt + chosen)
    assert example.rejected_tokens.tolist() == fmt.render_ids(prompt + rejected)
    assert _masked_spans(tok, example.chosen_tokens, example.chosen_mask) == ["84."]
    assert _masked_spans(tok, example.rejected_tokens, example.rejected_mask) == ["Probably 13."]
    assert _masked_spans(tok, example.chosen_tokens, example.chosen_nll_mask) == ["84.<|eot_id|>"]
    for tokens, mask in [(example.chosen_tokens, example.chosen_mask), (example.rejected_tokens,
                         example.rejected_mask), (example.chosen_tokens, example.chosen_nll_mask)]:
        assert mask.dtype == np.uint8 and len(mask) == len(tokens) and not mask[:n].any()


def test_preference_multi_message_response_masks_only_assistant_turns(tok, fmt):
    chosen = [{"role": "assistant", "content": "calc(6*7)"}, {"role": "tool", "content": "42"},
              {"role": "assistant", "content": "42."}]
    example = preference_example(fmt, CONVERSATION[:2], chosen, [{"role": "assistant", "content": "13."}])
    assert _masked_spans(tok, example.chosen_tokens, example.chosen_mask) == ["calc(6*7)", "42."]
    assert _masked_spans(tok, example.chosen_tokens, example.chosen_nll_mask) == [
        "calc(6*7)<|eot_id|>", "42.<|eot_id|>"]


def test_preference_response_must_start_with_assistant(fmt):
    with pytest.raises(DataError, match="start each response with an assistant message"):
        preference_example(fmt, CONVERSATION[:2], [{"role": "user", "content": "x"}],
                           [{"role": "assistant", "content": "y"}])


GOOD = {"messages": CONVERSATION[1:3]}
BAD_CONVERSATION_LINES = [  # (line, reason); every one is skipped and counted
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"text": "no messages key"}, "missing or empty messages"),
    ({"messages": []}, "missing or empty messages"),
    ({"messages": "hello"}, "missing or empty messages"),
    ({"messages": ["hello"]}, "malformed message"),
    ({"messages": [{"role": "user", "content": None}, CONVERSATION[2]]}, "malformed message"),
    ({"messages": [{"role": "user"}, CONVERSATION[2]]}, "malformed message"),
    ({"messages": [{"role": "bot", "content": "hi"}, CONVERSATION[2]]}, "unknown role"),
    ({"messages": [CONVERSATION[0], CONVERSATION[1]]}, "no assistant message"),
    (b'{"messages": "\xff"}', "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "\\udc80"}]}', "not UTF-8"),  # half a surrogate pair
]


def test_read_conversations_skips_and_counts_each_bad_line(tmp_path):
    lines = [GOOD, *(line for line, _ in BAD_CONVERSATION_LINES), "", "   ", {"messages": CONVERSATION}]
    path = _write(tmp_path / "chat.jsonl", lines)
    report = SkipReport()
    assert list(read_conversations(path, report=report)) == [GOOD["messages"], CONVERSATION]  # blank lines ignored
    reasons = [reason for _, reason in BAD_CONVERSATION_LINES]
    assert report.counts == {reason: reasons.count(reason) for reason in reasons}
    assert report.total == len(BAD_CONVERSATION_LINES)
    for number, reason in enumerate(reasons, start=2):  # no reason occurs more often than the examples kept
        assert any(place.startswith(f"{path}:{number} (") for place in report.examples[reason])
    assert report.examples["unknown role"] == [
        f"{path}:10 (messages[0] has role 'bot', not one of system, user, assistant, ipython, tool)"]
    assert f"{path}:2 (" in report.summary() and "invalid JSON: 1" in report.summary()


def test_sft_data_in_sharegpt_prompt_completion_and_alpaca_forms_is_read_as_messages(tmp_path):
    """The forms TRL and Axolotl read besides `messages`; each line was skipped ("missing or empty messages"), so a
    file of them prepared nothing."""
    user, assistant = CONVERSATION[1], CONVERSATION[2]
    lines = [
        {"conversations": [{"from": "human", "value": user["content"]},
                           {"from": "gpt", "value": assistant["content"]}]},
        {"conversations": [user, assistant]},  # some ShareGPT files hold messages under this key
        {"prompt": user["content"], "completion": assistant["content"]},
        {"prompt": [user], "completion": [assistant]},
        {"instruction": user["content"], "input": "", "output": assistant["content"]},
        {"instruction": "Add the numbers.", "input": "6 and 7", "output": "13"},
        {"conversations": [{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
        {"prompt": "only a prompt", "completion": None},
        {"instruction": "", "output": "x"},
        {"conversations": [{"from": "human", "value": "no answer"}]},
    ]
    report = SkipReport()
    read = list(read_conversations(_write(tmp_path / "chat.jsonl", lines), report=report))
    assert read == [[user, assistant]] * 5 + [[{"role": "user", "content": "Add the numbers.\n\n6 and 7"},
                                                {"role": "assistant", "content": "13"}]]
    assert report.counts == {"unknown role": 1, "malformed message": 1, "missing or empty messages": 2,
                             "no assistant message": 1}


def test_skips_are_printed_once_at_the_end(tmp_path, capsys):
    path = _write(tmp_path / "chat.jsonl", [GOOD, "[]", GOOD])
    assert len(list(read_conversations(path))) == 2
    err = capsys.readouterr().err
    assert err.count("skipped 1 post-training records") == 1 and f"{path}:2 (a JSON list)" in err
    list(read_conversations(_write(tmp_path / "clean.jsonl", [GOOD])))
    assert capsys.readouterr().err == ""  # nothing skipped, nothing printed


def test_shared_report_is_the_callers_to_print(tmp_path, fmt, capsys):
    path = _write(tmp_path / "chat.jsonl", [GOOD, "[]", {"messages": CONVERSATION}])
    report, max_tokens = SkipReport(), len(sft_example(fmt, GOOD["messages"]).tokens)
    examples = list(sft_examples(fmt, read_conversations(path, report=report), max_tokens=max_tokens, report=report))
    assert len(examples) == 1 and capsys.readouterr().err == ""
    assert report.counts == {"not a JSON object": 1, "longer than max_tokens": 1}


def test_glob_reads_files_in_sorted_order(tmp_path):
    first = {"messages": [CONVERSATION[1], {"role": "assistant", "content": "first"}]}
    _write(tmp_path / "b.jsonl", [GOOD])
    _write(tmp_path / "sub" / "a.jsonl", [first])
    _write(tmp_path / "a.jsonl", [first, first])
    answers = [conversation[1]["content"] for conversation in read_conversations(tmp_path / "*.jsonl")]
    assert answers == ["first", "first", GOOD["messages"][1]["content"]]
    assert len(list(read_conversations(tmp_path / "**" / "*.jsonl"))) == 4


def test_file_without_a_valid_line_is_a_data_error(tmp_path):
    path = _write(tmp_path / "text.jsonl", [{"text": "pretraining text, not a conversation"}] * 3)
    conversations = read_conversations(path)
    with pytest.raises(DataError, match=rf"{path} holds no usable record \(the first bad record is {path}:1: missing "
                                        r"or empty messages .*write one JSON object per line, like \{\"messages\""):
        list(conversations)
    with pytest.raises(DataError, match=r"holds no usable record \(it has no records\)"):
        list(read_conversations(_write(tmp_path / "empty" / "chat.jsonl", [])))
    good = _write(tmp_path / "good.jsonl", [GOOD])  # a wrong-format file is an error even beside good ones
    with pytest.raises(DataError, match="text.jsonl holds no usable record"):
        list(read_conversations(tmp_path / "*.jsonl"))
    assert list(read_conversations(good)) == [GOOD["messages"]]


def test_missing_file_or_pattern_is_a_data_error_at_the_call(tmp_path):
    with pytest.raises(DataError, match=r"No files match .*missing\.jsonl.*check the path"):
        read_conversations(tmp_path / "missing.jsonl")  # raised before iterating
    with pytest.raises(DataError, match="No files match"):
        read_preferences(tmp_path)
    with pytest.raises(DataError, match="No files match"):
        read_preferences(tmp_path / "*.jsonl")
    (tmp_path / "notes.txt").write_text("a text file is not chat data")
    with pytest.raises(DataError, match=rf"{tmp_path} holds no .jsonl .* .parquet file: write the conversations"):
        read_conversations(tmp_path)


def test_a_directory_gives_its_record_files_recursively(tmp_path):
    """As for raw text (and as the trainer's advice to prepare a chat directory assumes), not a glob only."""
    _write(tmp_path / "b.jsonl", [GOOD])
    _write(tmp_path / "sub" / "a.jsonl", [GOOD, GOOD])
    (tmp_path / "README.md").write_text("not chat data")
    assert len(list(read_conversations(tmp_path))) == 3


def test_read_preferences_normalises_strings_and_skips_bad_lines(tmp_path):
    messages_form = {"prompt": CONVERSATION[:2], "chosen": [{"role": "assistant", "content": "42"}],
                     "rejected": [{"role": "assistant", "content": "13"}]}
    bad = [
        ({"prompt": "q", "chosen": "a"}, "missing or empty messages"),
        ({"prompt": "q", "chosen": 7, "rejected": "b"}, "missing or empty messages"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "missing or empty messages"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
         "response not starting with an assistant message"),
        ({"prompt": [{"role": "narrator", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role"),
        ({"prompt": "q", "chosen": "a", "rejected": [{"content": "b"}]}, "malformed message"),
        ("not json", "invalid JSON"),
        ('"a string"', "not a JSON object"),
    ]
    strings_form = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "prefs.jsonl", [strings_form, *(line for line, _ in bad), messages_form])
    report = SkipReport()
    assert list(read_preferences(path, report=report)) == [
        ([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
         [{"role": "assistant", "content": "b"}]),
        (messages_form["prompt"], messages_form["chosen"], messages_form["rejected"]),
    ]
    reasons = [reason for _, reason in bad]
    assert report.counts == {reason: reasons.count(reason) for reason in reasons}
    assert report.examples["response not starting with an assistant message"] == [f"{path}:5 (chosen[0] is 'user')"]
    assert report.examples["missing or empty messages"][0] == f"{path}:2 ('rejected' is not a non-empty list)"
    with pytest.raises(DataError, match=r"holds no usable record.*like \{\"prompt\": \"...\", \"chosen\""):
        list(read_preferences(_write(tmp_path / "bad.jsonl", ["{}"])))


def test_read_preferences_takes_conversations_that_begin_with_their_prompt(tmp_path):
    """TRL's conversational form: whole conversations whose shared beginning is the prompt, without a "prompt"
    (Anthropic HH) or with one that repeats it (UltraFeedback). Both were skipped ("'prompt' is not a non-empty
    list", "response not starting with an assistant message"), so such a file prepared no pair."""
    def said(role, content):
        return {"role": role, "content": content}

    history = [said("system", "Be brief."), said("user", "Hi"), said("assistant", "Hello."), said("user", "2+2?")]
    hh = {"chosen": [*history, said("assistant", "4")], "rejected": [*history, said("assistant", "5")]}
    ultrafeedback = {"prompt": "2+2?", **hh}
    wrong_prompt = {"prompt": "3+3?", **hh}
    tie = {"chosen": hh["chosen"], "rejected": hh["chosen"]}  # nothing to prefer; it was kept
    report = SkipReport()
    path = _write(tmp_path / "prefs.jsonl", [hh, ultrafeedback, wrong_prompt, tie])
    expected = (history, [said("assistant", "4")], [said("assistant", "5")])
    assert list(read_preferences(path, report=report)) == [expected, expected]
    assert report.examples == {
        "prompt differing from the conversations' beginning": [
            f"{path}:3 ('prompt' is not how 'chosen' and 'rejected' begin: '2+2?')"],
        "the same response chosen and rejected": [f"{path}:4 ('chosen' equals 'rejected')"]}

    # Anthropic's own HH-RLHF files hold each conversation as one transcript string; it was read as one assistant
    # message with no prompt, and every line was skipped
    history = [said("user", "Hi"), said("assistant", "Hello."), said("user", "2+2?")]
    hh_raw = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant: 4",
              "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant: 5"}
    plain = {"prompt": "Human: hi", "chosen": "\n\nAssistant: is not a transcript", "rejected": "no"}
    assert list(read_preferences(_write(tmp_path / "hh.jsonl", [hh_raw, plain]))) == [
        (history, [said("assistant", "4")], [said("assistant", "5")]),
        ([said("user", "Human: hi")], [said("assistant", "\n\nAssistant: is not a transcript")],
         [said("assistant", "no")])]

    # The layout of Dahoas/rm-static and full-hh-rlhf: the transcript up to "Assistant:" as the prompt, the replies
    # apart, or (with the same prompt) whole transcripts. The cue was read as an empty assistant turn: the pairs
    # held two assistant turns in a row, and SFT trained on an end token right after the assistant's header; the
    # whole transcripts were skipped, as a prompt differing from their beginning.
    cue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant:"
    replies = {"prompt": cue, "chosen": " 4", "rejected": " 5"}
    whole = {"prompt": cue, **hh_raw}
    assert list(read_preferences(_write(tmp_path / "rm_static.jsonl", [replies, whole]))) == [
        (history, [said("assistant", " 4")], [said("assistant", " 5")]),
        (history, [said("assistant", "4")], [said("assistant", "5")])]
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": cue, "completion": " 4"}])
    assert list(read_conversations(sft)) == [[*history, said("assistant", " 4")]]


def test_gzipped_json_lines_and_parquet_rows_are_read_as_json_lines_are(tmp_path):
    """The Hub's preference and chat datasets come as Parquet (UltraFeedback binarized, UltraChat) or gzipped JSON
    Lines (Anthropic HH); both were read as JSON text ("not UTF-8" or "invalid JSON" on every line), so such a file
    prepared nothing. A file cut short is an error naming it: its first records would train as if they were all."""
    def said(role, content):
        return {"role": role, "content": content}

    pairs = [{"prompt": f"{i}+{i}?", "chosen": [said("user", f"{i}+{i}?"), said("assistant", str(2 * i))],
              "rejected": [said("user", f"{i}+{i}?"), said("assistant", str(2 * i + 1))], "score_chosen": 9.0}
             for i in range(3000)]  # more rows than one Parquet batch
    chats = [{"messages": pair["chosen"], "id": i} for i, pair in enumerate(pairs)]
    _write(tmp_path / "pairs.jsonl", pairs)
    _write(tmp_path / "chats.jsonl", chats)
    for name, rows in (("pairs", pairs), ("chats", chats)):
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wb") as f:
            f.write((tmp_path / f"{name}.jsonl").read_bytes())
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
    expected = list(read_preferences(tmp_path / "pairs.jsonl"))
    assert len(expected) == 3000
    for suffix in (".jsonl.gz", ".parquet"):
        assert list(read_preferences(tmp_path / f"pairs{suffix}")) == expected
        assert list(read_conversations(tmp_path / f"chats{suffix}")) == [chat["messages"] for chat in chats]
    report = SkipReport()  # a row's bad records are skipped and placed by row
    pq.write_table(pa.Table.from_pylist([pairs[0], {**pairs[1], "rejected": None}]), tmp_path / "one_bad.parquet")
    assert list(read_preferences(tmp_path / "one_bad.parquet", report=report)) == expected[:1]
    assert report.examples == {"missing or empty messages": [f"{tmp_path / 'one_bad.parquet'}:2 ('rejected' is not a "
                                                             "non-empty list)"]}
    for suffix in (".jsonl.gz", ".parquet"):
        whole = (tmp_path / f"pairs{suffix}").read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole[:len(whole) // 2])
        with pytest.raises(DataError, match=rf"{cut} cannot be read to its end \(.*\): download or write it again"):
            list(read_preferences(cut))


def test_sft_examples_skip_and_count_conversations_over_max_tokens(fmt, capsys):
    short, long = CONVERSATION[1:3], CONVERSATION
    n_short, n_long = len(sft_example(fmt, short).tokens), len(sft_example(fmt, long).tokens)
    report = SkipReport()
    kept = list(sft_examples(fmt, [long, short, long], max_tokens=n_short, report=report))
    assert [len(example.tokens) for example in kept] == [n_short]  # the limit is inclusive
    assert report.counts == {"longer than max_tokens": 2}
    assert report.examples["longer than max_tokens"] == [
        f"conversation 0 ({n_long} tokens > {n_short})", f"conversation 2 ({n_long} tokens > {n_short})"]
    assert len(list(sft_examples(fmt, [long, short]))) == 2  # no limit
    assert capsys.readouterr().err == ""
    list(sft_examples(fmt, [long, short], max_tokens=n_short))
    assert "longer than max_tokens: 1, e.g. conversation 0" in capsys.readouterr().err
    with pytest.raises(DataError, match=rf"every conversation is longer than max_tokens={n_short - 1} \(the shortest "
                                        rf"has {n_short} tokens\): raise max_tokens"):
        list(sft_examples(fmt, [long, short], max_tokens=n_short - 1))
