"""Tests for llama_jax.data.prepare: the library entry point, its determinism and bounds, and the CLI end to end."""

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from stdlib_text import stdlib_sources

from llama_jax.data import prepare as prepare_module
from llama_jax.data.chat import ChatFormat
from llama_jax.data.conversations import SkipReport, sft_example
from llama_jax.data.filters import Filters, TextFilter
from llama_jax.data.prepare import in_eval_split, prepare, prepare_chat
from llama_jax.data.shards import ShardedCorpus, tokenizer_hash
from llama_jax.data.tokenizer import Tokenizer, train_bpe
from llama_jax.errors import DataError

REPO = Path(__file__).resolve().parents[1]
TEXTS = stdlib_sources(skip=40, limit_chars=400_000)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_bpe(stdlib_sources(skip=0, limit_chars=200_000), 1000, path)
    return path


def read_all(directory):
    corpus = ShardedCorpus.open(directory)
    return [corpus.read(i).tolist() for i in range(len(corpus))]


def test_round_trip_in_input_order_with_a_stable_split(tmp_path, tokenizer_path):
    texts = TEXTS + TEXTS[:3]  # the repeats are removed by dedup
    manifests = prepare(texts, tokenizer_path, tmp_path / "out", filters=Filters.from_options(dedup=True),
                        workers=1, eval_fraction=0.3, shard_tokens=20_000)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    for split in ("train", "eval"):
        expected = [t for t in TEXTS if in_eval_split(t, 0.3) == (split == "eval")]
        assert read_all(tmp_path / "out" / split) == tokenizer.encode_documents(expected)
        assert manifests[split]["documents"] == len(expected)
    assert len(manifests["train"]["shards"]) > 1
    assert manifests["train"]["filters"][0]["documents_removed"] == 3


def test_output_is_identical_for_any_number_of_workers(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "_BATCH_DOCUMENTS", 3)  # many batches, so the workers interleave
    manifests = [
        prepare(TEXTS, tokenizer_path, tmp_path / name, workers=workers, eval_fraction=0.3, shard_tokens=20_000,
                filters=Filters.from_options(quality=True, max_tokens=30_000))
        for name, workers in [("one", 1), ("two", 2)]
    ]
    one, two = manifests
    for split in ("train", "eval"):
        files = [s["file"] for s in one[split]["shards"]] + ["lengths.npy"]
        for name in files:
            assert (tmp_path / "one" / split / name).read_bytes() == (tmp_path / "two" / split / name).read_bytes()
        assert one[split]["filters"] == two[split]["filters"]
    assert sum(f["documents_removed"] for f in one["train"]["filters"]) > 0, "the test exercises the filters"


def test_manifest_records_counts_tokenizer_and_sources(tmp_path, tokenizer_path):
    sources = [{"pattern": "x/*.py", "files": [{"path": "x/a.py", "bytes": 3, "sha256": "00" * 32}]}]
    texts = [*TEXTS, "tiny", "small"]
    filters = Filters.from_options(min_tokens=50)
    manifests = prepare(texts, tokenizer_path, tmp_path / "out", sources_info=sources, filters=filters,
                        workers=1, eval_fraction=0.3)
    train, eval_ = manifests["train"], manifests["eval"]
    assert train == json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert (train["split"], eval_["split"]) == ("train", "eval")
    assert train["tokenizer"] == {"path": str(tokenizer_path), "tokenizer_hash": tokenizer_hash(tokenizer_path)}
    assert train["sources"] == eval_["sources"] == sources
    assert train["input"] == {"documents": len(texts), "characters": sum(map(len, texts))}
    removed = filters.length.documents_removed
    assert train["filters"] == [filters.length.report()] and removed == 2
    assert train["documents"] + eval_["documents"] + removed == len(texts)
    assert train["tokens"] == sum(s["tokens"] for s in train["shards"]) == int(np.load(
        tmp_path / "out" / "train" / "lengths.npy").sum())
    assert train["eval_fraction"] == 0.3 and isinstance(train["command"], list)


def test_a_corpus_prepared_with_another_tokenizer_is_refused(tmp_path, tokenizer_path):
    prepare(TEXTS, tokenizer_path, tmp_path / "out", workers=1, eval_fraction=0)
    other = train_bpe(["entirely different text, so other merges"] * 50, 700, tmp_path / "other" / "tokenizer.model")
    assert other.vocab_size != Tokenizer.from_file(tokenizer_path).vocab_size
    ShardedCorpus.open(tmp_path / "out" / "train", tokenizer_hash=tokenizer_hash(tokenizer_path))
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        ShardedCorpus.open(tmp_path / "out" / "train", tokenizer_hash=tokenizer_hash(tmp_path / "other"))


