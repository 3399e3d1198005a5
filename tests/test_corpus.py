"""data.source as a glob of the user's own files: tokenizer training, caching, errors, and a short run on it."""

import errno
import json
import math
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cli_run import without_timing
from llama_jax import checkpoint, trainer
from llama_jax.config import default_config, eval_source, mixture_source, model_section
from llama_jax.data import corpus
from llama_jax.data.pipeline import TrainBatches
from llama_jax.data.preferences import is_preference_store
from llama_jax.data.prepare import in_eval_split, prepare, prepare_chat
from llama_jax.data.schedule import BatchSchedule
from llama_jax.data.shards import ShardedCorpus
from llama_jax.data.tokenizer import Tokenizer, train_bpe
from llama_jax.errors import ConfigError, DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def text_dir(tmp_path):
    """60 real documents: standard-library modules copied as .txt files."""
    directory = tmp_path / "texts"
    directory.mkdir()
    for path in sorted(STDLIB.glob("[a-m]*.py"))[:60]:
        (directory / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8"))
    return directory


def data_section(tmp_path: Path, source: str, tokenizer: str = "") -> ml_collections.ConfigDict:
    data = default_config().data
    data.source, data.tokenizer, data.cache_dir = source, tokenizer, str(tmp_path / "cache")
    return data


def test_glob_source_trains_a_tokenizer_caches_and_holds_out_eval(tmp_path, text_dir, monkeypatch):
    data = data_section(tmp_path, str(text_dir / "*.txt"))
    prepared = corpus.load_corpus(data, vocab_size=1024)
    tokenizer = Tokenizer.from_file(prepared.tokenizer_path)
    assert tokenizer.vocab_size == 1024
    assert len(prepared.sources[0].train) + len(prepared.sources[0].eval) == 60 and len(prepared.sources[0].eval) >= 1
    assert prepared.sources[0].train.num_tokens > 100_000
    first_doc = prepared.sources[0].train[0]
    assert first_doc[0] == tokenizer.bos_id and first_doc[-1] == tokenizer.eos_id

    monkeypatch.setattr(corpus, "_build", lambda *a: pytest.fail("a cached corpus must not be rebuilt"))
    again = corpus.load_corpus(data, vocab_size=1024)
    assert again.sources[0].train.num_tokens == prepared.sources[0].train.num_tokens
    monkeypatch.undo()

    with_given = corpus.load_corpus(data_section(tmp_path, str(text_dir / "*.txt"), str(prepared.tokenizer_path)), 1024)
    assert with_given.tokenizer_path == prepared.tokenizer_path


def test_the_cache_follows_the_files_contents(tmp_path, text_dir):
    """Editing, adding or removing a source file, or changing the tokenizer file, builds a new cache entry."""
    data = data_section(tmp_path, str(text_dir / "*.txt"))
    first = corpus.load_corpus(data, vocab_size=600)
    documents = len(first.sources[0].train) + len(first.sources[0].eval)

    def entries() -> list[str]:
        return sorted(p.name for p in (tmp_path / "cache").iterdir())

    assert len(entries()) == 1

    edited = sorted(text_dir.iterdir())[0]
    edited.write_text(edited.read_text() + "\n# one more line\n")
    second = corpus.load_corpus(data, vocab_size=600)
    assert len(entries()) == 2 and second.sources[0].train.num_tokens + second.sources[0].eval.num_tokens > (
        first.sources[0].train.num_tokens + first.sources[0].eval.num_tokens)
    (text_dir / "new.txt").write_text("a brand new document")
    third = corpus.load_corpus(data, vocab_size=600)
    assert len(third.sources[0].train) + len(third.sources[0].eval) == documents + 1 and len(entries()) == 3
    corpus.load_corpus(data, vocab_size=600)
    assert len(entries()) == 3, "unchanged files reuse the entry"

    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(Path(first.tokenizer_path).read_bytes())
    given = data_section(tmp_path, str(text_dir / "*.txt"), str(tokenizer))
    corpus.load_corpus(given, vocab_size=600)
    other = corpus.load_corpus(data_section(tmp_path, str(text_dir / "*.txt")), vocab_size=700)
    tokenizer.write_bytes(Path(other.tokenizer_path).read_bytes())
    before = entries()
    corpus.load_corpus(given, vocab_size=600)
    assert len(entries()) == len(before) + 1, "a changed tokenizer file must not reuse the old tokens"


def test_a_later_phase_shares_the_runs_stores_of_the_same_documents_and_tokenizes_only_new_ones(tmp_path, text_dir,
                                                                                                monkeypatch):
    """A run that trained its tokenizer keys its corpus without it: a later phase that loaded the same documents by
    the tokenizer's path tokenized them into a second cache entry, 13 s for the stdlib mixture of the recipe."""
    prose = tmp_path / "prose"
    prose.mkdir()
    for i, path in enumerate(sorted(text_dir.iterdir())[:30]):
        (prose / f"{i}.md").write_text(ast_free_prose(path.read_text()))
    run_data = data_section(tmp_path, "unused when data.mixture is set")
    run_data.mixture.code = mixture_source(str(text_dir / "*.txt"), weight=1.0)
    run = corpus.load_corpus(run_data, vocab_size=600)

    phase_data = data_section(tmp_path, "unused when data.mixture is set")
    phase_data.mixture.python = mixture_source(str(text_dir / "*.txt"), weight=0.25)
    phase_data.mixture.prose = mixture_source(str(prose), weight=0.75)
    phase_data.eval_sources.held = eval_source(str(prose / "1*.md"))
    built, build = [], corpus._build
    monkeypatch.setattr(corpus, "_build", lambda specs, *rest: (built.append([s.name for s in specs]),
                                                                 build(specs, *rest)))
    phase = corpus.load_corpus(phase_data, vocab_size=600, run=run)
    assert built == [["prose"]], "only the documents the run has not read are tokenized"
    assert phase.tokenizer_path == run.tokenizer_path
    sources = {s.name: s for s in phase.sources}
    assert {name: s.weight for name, s in sources.items()} == {"python": 0.25, "prose": 0.75}
    assert sources["python"].train is run.sources[0].train and sources["python"].eval is run.sources[0].eval
    assert list(phase.held_out) == ["held"]

    by_path = data_section(tmp_path, str(prose), str(run.tokenizer_path))
    alone = corpus.load_corpus(by_path, vocab_size=600).sources[0]
    for split in ("train", "eval"):
        ours, theirs = getattr(sources["prose"], split), getattr(alone, split)
        assert len(ours) == len(theirs) and all((ours[i] == theirs[i]).all() for i in range(len(ours)))


def test_built_in_chat_data_is_prepared_with_the_runs_tokenizer_under_its_cache(tmp_path, text_dir, capsys):
    tokenizer = str(tmp_path / "tokenizer.model")
    train_bpe([path.read_text() for path in sorted(text_dir.iterdir())], 600, tokenizer)
    chat = corpus.load_corpus(data_section(tmp_path, "stdlib_chat", tokenizer), vocab_size=600)
    assert chat.sources[0].train.has_loss_mask and len(chat.sources[0].eval) > 0
    assert "Preparing the built-in 'stdlib_chat' with the run's tokenizer in " in capsys.readouterr().err
    corpus.load_corpus(data_section(tmp_path, "stdlib_chat", tokenizer), vocab_size=600)
    assert "Preparing" not in capsys.readouterr().err  # the second use reads the cache
    pairs_data = data_section(tmp_path, "stdlib_preferences", tokenizer)
    pairs_data.eval_sources.again = eval_source("stdlib_preferences")
    pairs = corpus.load_corpus(pairs_data, vocab_size=600)
    assert is_preference_store(pairs.sources[0].train) and is_preference_store(pairs.held_out["again"])
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["preferences", "sft"]
    with pytest.raises(ConfigError, match=r"source 'data' \(stdlib_chat\) is prepared with the run's tokenizer: set "
                                          r"data.tokenizer"):
        corpus.load_corpus(data_section(tmp_path, "stdlib_chat"), vocab_size=600)


def test_bad_sources_are_data_errors(tmp_path, text_dir):
    with pytest.raises(DataError, match="does not exist"):
        corpus.load_corpus(data_section(tmp_path, str(text_dir / "*.txt"), str(tmp_path / "no.model")), 1024)
    with pytest.raises(DataError):
        corpus.load_corpus(data_section(tmp_path, str(tmp_path / "nothing" / "*.txt")), 1024)
    single = tmp_path / "one"
    single.mkdir()
    (single / "a.txt").write_text("just one document")
    with pytest.raises(DataError, match="at least 2"):
        corpus.load_corpus(data_section(tmp_path, str(single / "*.txt")), 1024)
    assert not list((tmp_path / "cache").glob(".*tmp*")), "a failed build must leave nothing behind"


def test_training_on_user_files(tmp_path, text_dir):
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=1024)
    cfg.data = data_section(tmp_path, str(text_dir / "*.txt"))
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.optim.warmup_steps = 12, 6, 1
    metrics = trainer.train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [6, 12]
    assert metrics["eval_loss"] < math.log(1024) - 0.2  # below a uniform guess, where random init starts


