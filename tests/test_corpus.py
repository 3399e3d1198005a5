"""data.source as a glob of the user's own files: tokenizer training, caching, errors, and a short run on it."""

import json
import math
import sysconfig
from pathlib import Path

import ml_collections
import pytest

from llama_jax import trainer
from llama_jax.config import default_config, model_section
from llama_jax.data import corpus
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError

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
    assert len(prepared.train) + len(prepared.eval) == 60 and len(prepared.eval) >= 1
    assert prepared.train.num_tokens > 100_000
    first_doc = prepared.train[0]
    assert first_doc[0] == tokenizer.bos_id and first_doc[-1] == tokenizer.eos_id

    monkeypatch.setattr(corpus, "_build", lambda *a: pytest.fail("a cached corpus must not be rebuilt"))
    again = corpus.load_corpus(data, vocab_size=1024)
    assert again.train.num_tokens == prepared.train.num_tokens
    monkeypatch.undo()

    with_given = corpus.load_corpus(data_section(tmp_path, str(text_dir / "*.txt"), str(prepared.tokenizer_path)), 1024)
    assert with_given.tokenizer_path == prepared.tokenizer_path


def test_the_cache_follows_the_files_contents(tmp_path, text_dir):
    """Editing, adding or removing a source file, or changing the tokenizer file, builds a new cache entry."""
    data = data_section(tmp_path, str(text_dir / "*.txt"))
    first = corpus.load_corpus(data, vocab_size=600)
    documents = len(first.train) + len(first.eval)

    def entries() -> list[str]:
        return sorted(p.name for p in (tmp_path / "cache").iterdir())

    assert len(entries()) == 1

    edited = sorted(text_dir.iterdir())[0]
    edited.write_text(edited.read_text() + "\n# one more line\n")
    second = corpus.load_corpus(data, vocab_size=600)
    assert len(entries()) == 2 and second.train.num_tokens + second.eval.num_tokens > (
        first.train.num_tokens + first.eval.num_tokens)
    (text_dir / "new.txt").write_text("a brand new document")
    third = corpus.load_corpus(data, vocab_size=600)
    assert len(third.train) + len(third.eval) == documents + 1 and len(entries()) == 3
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
    with pytest.raises(DataError, match='has no string "text" field'):
        corpus.load_corpus(data, vocab_size=600)
    data.text_field = "content"
    prepared = corpus.load_corpus(data, vocab_size=600)
    assert len(prepared.train) + len(prepared.eval) == 60