def test_eval_fraction_zero_writes_only_train(tmp_path, tokenizer_path):
    manifests = prepare(TEXTS[:3], tokenizer_path, tmp_path / "out", workers=1, eval_fraction=0)
    assert list(manifests) == ["train"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train"]


def test_a_documents_side_of_the_split_does_not_depend_on_the_others(tmp_path, tokenizer_path):
    texts = [f"document number {i} says something" for i in range(300)]
    prepare(texts, tokenizer_path, tmp_path / "all", workers=1, eval_fraction=0.2)
    prepare(texts[::3], tokenizer_path, tmp_path / "third", workers=1, eval_fraction=0.2)
    held_out = read_all(tmp_path / "all" / "eval")
    subset = Tokenizer.from_file(tokenizer_path).encode_documents(texts[::3])
    assert 40 < len(held_out) < 80
    assert read_all(tmp_path / "third" / "eval") == [d for d in held_out if d in subset]


def test_errors_name_the_fix_and_leave_no_output(tmp_path, tokenizer_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="not found"):
        prepare(TEXTS, tmp_path / "missing.model", out)
    with pytest.raises(DataError, match=r"no documents left to train on: 3 read \(token_length removed 3\)"):
        prepare(TEXTS[:3], tokenizer_path, out, filters=Filters.from_options(max_tokens=1), workers=1)
    with pytest.raises(DataError, match="no document fell in the eval split"):
        prepare(["just one text"], tokenizer_path, out, workers=1, eval_fraction=0.01)
    with pytest.raises(DataError, match=r"eval_fraction must be in \[0, 1\)"):
        prepare(TEXTS, tokenizer_path, out, eval_fraction=1.0)
    assert list(tmp_path.iterdir()) == [], "nothing is published, no temporary directory is left"


def test_out_dir_is_replaced_only_if_it_holds_a_preparation(tmp_path, tokenizer_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="exists and is not a prepared corpus"):
        prepare(TEXTS[:3], tokenizer_path, tmp_path / "mine", workers=1, eval_fraction=0)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    prepare(TEXTS[:3], tokenizer_path, tmp_path / "out", workers=1, eval_fraction=0)
    prepare(TEXTS[3:4], tokenizer_path, tmp_path / "out", workers=1, eval_fraction=0)
    assert len(ShardedCorpus.open(tmp_path / "out" / "train")) == 1


def test_out_dir_may_be_a_link_but_not_the_current_directory(tmp_path, tokenizer_path, monkeypatch):
    """Before, a link failed after all the work (rmtree refuses links), leaving the output in a hidden temporary
    directory; `--out .` made its temporary directory inside the current one and deleted both."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    prepare(TEXTS[:3], tokenizer_path, tmp_path / "link", workers=1, eval_fraction=0)
    assert (tmp_path / "link").is_symlink() and len(ShardedCorpus.open(tmp_path / "real" / "train")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for here in (".", ".."):
        with pytest.raises(DataError, match=rf"--out {re.escape(here)} is the current directory or holds it"):
            prepare(TEXTS[:3], tokenizer_path, Path(here), workers=1, eval_fraction=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link", "real"] and not any(Path().iterdir())


def test_preference_pairs_replace_only_a_preparation(tmp_path, tokenizer_path):
    """Before, python -m llama_jax.data.preferences --out deleted whatever directory it named."""
    from llama_jax.data.preferences import prepare_preferences

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(3)))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="exists and is not a prepared corpus"):
        prepare_preferences(pairs, tokenizer_path, tmp_path / "mine", eval_fraction=0)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert prepare_preferences(pairs, tokenizer_path, tmp_path / "out", eval_fraction=0) == {"train": 3}
    assert prepare_preferences(pairs, tokenizer_path, tmp_path / "out", eval_fraction=0) == {"train": 3}


def test_preference_pairs_are_held_out_by_prompt(tmp_path, tokenizer_path):
    """Several pairs per prompt (rankings made into pairs): split by pair, the held-out pairs' prompts and responses
    were trained on."""
    from llama_jax.data.preferences import prepare_preferences

    pairs = tmp_path / "pairs.jsonl"
    prompts = [f"question {i}" for i in range(60)]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": f"best {p}", "rejected": f"worse {k} {p}"}) + "\n"
                             for p in prompts for k in range(3)))
    written = prepare_preferences(pairs, tokenizer_path, tmp_path / "out", eval_fraction=0.2)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    sides = {split: [tokenizer.decode(ids) for ids in read_all(tmp_path / "out" / split)] for split in written}
    for p in prompts:
        in_eval = sum(f"best {p}<" in text for text in sides["eval"])
        in_train = sum(f"best {p}<" in text for text in sides["train"])
        assert sorted([in_eval, in_train]) == [0, 3], p  # a pair's chosen sequence, on one side only
    assert 0 < written["eval"] < written["train"] and written["eval"] % 3 == 0


def test_input_is_read_lazily_with_bounded_work_in_flight(tokenizer_path):
    pulled = itertools.count()

    def endless():
        while True:
            next(pulled)
            yield ["some text"], [False]

    results = prepare_module._tokenize(endless(), tokenizer_path, [], workers=2)
    next(results)
    results.close()
    assert next(pulled) <= prepare_module._BATCHES_IN_FLIGHT_PER_WORKER * 2 + 1


class KillsTheWorker(TextFilter):
    name = "kills_the_worker"

    def settings(self):
        return {}

    def rejects(self, text):
        os._exit(1)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match="worker process died.*fewer --workers"):
        prepare(TEXTS, tokenizer_path, tmp_path / "out", filters=Filters(text=[KillsTheWorker()]), workers=2)


# ---------------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llama_jax.data.prepare", *map(str, args)], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_with_filters_and_verify(tmp_path, tokenizer_path):
    data = tmp_path / "data"
    data.mkdir()
    prose = [f"Paragraph {i} of a web page about gardening, with enough words to keep it in the corpus." for i in
             range(15)]
    for i, text in enumerate(prose[:3]):
        (data / f"page{i}.txt").write_text(text)
    records = [*prose[3:], prose[3], "#win #free #prize #now", "Hi.", prose[4]]
    (data / "web.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in records) + "{broken json\n")
    out = tmp_path / "prepared"

    result = run_cli("--source", data / "*.txt", "--source", data / "web.jsonl", "--tokenizer", tokenizer_path,
                     "--out", out, "--text_field", "content", "--dedup", "--quality", "--min_tokens", "8",
                     "--workers", "2", "--eval_fraction", "0.2", "--shard_tokens", "100")
    assert result.returncode == 0, result.stderr
    assert "filter exact_duplicates: removed 2 documents" in result.stderr
    assert "filter symbol_word_ratio: removed 1 documents" in result.stderr
    assert "filter duplicate_lines: removed 0 documents" in result.stderr
    assert "filter token_length: removed 1 documents" in result.stderr
    assert "1 malformed JSON line" in result.stderr and "peak RSS" in result.stderr
    train, eval_ = (json.loads((out / s / "manifest.json").read_text()) for s in ("train", "eval"))
    assert train["documents"] + eval_["documents"] == 15 and eval_["documents"] > 0
    assert len(train["shards"]) > 1
    assert train["read_report"].startswith("read 19 documents from 4 files")
    files = {f["path"]: f for source in train["sources"] for f in source["files"]}
    assert sorted(files) == sorted(str(p) for p in data.iterdir())
    assert files[str(data / "web.jsonl")]["sha256"] == hashlib.sha256((data / "web.jsonl").read_bytes()).hexdigest()

    verified = run_cli("--verify", out)
    assert verified.returncode == 0 and verified.stdout.count("ok: ") == 2, verified.stderr
    shard = out / "train" / "shard-00000.array_record"
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 2] ^= 1
    shard.write_bytes(bytes(flipped))
    broken = run_cli("--verify", out)
    assert broken.returncode == 2 and len(broken.stderr.strip().splitlines()) == 1
    assert broken.stderr.startswith("error: ") and "shard-00000.array_record does not match its sha256" in broken.stderr
    assert broken.stderr.endswith(f"with --out {out}\n"), "the fix names --out, not the split (it said --out OUT/train)"


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    result = run_cli("--source", tmp_path / "a.txt", "--tokenizer", tmp_path / "nope.model", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.startswith("error: tokenizer file") and len(result.stderr.strip().splitlines()) == 1
    assert run_cli("--out", tmp_path / "o").returncode == 2  # usage errors exit 2 too (argparse)


# ---------------------------------------------------------------------------------------------------------
# Chat (SFT) data. train_bpe's tokenizers carry Llama 3's special tokens, so they get the built-in Llama 3 format.

LINES = [line.strip() for text in TEXTS for line in text.splitlines() if len(line.strip()) > 10]
CONVERSATIONS = [
    [
        *([{"role": "system", "content": "You answer in one line."}] if i % 3 == 0 else []),
        {"role": "user", "content": f"What does line {i} of this file do?"},
        {"role": "assistant", "content": " ".join(LINES[13 * i : 13 * i + i % 5 + 1])},
        *([{"role": "user", "content": "And then?"}, {"role": "assistant", "content": f"Step {i} — naïve 🙂"}]
          if i % 4 == 0 else []),
    ]
    for i in range(40)
]
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def fmt(tokenizer_path):
    return ChatFormat.from_directory(tokenizer_path, Tokenizer.from_file(tokenizer_path))


def read_examples(directory):
    """(tokens, loss mask) of every document, as lists."""
    corpus = ShardedCorpus.open(directory)
    assert corpus.has_loss_mask
    return [(corpus.read(i).tolist(), corpus.read_loss_mask(i).tolist()) for i in range(len(corpus))]


def expected_examples(fmt, conversations, eval_fraction, split):
    examples = [sft_example(fmt, m) for m in conversations
                if in_eval_split(json.dumps(m, sort_keys=True), eval_fraction) == (split == "eval")]
    return [(e.tokens.tolist(), e.loss_mask.tolist()) for e in examples]


def test_chat_documents_are_sft_examples_with_their_loss_masks(tmp_path, tokenizer_path, fmt):
    manifests = prepare_chat(CONVERSATIONS, tokenizer_path, tmp_path / "out", workers=1, eval_fraction=0.3,
                             shard_tokens=500)
    for split in ("train", "eval"):
        expected = expected_examples(fmt, CONVERSATIONS, 0.3, split)
        assert read_examples(tmp_path / "out" / split) == expected and expected
        assert manifests[split]["loss_mask"] is True and manifests[split]["skipped"]["total"] == 0
        assert manifests[split]["chat"] == {"template_sha256": hashlib.sha256(fmt.template_text.encode()).hexdigest(),
                                            "max_tokens": None, "dedup": False}
    assert len(manifests["train"]["shards"]) > 1
    assert manifests["train"]["input"]["documents"] == len(CONVERSATIONS)


def test_chat_output_is_identical_for_any_number_of_workers(tmp_path, tokenizer_path, fmt, monkeypatch):
    monkeypatch.setattr(prepare_module, "_BATCH_DOCUMENTS", 3)  # many batches, so the workers interleave
    max_tokens = int(np.median([len(sft_example(fmt, m).tokens) for m in CONVERSATIONS]))
    reordered = [[dict(reversed(message.items())) for message in m] for m in CONVERSATIONS[:5]]  # same JSON, sorted
    conversations = [*CONVERSATIONS, *reordered]
    manifests = [
        prepare_chat(conversations, tokenizer_path, tmp_path / name, workers=workers, eval_fraction=0.3,
                     max_tokens=max_tokens, dedup=True, shard_tokens=500)
        for name, workers in [("one", 1), ("two", 2)]
    ]
    one, two = manifests
    for split in ("train", "eval"):
        for name in [s["file"] for s in one[split]["shards"]] + ["lengths.npy"]:
            assert (tmp_path / "one" / split / name).read_bytes() == (tmp_path / "two" / split / name).read_bytes()
        assert one[split]["skipped"] == two[split]["skipped"]
    counts = one["train"]["skipped"]["counts"]
    assert counts["exact duplicate"] == 5 and 10 < counts["longer than max_tokens"] < 30
    kept = one["train"]["documents"] + one["eval"]["documents"]
    assert kept == len(CONVERSATIONS) - counts["longer than max_tokens"]
    assert max(np.load(tmp_path / "one" / "train" / "lengths.npy")) <= max_tokens  # skipped, never truncated


def test_chat_errors_name_the_fix_and_leave_no_output(tmp_path, tokenizer_path, fmt):
    out = tmp_path / "out"
    too_long = len(sft_example(fmt, CONVERSATIONS[0]).tokens) - 1
    report = SkipReport()
    with pytest.raises(DataError, match=r"no documents left to train on: 1 conversations read \(longer than "
                                        r"max_tokens: 1\): .*raise --max_tokens"):
        prepare_chat(CONVERSATIONS[:1], tokenizer_path, out, workers=1, max_tokens=too_long, skip_report=report)
    assert report.examples["longer than max_tokens"] == [f"conversation 0 ({too_long + 1} tokens > {too_long})"]
    with pytest.raises(DataError, match=r"conversation 1 \(from 0, in --source order\): .*no assistant turn"):
        prepare_chat([CONVERSATIONS[0], CONVERSATIONS[0][:1]], tokenizer_path, out, workers=2, eval_fraction=0)
    assert list(tmp_path.iterdir()) == [], "nothing is published, no temporary directory is left"


def test_a_tokenizer_without_a_chat_format_is_a_data_error(tmp_path):
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS[:3], tokenizers.trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_special_tokens([tokenizers.AddedToken(name, special=True) for name in ("<|im_start|>", "<|im_end|>")])
    directory = tmp_path / "chatml"
    directory.mkdir()
    bpe.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(DataError, match=r"has no chat template .*lacks Llama 3's chat tokens: write the model's "
                                        r"Jinja template to .*chatml/chat_template\.jinja"):
        prepare_chat(CONVERSATIONS, directory / "tokenizer.json", tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()

    (directory / "chat_template.jinja").write_text(CHATML)  # the fix the error names: now its template renders
    prepare_chat(CONVERSATIONS, directory, tmp_path / "out", workers=2, eval_fraction=0)
    chatml = ChatFormat.from_directory(directory, Tokenizer.from_file(directory))
    assert read_examples(tmp_path / "out" / "train") == expected_examples(chatml, CONVERSATIONS, 0, "train")


def test_cli_chat_end_to_end(tmp_path, tokenizer_path, fmt):
    data = tmp_path / "sft"
    data.mkdir()
    recital = max(TEXTS, key=len)[:3000]  # over 300 tokens whichever Python's library TEXTS comes from
    long = [{"role": "user", "content": "Recite."}, {"role": "assistant", "content": recital}]
    lines = [json.dumps({"messages": m}) for m in CONVERSATIONS[:20]]
    (data / "a.jsonl").write_text("\n".join([*lines[:10], "{broken", json.dumps({"messages": long})]) + "\n")
    (data / "b.jsonl").write_text("\n".join([*lines[10:], lines[0], '{"text": "no messages"}']) + "\n")
    out = tmp_path / "prepared"
    result = run_cli("--chat", "--source", data / "*.jsonl", "--tokenizer", tokenizer_path, "--out", out,
                     "--max_tokens", "300", "--dedup", "--workers", "2", "--eval_fraction", "0.2")
    assert result.returncode == 0, result.stderr
    assert "skipped 4 post-training records:" in result.stderr
    assert f"invalid JSON: 1, e.g. {data / 'a.jsonl'}:11" in result.stderr
    assert "longer than max_tokens: 1, e.g. conversation 10 (" in result.stderr
    assert "exact duplicate: 1, e.g. conversation 21" in result.stderr and "22 conversations read" in result.stderr
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["loss_mask"] is True and train["chat"]["max_tokens"] == 300
    assert train["skipped"]["counts"] == {"invalid JSON": 1, "longer than max_tokens": 1, "exact duplicate": 1,
                                          "missing or empty messages": 1}
    assert sorted(f["path"] for f in train["sources"][0]["files"]) == [str(data / "a.jsonl"), str(data / "b.jsonl")]
    for split in ("train", "eval"):
        assert read_examples(out / split) == expected_examples(fmt, CONVERSATIONS[:20], 0.2, split)
    assert run_cli("--verify", out).returncode == 0


def test_cli_chat_refuses_text_filters(capsys):
    for flag in (["--quality"], ["--min_tokens", "5"], ["--text_field", "content"]):
        with pytest.raises(SystemExit) as exit_:
            prepare_module.main(["--chat", "--source", "x.jsonl", "--tokenizer", "t", "--out", "o", *flag])
        assert exit_.value.code == 2
        assert f"{flag[0]} apply to text documents, not to --chat conversations" in capsys.readouterr().err


def test_a_corpus_in_a_bucket_is_refused_with_the_gcsfuse_fix(tmp_path, monkeypatch, capsys):
    """ArrayRecord opens local files only. A gs:// --out was read as the relative path gs:/bucket/..., so the corpus
    went into a local directory named gs: while the user looked for it in the bucket."""
    from llama_jax.data import preferences

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text")
    for module, argv in ((prepare_module, ["--source", "a.txt", "--tokenizer", "t", "--out", "gs://bucket/prepared"]),
                         (prepare_module, ["--verify", "gs://bucket/prepared"]),
                         (preferences, ["--source", "p.jsonl", "--tokenizer", "t", "--out", "gs://bucket/pairs"])):
        assert module.main(argv) == 2
        error = capsys.readouterr().err
        assert "gs://bucket/" in error and "is a URL, but a prepared corpus is ArrayRecord files" in error, error
        assert "gcsfuse --implicit-dirs BUCKET /mnt/BUCKET" in error
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"], "nothing written where the URL was taken for a path"
    with pytest.raises(DataError, match="mount the bucket with gcsfuse"):
        ShardedCorpus.open("gs://bucket/prepared/train")