def test_jsonl_sources_read_the_configured_field(tmp_path, text_dir):
    lines = [json.dumps({"content": path.read_text(), "id": i}) for i, path in enumerate(sorted(text_dir.iterdir()))]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    data = data_section(tmp_path, str(tmp_path / "docs.jsonl"))
    with pytest.raises(DataError, match="no usable document.*data.text_field"):
        corpus.load_corpus(data, vocab_size=600)
    data.text_field = "content"
    prepared = corpus.load_corpus(data, vocab_size=600)
    assert len(prepared.sources[0].train) + len(prepared.sources[0].eval) == 60


def test_training_on_a_weighted_mixture_logs_each_sources_share_and_eval_loss(tmp_path, text_dir):
    prose = tmp_path / "prose"
    prose.mkdir()
    for i, path in enumerate(sorted(text_dir.iterdir())[:30]):
        (prose / f"{i}.md").write_text(ast_free_prose(path.read_text()))
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=1024)
    cfg.data = data_section(tmp_path, "unused when data.mixture is set")
    cfg.data.mixture.code = mixture_source(str(text_dir / "*.txt"), weight=0.75)
    cfg.data.mixture.prose = mixture_source(str(prose), weight=0.25)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.optim.warmup_steps = 12, 6, 1
    trainer.train(cfg, tmp_path / "run")
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["mixture/code"] + last["mixture/prose"] == pytest.approx(1.0)
    assert abs(last["mixture/code"] - 0.75) < 0.1  # 96 rows: the share within one block of 1,024 is approximate
    assert {"eval_loss/code", "eval_loss/prose"} <= last.keys()
    assert last["eval_loss"] == pytest.approx(0.75 * last["eval_loss/code"] + 0.25 * last["eval_loss/prose"])


