"""Rejection sampling: the best-scoring sample is kept, and the CLI runs end to end on tiny random models, writing
conversations that `read_conversations` reads back."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from posttrain_fixtures import tiny_base
from test_dpo import dpo_config

from llama_jax import rejection_sample, trainer
from llama_jax.data import stdlib_chat
from llama_jax.data.conversations import read_conversations
from llama_jax.rejection_sample import Sample


def by_length(conversations):
    return np.array([len(c[-1]["content"]) for c in conversations])


def test_the_highest_scoring_sample_is_kept():
    prompts = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    samples = [[Sample("x", True), Sample("yyy", True), Sample("zz", True)],
               [Sample("long answer", True), Sample("s", True)]]
    records = rejection_sample.best_of(prompts, samples, by_length)
    assert [r["messages"][-1]["content"] for r in records] == ["yyy", "long answer"]
    assert records[0]["messages"][:-1] == prompts[0] and records[0]["scores"] == [1.0, 3.0, 2.0]


def test_samples_cut_off_at_max_new_tokens_are_not_candidates(capsys):
    """A sample that ran out before its stop token, kept, became an SFT answer followed by an end token: the next
    round learned to stop mid-sentence. A prompt with no finished sample is skipped."""
    prompts = [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    samples = [[Sample("short.", True), Sample("a much longer one cut o", False)], [Sample("cut", False)]]
    records = rejection_sample.best_of(prompts, samples, by_length)
    assert [r["messages"] for r in records] == [[*prompts[0], {"role": "assistant", "content": "short."}]]
    assert records[0]["scores"] == [6.0]
    kept = rejection_sample.best_of(prompts, samples, by_length, keep_unfinished=True)
    assert [r["messages"][-1]["content"] for r in kept] == ["a much longer one cut o", "cut"]
    rejection_sample._report_unfinished(samples, 8, keep_unfinished=False)
    assert capsys.readouterr().err == ("note: 2 of 3 samples ran out at --max_new_tokens before a stop token and are "
                                       "left out, and 1 prompts with no finished sample are skipped: raise "
                                       "--max_new_tokens (now 8), or let them compete with --keep_unfinished\n")


def save_reward_run(cfg, base, workdir):
    """A reward-model run directory as the trainer writes one (params, meta, the tokenizer), after a few steps."""
    import jax
    import orbax.checkpoint as ocp

    from llama_jax.config import plain
    from llama_jax.data.tokenizer import tokenizer_files
    from test_dpo import data_of, jitted_step

    run = trainer.setup(cfg, workdir)
    data = data_of(cfg, workdir)
    with jax.set_mesh(run.mesh):
        step, state = jitted_step(run, cfg), run.init()
        for i in range(4):
            state, _ = step(state, run.to_global(data.batches.local_batch(i)))
    step_dir = workdir / "checkpoints" / "4"
    checkpointer = ocp.StandardCheckpointer()  # saves in the background: wait on the same one
    checkpointer.save(step_dir / "params", jax.tree.map(np.asarray, state.params))
    checkpointer.wait_until_finished()
    files = tokenizer_files(base)
    for file in files:
        (workdir / file.name).write_bytes(file.read_bytes())
    (step_dir / "meta").mkdir()
    (step_dir / "meta" / "metadata").write_text(json.dumps({"config": plain(cfg), "tokenizer_file": files[0].name}))


def test_the_cli_samples_scores_and_writes_sft_data(tmp_path, capsys):
    base = tiny_base(tmp_path / "base")
    save_reward_run(dpo_config(base, objective__name="reward", optim__lr=3e-3, optim__warmup_steps=0), base,
                    tmp_path / "reward")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What does `json.dumps` do?"}\n{"prompt": [{"role": "user", "content": "Hi"}]}\n')
    out = tmp_path / "new" / "best.jsonl"  # the directory is made
    code = rejection_sample.main(["--policy", str(base), "--reward", str(tmp_path / "reward"), "--prompts",
                                  str(prompts), "--samples", "3", "--max_new_tokens", "8", "--out", str(out)])
    assert code == 2 and not out.exists()  # a random model's 8 tokens: no sample ends, and nothing is worth writing
    assert capsys.readouterr().err.endswith(  # after the reward data's preparation
        "\nerror: none of the 6 samples ended with a stop token before --max_new_tokens: raise --max_new_tokens "
        "(now 8), or let them compete with --keep_unfinished\n")
    code = rejection_sample.main(["--policy", str(base), "--reward", str(tmp_path / "reward"), "--prompts",
                                  str(prompts), "--samples", "3", "--max_new_tokens", "8", "--out", str(out),
                                  "--keep_unfinished"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(len(r["scores"]) == 3 for r in records)
    assert all(r["score"] == max(r["scores"]) for r in records)
    assert [c[0]["content"] for c in read_conversations(out)] == ["What does `json.dumps` do?", "Hi"]
    sharded = tmp_path / "sharded.jsonl"  # both models sharded over 8 devices: the same samples and scores
    assert rejection_sample.main(["--policy", str(base), "--reward", str(tmp_path / "reward"), "--prompts", str(prompts),
                                  "--samples", "3", "--max_new_tokens", "8", "--out", str(sharded), "--keep_unfinished",
                                  "--mesh", "data=2,fsdp=2,tensor=2"]) == 0, capsys.readouterr().err
    sharded_records = [json.loads(line) for line in sharded.read_text().splitlines()]
    for got, want in zip(sharded_records, records, strict=True):
        assert got["messages"] == want["messages"]
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=5e-3)  # bfloat16 matmuls, summed in shards
    assert rejection_sample.main(["--policy", str(base), "--reward", str(base), "--prompts", str(prompts), "--out",
                                  str(out), "--samples", "0"]) == 2
    capsys.readouterr()
    assert rejection_sample.main(["--policy", str(base), "--reward", str(base), "--prompts", str(tmp_path / "none.jsonl"),
                                  "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: prompts file ") and "none.jsonl does not exist" in error, error
    assert rejection_sample.main(["--policy", str(base), "--reward", str(base), "--prompts", str(tmp_path),
                                  "--out", str(out)]) == 2
    assert f"error: prompts file {tmp_path} is a directory" in capsys.readouterr().err
    # past the policy's context: a traceback from generate's ValueError
    assert rejection_sample.main(["--policy", str(base), "--reward", str(base), "--prompts", str(prompts),
                                  "--out", str(out), "--max_new_tokens", "100000"]) == 2
    assert re.fullmatch(r"error: the longest prompt \(\d+ tokens\) \+ max_new_tokens \(100000\) exceeds the model's "
                        r"context \(model.max_seq_len \d+\): lower max_new_tokens to at most \d+\n",
                        capsys.readouterr().err)


def test_the_builtin_prompts_are_the_preference_questions(tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    assert stdlib_chat.main(["prompts", "--out", str(out), "--limit", "5"]) == 0
    prompts = rejection_sample.read_prompts(out)
    assert [p[0]["content"] for p in prompts] == [r["prompt"] for r in stdlib_chat.preferences()[:5]]
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)


def test_bad_prompt_lines_are_skipped_and_reported_before_any_model_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": 3}\n{"prompt": [{"role": "wizard", "content": "x"}]}\nnot json\n'
                       '{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n')
    assert rejection_sample.read_prompts(prompts) == [[{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Hi"}]]
    report = capsys.readouterr().err
    assert f"{prompts}:1" in report and "unknown role" in report and "invalid JSON" in report, report
    prompts.write_text('{"prompt": 3}\n')
    assert rejection_sample.main(["--policy", "never-opened", "--reward", "never-opened", "--prompts", str(prompts),
                                  "--out", str(tmp_path / "out.jsonl")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {prompts} holds no usable record (the first bad record is {prompts}:1: "), error


def test_the_cli_running_out_of_device_memory_is_one_line(tmp_path, monkeypatch, capsys):
    status = "RESOURCE_EXHAUSTED: Out of memory allocating 68719476736 bytes."

    def fails(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(status)

    monkeypatch.setattr(rejection_sample, "sample", fails)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    assert rejection_sample.main(["--policy", "p", "--reward", "r", "--prompts", str(prompts), "--out",
                                  str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == (
        f"error: the devices ran out of memory ({status}): lower --batch_size (prompts per generation call, each "
        "--samples rows) or --max_new_tokens, or shard both models over more devices (--mesh)\n")


@pytest.mark.parametrize("flags, named", [
    (["--top_p", "1.5"], "--top_p 1.5"),
    (["--max_new_tokens", "-1"], "--max_new_tokens -1"),
    (["--temperature", "0", "--samples", "0"], "--samples 0 and --temperature 0.0"),
])
def test_sampling_flags_out_of_range_are_one_line_before_any_model_loads(tmp_path, capsys, flags, named):
    """An out-of-range --top_p or --max_new_tokens ended in a traceback from `generate`'s ValueError."""
    assert rejection_sample.main(["--policy", "never-opened", "--reward", "never-opened", "--prompts", "never-read",
                                  "--out", str(tmp_path / "out.jsonl"), *flags]) == 2
    assert capsys.readouterr().err == (
        f"error: {named} out of range: --samples, --batch_size and --max_new_tokens must be positive, --temperature "
        "above 0 (greedy samples would all be the same) and 0 < --top_p <= 1\n")
