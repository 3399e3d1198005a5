"""Multiple-choice evaluation: scores against a direct per-example computation and against transformers, sharded
scoring, the file layouts and their error messages, and the CLI."""

import gzip
import inspect
import json
import math

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from flax import nnx

from cli_run import cache_dir, read_metrics, run_cli  # noqa: F401 (a fixture)
from hf_reference import random_hf_llama
from llama_jax import evaluate as ev
from llama_jax import trainer
from llama_jax.config import default_config
from llama_jax.convert import open_checkpoint
from llama_jax.data.corpus import held_out_store
from llama_jax.data.tokenizer import train_bpe
from llama_jax.errors import DataError
from llama_jax.model import Llama, LlamaConfig, ModelDef
from llama_jax.parallel.mesh import make_mesh

MAX_LEN = 48  # shorter than some stdlib_mc rows, so left truncation of the context is exercised


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [inspect.getdoc(inspect) or "", ev.BUILTIN_TASKS["stdlib_mc"].read_text()]
    return train_bpe(texts, 1024, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def tiny_config(vocab_size: int) -> LlamaConfig:
    # init_std 0.2 makes the logits far from uniform, so wrong positions or masks change the scores visibly
    return LlamaConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                       max_seq_len=256, rope_type="default", rope_theta=10000.0, dtype="float32", init_std=0.2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A transformers checkpoint (random weights, our tokenizer's files) as a user would download one."""
    cfg = tiny_config(tokenizer.vocab_size)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        initializer_range=0.2, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("hf")
    random_hf_llama(hf_cfg).save_pretrained(path)
    tokenizer.save_hf(path)
    return path


@pytest.fixture(scope="module")
def task(tokenizer):
    return ev.ChoiceTask.load("stdlib_mc", tokenizer, max_len=MAX_LEN)


def direct_logprob(model: Llama, context: list[int], continuation: list[int]) -> float:
    """One unpadded row through the model: the summed log-probability of the continuation tokens."""
    seq = np.array(context + continuation)
    logits = np.asarray(model(seq[None, :-1])[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    k = len(continuation)
    return float(sum(logp[len(seq) - 1 - k + i, tok] for i, tok in enumerate(continuation)))


def test_scores_equal_a_direct_per_example_computation(tokenizer, task):
    model = Llama(tiny_config(tokenizer.vocab_size), rngs=nnx.Rngs(0))
    scores = ev.score_choices(model, task, batch_size=7)  # 192 rows: many batches, some filler rows, several buckets
    full = [len(ev._encode_pair(tokenizer, q.context, " " + q.choices[0])[0]) for q in task.questions]
    assert any(f > len(c) for f, c in zip(full, task.context_ids))  # some contexts were cut to fit MAX_LEN
    for q in range(0, len(task.questions), 12):
        expected = [direct_logprob(model, list(task.context_ids[q]), list(cont)) for cont in task.choice_ids[q]]
        np.testing.assert_allclose(scores.logprobs[q], expected, rtol=2e-5, atol=2e-4)
    metrics = ev.summarize("t", scores)
    gold = scores.gold
    raw = np.mean([np.argmax(lp) == g for lp, g in zip(scores.logprobs, gold)])
    per_char = np.mean([np.argmax(lp / np.array([len(c) for c in q.choices])) == q.gold
                        for lp, q in zip(scores.logprobs, task.questions)])
    nll_norm = np.mean([-lp[q.gold] / len(q.choices[q.gold]) for lp, q in zip(scores.logprobs, task.questions)])
    assert metrics["t/acc"] == pytest.approx(raw) and metrics["t/acc_norm"] == pytest.approx(per_char)
    assert metrics["t/nll_norm"] == pytest.approx(nll_norm) and metrics["t/n"] == 48


def test_long_contexts_lose_their_beginning(tokenizer):
    question = ev.Question("word " * 200, ("alpha", "beta"), 0)
    task = ev.ChoiceTask.from_questions("long", [question], tokenizer, max_len=32)
    for cont in task.choice_ids[0]:
        assert len(task.context_ids[0]) + len(cont) <= 33  # 32 inputs + the last target
    full = ev._encode_pair(tokenizer, question.context, " alpha")[0]
    assert list(task.context_ids[0]) == full[-len(task.context_ids[0]):]


def test_summary_normalises_by_characters_and_tokens():
    scores = ev.ChoiceScores(logprobs=(np.array([-3.0, -4.0]), np.array([-2.0, -9.0])),
                             tokens=(np.array([1.0, 4.0]), np.array([1.0, 3.0])),
                             chars=(np.array([2.0, 8.0]), np.array([1.0, 10.0])), gold=np.array([1, 1]))
    m = ev.summarize("x", scores)
    assert m["x/acc"] == 0.0  # raw: the short choice wins both times
    assert m["x/acc_norm"] == 1.0  # -3/2 < -4/8 and -2/1 < -9/10
    assert m["x/acc_per_token"] == 0.5  # -3/1 < -4/4, but -2/1 > -9/3
    assert m["x/nll_norm"] == pytest.approx((4 / 8 + 9 / 10) / 2)
    assert m["x/nll_per_token"] == pytest.approx((4 / 4 + 9 / 3) / 2)


def test_scores_equal_transformers_scoring_of_the_same_checkpoint(hf_dir):
    """lm-eval-harness's way with transformers: tokenizer(context) and tokenizer(context + continuation), the
    continuation's tokens scored by LlamaForCausalLM."""
    opened = open_checkpoint(hf_dir)
    task = ev.ChoiceTask.load("stdlib_mc", opened.tokenizer, max_len=256)
    ours = ev.score_choices(opened.model, task, batch_size=16)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    for q in range(0, len(task.questions), 4):
        question = task.questions[q]
        context_ids = hf_tok(question.context)["input_ids"]
        for c, choice in enumerate(question.choices):
            whole = hf_tok(question.context + " " + choice)["input_ids"]
            continuation = whole[len(context_ids):]
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            expected = sum(float(logp[len(whole) - 1 - len(continuation) + i, t]) for i, t in enumerate(continuation))
            assert ours.logprobs[q][c] == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_sharded_scoring_matches_one_device(hf_dir, tokenizer):
    mesh = make_mesh({"data": 2, "stage": 1, "fsdp": 2, "context": 1, "tensor": 2})
    task = ev.ChoiceTask.load("stdlib_mc", tokenizer, max_len=MAX_LEN)
    single = ev.evaluate_choices(open_checkpoint(hf_dir).model, task, batch_size=16)
    sharded_model = open_checkpoint(hf_dir, mesh=mesh).model
    assert len(sharded_model.layers.mlp.w_gate[...].sharding.device_set) == 8
    sharded = ev.evaluate_choices(sharded_model, task, batch_size=6, mesh=mesh)  # rounded up to 8 rows per batch
    params = nnx.to_pure_dict(nnx.state(sharded_model))
    pair = ev.evaluate_choices((ModelDef(sharded_model.cfg), params), task, batch_size=8, mesh=mesh)
    for key, value in single.items():
        assert sharded[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        assert pair[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


DOCS = ("def add(a, b):\n    return a + b\n", "A second document, of prose rather than code.",
        "class Point:\n    x: int = 0\n    y: int = 0\n")


def docs_dir(tmp_path) -> str:
    directory = tmp_path / "docs"
    directory.mkdir()
    for i, text in enumerate(DOCS):
        (directory / f"{i}.txt").write_text(text)
    return str(directory)


def test_text_loss_equals_transformers_on_each_document(hf_dir, tmp_path):
    """The documents share one row of 128 tokens, so each must attend to itself only."""
    opened = open_checkpoint(hf_dir)
    store = held_out_store("docs", docs_dir(tmp_path), opened.files, tmp_path / "cache")
    ours = ev.evaluate_text(opened.model, store, "docs", seq_len=128, batch_size=2, pad_id=opened.tokenizer.pad_id)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    sums, count = 0.0, 0
    for ids in opened.tokenizer.encode_documents(list(DOCS)):
        with torch.no_grad():
            sums += float(hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss) * (len(ids) - 1)
        count += len(ids) - 1
    assert count < 128, "no document is cut at the end of a row, where it would lose its context"
    assert ours["docs/tokens"] == count
    assert ours["docs/loss"] == pytest.approx(sums / count, rel=1e-5)
    assert ours["docs/perplexity"] == pytest.approx(math.exp(sums / count), rel=1e-5)

    mesh = make_mesh({"data": 2, "stage": 1, "fsdp": 2, "context": 1, "tensor": 2})
    sharded_model = open_checkpoint(hf_dir, mesh=mesh).model
    for batch_size in (4, 3):  # 3 rows are rounded up to 4, which split over data x fsdp (was a traceback)
        sharded = ev.evaluate_text(sharded_model, store, "docs", seq_len=128, batch_size=batch_size, mesh=mesh,
                                   pad_id=opened.tokenizer.pad_id)
        assert sharded == pytest.approx(ours, rel=1e-5)


def test_strided_windows_score_every_token_once_as_the_transformers_loop_does(hf_dir, tmp_path, capsys):
    """Hugging Face's "perplexity of fixed-length models" loop, written out on the transformers model: windows of
    17 tokens every 5, each scoring the tokens that no earlier window of its document scored."""
    opened = open_checkpoint(hf_dir)
    texts = (*DOCS, "\n".join(DOCS) * 3)
    directory = tmp_path / "long"
    directory.mkdir()
    for i, text in enumerate(texts):
        (directory / f"{i}.txt").write_text(text)
    store = held_out_store("long", str(directory), opened.files, tmp_path / "cache")
    seq_len, stride = 16, 5
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    total, count = 0.0, 0
    for ids in opened.tokenizer.encode_documents(list(texts)):
        scored = 1  # a document's first token is never predicted
        for begin in range(0, len(ids), stride):
            end = min(begin + seq_len + 1, len(ids))
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
            for i in range(scored, end):
                total -= float(logp[i - begin - 1, ids[i]])
                count += 1
            scored = end
            if end == len(ids):
                break
    assert max(map(len, opened.tokenizer.encode_documents(list(texts)))) > 4 * seq_len, "many windows"
    pad = opened.tokenizer.pad_id
    strided = ev.evaluate_text(opened.model, store, "long", seq_len=seq_len, batch_size=2, pad_id=pad, stride=stride)
    assert strided["long/tokens"] == count
    assert strided["long/loss"] == pytest.approx(total / count, rel=1e-5)
    plain = ev.evaluate_text(opened.model, store, "long", seq_len=seq_len, batch_size=2, pad_id=pad)
    assert plain["long/tokens"] == count and abs(plain["long/loss"] - strided["long/loss"]) > 1e-3, "other contexts"

    capsys.readouterr()
    assert ev.main(["--checkpoint", str(hf_dir), "--data", str(tmp_path / "elsewhere"), "--max_len", "16",
                    "--stride", "17"]) == 2, "refused before the data is read"
    assert capsys.readouterr().err.strip() == ("error: a stride of 17 tokens does not fit windows of 16: give a "
                                               "--stride from 1 to --max_len (16), or 0 for windows that do not "
                                               "overlap")


class _SecondHalves:
    """Documents with a loss mask, as a chat store has: each scores its second half only."""

    has_loss_mask = True

    def __init__(self, documents: list[list[int]]):
        self.documents = documents
        self.lengths = np.array([len(d) for d in documents])

    def read(self, index: int) -> np.ndarray:
        return np.asarray(self.documents[index], np.int32)

    def read_loss_mask(self, index: int) -> np.ndarray:
        n = len(self.documents[index])
        return (np.arange(n) >= n // 2).astype(np.uint8)


def test_strided_windows_score_only_what_a_masked_store_scores(hf_dir):
    opened = open_checkpoint(hf_dir)
    documents = opened.tokenizer.encode_documents(list(DOCS))
    store = _SecondHalves(documents)
    scored = sum(len(d) - len(d) // 2 for d in documents)
    pad = opened.tokenizer.pad_id
    whole = ev.evaluate_text(opened.model, store, "chat", seq_len=64, batch_size=2, pad_id=pad)
    assert whole["chat/tokens"] == scored and max(map(len, documents)) <= 64
    one_window = ev.evaluate_text(opened.model, store, "chat", seq_len=64, batch_size=2, pad_id=pad, stride=64)
    assert one_window == pytest.approx(whole, rel=1e-6), "a window per document: the packed documents' figures"
    windows = ev.evaluate_text(opened.model, store, "chat", seq_len=8, batch_size=2, pad_id=pad, stride=3)
    assert windows["chat/tokens"] == scored
    # no stride: conversations longer than a row were left out (all of them here: a DataError), as training does
    cut = ev.evaluate_text(opened.model, store, "chat", seq_len=8, batch_size=2, pad_id=pad)
    assert cut == ev.evaluate_text(opened.model, store, "chat", seq_len=8, batch_size=2, pad_id=pad, stride=8)
    assert cut["chat/tokens"] == scored


def test_ids_past_the_models_vocabulary_are_refused_not_scored_as_nan(tokenizer, task, tmp_path):
    """A tokenizer with more ids than the embedding's rows: NaN losses, and accuracies of 1.0 where the first
    choice was the gold one (argmax over NaN)."""
    model = Llama(tiny_config(200), rngs=nnx.Rngs(0))
    largest = max(i for ids in task.context_ids for i in ids)
    assert largest >= 200
    with pytest.raises(DataError, match=r"task 'stdlib_mc' holds token id \d+, past the model's vocabulary of 200 ids"):
        ev.evaluate_choices(model, task)
    store = _SecondHalves(tokenizer.encode_documents(list(DOCS)))
    with pytest.raises(DataError, match=r"--data docs holds token id \d+, past the model's vocabulary of 200 ids"):
        ev.evaluate_text(model, store, "docs", seq_len=64)


def test_two_tasks_of_one_name_are_refused(hf_dir, tmp_path, capsys):
    """The Hub's ARC-Easy and ARC-Challenge files share the stem `test-00000-of-00001`: the second task's figures
    replaced the first's, silently."""
    for folder, questions in (("easy", 3), ("challenge", 1)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.jsonl").write_text("\n".join(
            json.dumps({"goal": f"Goal {i}", "sol1": "yes", "sol2": "no", "label": 0}) for i in range(questions)))
    assert ev.main(["--checkpoint", str(hf_dir), "--tasks",
                    f"{tmp_path / 'easy' / 'test.jsonl'},{tmp_path / 'challenge' / 'test.jsonl'}"]) == 2
    assert capsys.readouterr().err == ("error: more than one task is named 'test' (a task is named after its file's "
                                       "stem), so one's figures would replace the other's: rename the files apart\n")
    cfg = default_config()  # a training run refuses them at its start, not at its first evaluation
    cfg.train.eval_tasks = f"{tmp_path / 'easy' / 'test.jsonl'},{tmp_path / 'challenge' / 'test.jsonl'}"
    with pytest.raises(DataError, match="more than one task is named 'test'"):
        trainer._eval_tasks(cfg, open_checkpoint(hf_dir).tokenizer)


def test_cli_scores_text_sources_alone_or_beside_tasks(hf_dir, tmp_path, capsys):
    docs = docs_dir(tmp_path)
    cache = str(tmp_path / "cache")
    assert ev.main(["--checkpoint", str(hf_dir), "--data", f"mine={docs}", "--data", docs, "--cache_dir", cache,
                    "--max_len", "48", "--batch_size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["data", "tokens", "loss", "perplexity"]
    assert lines[1].startswith("mine ") and lines[2].startswith("docs ")
    metrics = json.loads(lines[-1])
    assert sorted(metrics) == ["docs/loss", "docs/perplexity", "docs/tokens", "mine/loss", "mine/perplexity",
                               "mine/tokens"], "no task unless asked for"
    assert metrics["mine/loss"] == metrics["docs/loss"] > 0
    assert ev.main(["--checkpoint", str(hf_dir), "--tasks", "stdlib_mc", "--data", docs, "--cache_dir", cache]) == 0
    assert {"stdlib_mc/acc", "docs/loss"} <= json.loads(capsys.readouterr().out.strip().splitlines()[-1]).keys()
    assert ev.main(["--checkpoint", str(hf_dir), "--data", str(tmp_path / "nothing"), "--cache_dir", cache]) == 2
    assert capsys.readouterr().err.startswith("error: No files match")


@pytest.mark.parametrize("record, expected", [
    ({"question": "Q?", "choices": ["a", "b"], "answer": 1}, ("Q?", ("a", "b"), 1)),
    ({"query": "Q?", "endings": ["a", "b", "c"], "gold": "C"}, ("Q?", ("a", "b", "c"), 2)),
    ({"context": "Q?", "options": ["a", "b"], "label": "0"}, ("Q?", ("a", "b"), 0)),
    ({"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she", "endings": ["bakes [title] it", "x"],
      "label": "0"}, ("Baking: She mixes flour. Then she", ("bakes. it", "x"), 0)),
    # As Rowan/hellaswag publishes it, `ctx` too, ctx_b in lower case there: the prompt is lm-eval-harness's (it was
    # "...roof. he", a prompt published scores were not measured with).
    ({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
      "ctx": "A man is sitting on a roof. he", "endings": ["is ripping level tiles off.", "starts pulling up roofing."],
      "label": "1"}, ("Roof shingle removal: A man is sitting on a roof. He",
                      ("is ripping level tiles off.", "starts pulling up roofing."), 1)),
    ({"ctx": "A man sits.", "endings": ["a", "b"], "label": 0}, ("A man sits.", ("a", "b"), 0)),
    ({"question": "Which?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "B"},
     ("Question: Which?\nAnswer:", ("x", "y", "z"), 1)),
    ({"question": "Which?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"},
     ("Question: Which?\nAnswer:", ("x", "y"), 1)),
    ({"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 0},
     ("Question: Open a jar\nAnswer:", ("twist", "pull"), 0)),
])
def test_layouts(record, expected):
    assert ev.parse_question(record, "f:1") == ev.Question(*expected)


@pytest.mark.parametrize("line, message", [
    ('{"choices": ["a", "b"], "answer": 0}', r"bad\.jsonl:2: missing field 'question' / 'query' / 'context'"),
    ('{"question": "Q", "answer": 0}', r"bad\.jsonl:2: missing field 'choices' / 'endings' / 'options'"),
    ('{"question": "Q", "choices": ["a", "b"]}', r"bad\.jsonl:2: missing field 'answer' / 'label' / 'gold'"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": 2}', r"bad\.jsonl:2: field 'answer'=2 does not name one of"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": "E"}', r"bad\.jsonl:2: field 'answer'='E' does not name"),
    ('{"question": "Q", "choices": ["a"], "answer": 0}', r"bad\.jsonl:2: field 'choices' must be a list of at least two"),
    ('{"question": 3, "choices": ["a", "b"], "answer": 0}', r"bad\.jsonl:2: field 'question' must be a string"),
    ('{"question": "Q", "choices": ["a", "b"], "answer": 0', r"bad\.jsonl:2: not valid JSON"),
    ('["Q", ["a", "b"], 0]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"question": "\\ud800", "choices": ["a", "b"], "answer": 0}', r"bad\.jsonl:2: not UTF-8 text \(a \\u escape"),
    ('{"goal": "G", "sol1": "a", "label": 0}', r"bad\.jsonl:2: missing field 'sol2'"),
])
def test_bad_lines_name_the_file_line_and_field(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        ev.ChoiceTask.load(path, tokenizer)


def test_tasks_are_read_from_gzipped_json_lines_and_parquet_as_the_hub_stores_benchmarks(tmp_path, tokenizer):
    """ARC, HellaSwag and MMLU come from the Hub as Parquet (ARC's choices a struct of lists): each was read as JSON
    text and refused."""
    rows = [{"question": f"Which is {i}?", "choices": {"text": [str(i), "x", "y"], "label": ["A", "B", "C"]},
             "answerKey": "A"} for i in range(5)]
    (tmp_path / "arc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "arc.jsonl.gz").write_bytes(gzip.compress((tmp_path / "arc.jsonl").read_bytes()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc.parquet")
    expected = ev.read_questions(tmp_path / "arc.jsonl")
    assert expected[0] == ev.Question("Question: Which is 0?\nAnswer:", ("0", "x", "y"), 0)
    assert ev.read_questions(tmp_path / "arc.jsonl.gz") == expected
    assert ev.read_questions(tmp_path / "arc.parquet") == expected
    whole = (tmp_path / "arc.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet cannot be read to its end"):
        ev.read_questions(tmp_path / "cut.parquet")


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"task file .*nope\.jsonl does not exist.*stdlib_mc"):
        ev.ChoiceTask.load(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(DataError, match=rf"task file {tmp_path} is a directory"):
        ev.ChoiceTask.load(tmp_path, tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no questions"):
        ev.ChoiceTask.load(tmp_path / "empty.jsonl", tokenizer)
    (tmp_path / "gzipped.jsonl").write_bytes(b"\x1f\x8b\x08\x00")  # gzip's bytes, named as JSON text
    with pytest.raises(DataError, match=r"gzipped\.jsonl:1: not UTF-8 text \(invalid start byte at byte 1\): write UTF"):
        ev.ChoiceTask.load(tmp_path / "gzipped.jsonl", tokenizer)
    with pytest.raises(DataError, match="leaves no room for its context within max_len=4"):
        ev.ChoiceTask.from_questions("t", [ev.Question("c", ("a long choice " * 4, "b"), 0)], tokenizer, max_len=4)


def test_cli_prints_a_table_and_a_json_line(hf_dir, tmp_path, capsys):
    extra = tmp_path / "piqa_like.jsonl"
    extra.write_text("\n".join(json.dumps({"goal": f"Goal {i}", "sol1": "yes", "sol2": "no", "label": i % 2})
                               for i in range(5)))
    assert ev.main(["--checkpoint", str(hf_dir), "--tasks", f"stdlib_mc,{extra}", "--batch_size", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["task", "n", "acc"]
    assert lines[1].startswith("stdlib_mc") and lines[2].startswith("piqa_like")
    metrics = json.loads(lines[-1])
    assert metrics["stdlib_mc/n"] == 48 and metrics["piqa_like/n"] == 5
    assert 0 <= metrics["piqa_like/acc"] <= 1 and metrics["stdlib_mc/nll_norm"] > 0


def test_cli_errors_are_one_line(hf_dir, tmp_path, capsys):
    assert ev.main(["--checkpoint", str(hf_dir), "--tasks", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task file") and "Traceback" not in err
    assert ev.main(["--checkpoint", str(tmp_path / "nowhere"), "--tasks", "stdlib_mc"]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad in (["--batch_size", "-2"], ["--max_len", "-1"]):  # the --data path named data.* config keys, after reading
        assert ev.main(["--checkpoint", str(tmp_path / "nowhere"), "--data", str(tmp_path / "nothing"), *bad]) == 2
        assert capsys.readouterr().err.startswith("error: --batch_size must be positive and --max_len positive or 0")
    # two sources of one name: the second's figures were reported in place of the first's
    assert ev.main(["--checkpoint", str(hf_dir), "--data", "/a/val.jsonl", "--data", "b/val.jsonl"]) == 2
    assert capsys.readouterr().err == ("error: --data /a/val.jsonl and --data b/val.jsonl are both named 'val': name "
                                       "them apart, e.g. --data val_2=b/val.jsonl\n")
    # beyond the model's context: positions it never trained on (configs/tiny.py at 4,096 failed allocating 52 GB)
    assert ev.main(["--checkpoint", str(hf_dir), "--max_len", "4096"]) == 2
    assert capsys.readouterr().err == ("error: --max_len 4096 exceeds the model's context (model.max_seq_len 256): "
                                       "give at most 256, or 0 for 256\n")
    # flags of --data's text without --data: they were ignored
    assert ev.main(["--checkpoint", str(tmp_path / "nowhere"), "--stride", "16", "--text_field", "body"]) == 2
    assert capsys.readouterr().err == ("error: --stride and --text_field apply to the text of --data, and none is "
                                       "given: add --data SOURCE, or leave them out\n")


def test_cli_running_out_of_device_memory_is_one_line_naming_what_to_lower(hf_dir, monkeypatch, capsys):
    """A batch too large fails inside XLA; other runtime errors keep their traceback."""
    for status in ("RESOURCE_EXHAUSTED: Out of memory allocating 68719476736 bytes.", "INTERNAL: not memory"):
        def fails(*args, **kwargs):
            raise jax.errors.JaxRuntimeError(status)

        monkeypatch.setattr(ev, "evaluate_tasks", fails)
        if "INTERNAL" in status:
            with pytest.raises(jax.errors.JaxRuntimeError, match=status):
                ev.main(["--checkpoint", str(hf_dir), "--tasks", "stdlib_mc"])
            continue
        assert ev.main(["--checkpoint", str(hf_dir), "--tasks", "stdlib_mc", "--batch_size", "4096"]) == 2
        assert capsys.readouterr().err == (
            f"error: the devices ran out of memory ({status}): lower --batch_size (or --max_len), or shard the model "
            "over more devices (--mesh)\n")


def test_the_training_loop_scores_tasks_as_the_standalone_cli_does(tmp_path, cache_dir, capsys):
    """`train.eval_tasks` scores at each evaluation, under the training mesh and in its microbatches (here 2 of 4
    rows, as the step); the last one (the final parameters) equals `python -m llama_jax.evaluate` on the saved
    checkpoint, in batches of 8."""
    workdir = tmp_path / "run"
    result = run_cli(workdir, cache_dir, "--config.train.steps=4", "--config.data.batch_size=8",
                     "--config.optim.grad_accum=2", "--config.data.seq_len=64", "--config.train.log_every=2",
                     "--config.train.eval_every=2", "--config.data.eval_batches=1", "--config.train.eval_tasks=stdlib_mc")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(workdir)
    assert all({"stdlib_mc/acc", "stdlib_mc/acc_norm", "stdlib_mc/nll_norm"} <= m.keys() for m in lines)
    assert ev.main(["--checkpoint", str(workdir), "--tasks", "stdlib_mc", "--batch_size", "8"]) == 0
    standalone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("stdlib_mc/acc", "stdlib_mc/acc_norm", "stdlib_mc/nll_norm", "stdlib_mc/nll_per_token"):
        assert lines[-1][key] == pytest.approx(standalone[key], rel=1e-4), key