def ast_free_prose(code: str) -> str:
    """The comment lines of a module: a second, different kind of text from the same files."""
    return "\n".join(line.strip("# ") for line in code.splitlines() if line.lstrip().startswith("#")) or "no comments"


def test_training_on_prepared_shards_and_refusing_another_tokenizer(tmp_path, text_dir):
    texts = [path.read_text() for path in sorted(text_dir.iterdir())]
    tokenizer = train_bpe(texts, 1024, tmp_path / "tokenizer.model")
    for name, part in (("first", texts[:30]), ("second", texts[30:])):
        prepare(part, tmp_path / "tokenizer.model", tmp_path / name, workers=1, eval_fraction=0.1)
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=1024)
    cfg.data = data_section(tmp_path, "unused", str(tmp_path / "tokenizer.model"))
    cfg.data.mixture.first = mixture_source(str(tmp_path / "first"), weight=0.5)
    cfg.data.mixture.second = mixture_source(str(tmp_path / "second"), weight=0.5)
    loaded = corpus.load_corpus(cfg.data, vocab_size=1024)
    first = loaded.sources[0].train
    train_texts = [text for text in texts[:30] if not in_eval_split(text, 0.1)]
    assert isinstance(first, ShardedCorpus) and len(first) == len(train_texts)
    assert first.read(0).tolist() == tokenizer.encode_documents(train_texts[:1])[0]
    assert not (tmp_path / "cache").exists(), "prepared sources are read in place, never cached again"
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.optim.warmup_steps = 6, 6, 1
    metrics = trainer.train(cfg, tmp_path / "run")
    assert {"mixture/first", "mixture/second", "eval_loss/first", "eval_loss/second"} <= metrics.keys()

    train_bpe(texts, 1100, tmp_path / "other.model")
    cfg.data.tokenizer = str(tmp_path / "other.model")
    with pytest.raises(DataError, match="another tokenizer"):
        corpus.load_corpus(cfg.data, vocab_size=1100)
    cfg.data.tokenizer = ""
    with pytest.raises(ConfigError, match="data.tokenizer"):
        corpus.load_corpus(cfg.data, vocab_size=1024)


def test_prepared_chat_examples_reach_the_batches_with_their_masks(tmp_path, text_dir):
    """Conversations prepared with their SFT masks: the trained-on targets are exactly the assistant turns."""
    texts = [path.read_text() for path in sorted(text_dir.iterdir())]
    tokenizer = train_bpe(texts, 1024, tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    conversations = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
                     for i in range(40)]
    prepare_chat(conversations, tmp_path / "tokenizer.model", tmp_path / "chat", workers=1, eval_fraction=0.1)
    data = data_section(tmp_path, str(tmp_path / "chat"), str(tmp_path / "tokenizer.model"))
    source = corpus.load_corpus(data, vocab_size=1024).sources[0]
    assert source.train.has_loss_mask
    batch = TrainBatches([source.train], [1.0], BatchSchedule(4, 64), seed=0).local_batch(0)
    for row in range(4):
        learned = tokenizer.decode(batch["targets"][row][batch["loss_mask"][row] == 1].tolist())
        asked = tokenizer.decode(batch["targets"][row][(batch["loss_mask"][row] == 0) & (batch["segment_ids"][row] > 0)].tolist())
        assert "answer" in learned and "question" not in learned and "answer" not in asked


def test_evaluation_only_sources_are_held_out_whole_tokenized_by_the_run_and_cached(tmp_path, text_dir, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(5)]
    for i, text in enumerate(texts):
        (other / f"{i}.txt").write_text(text)
    data = data_section(tmp_path, str(text_dir / "*.txt"))
    data.eval_sources.other = eval_source(str(other))
    loaded = corpus.load_corpus(data, vocab_size=1024)
    tokenizer = Tokenizer.from_file(loaded.tokenizer_path)  # the one trained on the training source
    held_out = loaded.held_out["other"]
    assert [held_out[i].tolist() for i in range(len(held_out))] == tokenizer.encode_documents(texts), "every document"
    assert len(loaded.sources[0].train) + len(loaded.sources[0].eval) == 60, "the training source is unchanged"

    monkeypatch.setattr(corpus.documents, "read_documents", lambda *a, **k: pytest.fail("a cached set is not re-read"))
    assert len(corpus.load_corpus(data, vocab_size=1024).held_out["other"]) == 5
    monkeypatch.undo()

    prepare(texts * 4, loaded.tokenizer_path, tmp_path / "prepared", workers=1, eval_fraction=0.5)
    data.eval_sources.other = eval_source(str(tmp_path / "prepared"))
    data.tokenizer = str(loaded.tokenizer_path)
    from_prepared = corpus.load_corpus(data, vocab_size=1024).held_out["other"]
    assert len(from_prepared) == len(ShardedCorpus.open(tmp_path / "prepared" / "eval")), "a prepared set's eval split"


def test_a_cache_that_cannot_be_written_is_named_with_the_setting(tmp_path, text_dir):
    """Read-only, someone else's, or (here, as even root cannot write it) a path through a file: before, the
    OSError of a temporary directory deep inside. A cache that is complete is only read, so it may be read-only."""
    (tmp_path / "afile").write_text("")
    unwritable = tmp_path / "afile" / "cache"
    message = rf"the cache directory {unwritable} cannot be written \(Not a directory: .*data.cache_dir"
    data = data_section(tmp_path, str(text_dir / "*.txt"))
    data.cache_dir = str(unwritable)
    with pytest.raises(DataError, match=message):
        corpus.load_corpus(data, vocab_size=1024)
    train_bpe([path.read_text() for path in sorted(text_dir.iterdir())[:3]], 1024, tmp_path / "t.model")
    with pytest.raises(DataError, match=message):
        corpus.held_out_store("other", str(text_dir), tmp_path / "t.model", unwritable)


def test_a_directory_above_the_cache_that_cannot_be_made_is_named_with_the_setting(tmp_path):
    """A cache under a home that cannot be written (`~/.cache/llama_jax`, the default): mkdir fails on the first
    directory above the cache it has to make, which was not taken for the cache's, so the OSError was a traceback.
    (The error is raised here by hand: root may write anywhere a test could make.)"""
    cache_dir = tmp_path / "home" / ".cache" / "llama_jax"
    for failed in (tmp_path / "home", cache_dir / "corpus-1234.tmp"):
        with pytest.raises(DataError, match=rf"the cache directory {cache_dir} cannot be written \(Permission denied: "
                                            rf"{failed}\): give a writable one \(data.cache_dir"):
            with corpus.writing_cache(cache_dir):
                raise PermissionError(errno.EACCES, "Permission denied", str(failed))
    with pytest.raises(PermissionError), corpus.writing_cache(cache_dir):  # another file's error stays as it is
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "elsewhere"))


def test_an_evaluation_only_source_is_logged_apart_and_changes_nothing_else(tmp_path, text_dir):
    one = tmp_path / "one"
    one.mkdir()
    text = "def add(a, b):\n    return a + b\n"
    (one / "add.txt").write_text(text)

    def run(name: str, **eval_sources):
        cfg = default_config()
        cfg.model = model_section("debug", vocab_size=1024)
        cfg.data = data_section(tmp_path, str(text_dir / "*.txt"))
        for key, value in eval_sources.items():
            cfg.data.eval_sources[key] = value
        cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
        cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.optim.warmup_steps = 6, 3, 3, 1
        trainer.train(cfg, tmp_path / name)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    plain = run("plain")
    with_set = run("with_set", add=eval_source(str(one)))
    assert [{k: v for k, v in m.items() if k != "eval_loss/add"} for m in without_timing(with_set)] == \
        without_timing(plain), "the training and its own eval_loss are bitwise those of a run without the set"
    assert [("eval_loss/add" in m) for m in with_set] == [True, True]

    model, tokenizer_path = checkpoint.load_model(tmp_path / "with_set")
    tokens = jnp.asarray(Tokenizer.from_file(tokenizer_path).encode_documents([text])[0])
    logits = model(tokens[None, :-1])[0].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=-1).mean()
    assert with_set[-1]["eval_loss/add"] == pytest.approx(float(nll), rel=1e-4), "the document's loss under the model"
