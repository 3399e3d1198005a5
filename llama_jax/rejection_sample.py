"""Rejection sampling (Llama 3's post-training rounds): for each prompt, K samples from the policy, scored by a reward
model; the best is kept and written as SFT data.

    python -m llama_jax.rejection_sample --policy runs/sft_tiny --reward runs/reward_tiny \
        --prompts prompts.jsonl --samples 10 --out best.jsonl [--temperature 0.7 --top_p 0.9 --max_new_tokens 128]

Prompts are JSON Lines {"prompt": "..."} (a string is one user message) or {"prompt": [messages]}. Each output line is
{"messages": [...the prompt, {"role": "assistant", "content": best}], "score": s, "scores": [...]}: the format
`read_conversations` and `python -m llama_jax.data.prepare --chat` read, so the next SFT round trains on it. Only
samples that ended with a stop token are candidates (`scores` are theirs): one cut off at `--max_new_tokens` would
teach SFT to end its answers mid-sentence, so they are left out and counted (`--keep_unfinished` keeps them). Samples
are drawn for `--batch_size` prompts x K at once through the KV-cache generator, each prompt rendered with the
policy's chat template; the reward model scores the conversation rendered with its own chat template, as it was
trained to: ours the hidden state at the last position before the end token, a Hugging Face reward model (a one-label
LlamaForSequenceClassification) that at the end token, unless it is one of ours exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.convert import open_checkpoint
from llama_jax.data import conversations
from llama_jax.data.chat import ChatFormat, Message
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import ConfigError, DataError, LlamaJaxError
from llama_jax.generate import generate, inference_mesh
from llama_jax.memory import report_out_of_memory
from llama_jax.objectives import reward
from llama_jax.workdir import as_path, check_writable, not_a_file, write_whole

Scorer = Callable[[list[list[Message]]], np.ndarray]  # conversations -> one score each


def read_prompts(path: str | Path) -> list[list[Message]]:
    """The prompts of a JSON Lines file (local or a URL). A bad line is skipped and reported, as in SFT data."""
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} {not_a_file(path)}: write one JSON object {{\"prompt\": ...}} per line")
    return list(conversations.read_prompts(path))


@dataclasses.dataclass(frozen=True)
class Sample:
    text: str  # the stop token left out
    finished: bool  # it ended with a stop token, rather than running out at max_new_tokens


def best_of(prompts: list[list[Message]], samples: list[list[Sample]], scorer: Scorer, *,
            keep_unfinished: bool = False) -> list[dict]:
    """For each prompt, its highest-scoring finished sample (any sample with `keep_unfinished`) as an SFT record,
    with the scores of all its candidates. A prompt none of whose samples finished is skipped."""
    records = []
    for prompt, drawn in zip(prompts, samples):
        texts = [s.text for s in drawn if s.finished or keep_unfinished]
        if not texts:
            continue
        conversations = [[*prompt, {"role": "assistant", "content": text}] for text in texts]
        scores = np.asarray(scorer(conversations), np.float64)
        best = int(np.argmax(scores))
        records.append({"messages": conversations[best], "score": float(scores[best]),
                        "scores": [float(s) for s in scores]})
    return records


def reward_scorer(model, head, fmt: ChatFormat, *, scores_end_token: bool = False, bucket: int = 64) -> Scorer:
    """Scores conversations with a reward model, in one padded batch per call (lengths rounded up to `bucket`, so
    few shapes compile). Ours read the conversation up to its end token, which they were trained to predict;
    `scores_end_token` (Hugging Face's reward models) reads it to the end, as they were trained."""
    graphdef, state = nnx.split(model)  # a module is rebuilt inside jit from its arrays, never closed over
    score_fn = jax.jit(lambda state, head, rows: reward.scores(nnx.merge(graphdef, state), head, rows))

    def scorer(conversations: list[list[Message]]) -> np.ndarray:
        sequences = [fmt.render_ids(c)[: None if scores_end_token else -1] for c in conversations]
        length = -(-max(len(s) for s in sequences) // bucket) * bucket
        rows = {"tokens": np.zeros((len(sequences), length), np.int32),
                "segment_ids": np.zeros((len(sequences), length), np.int32),
                "positions": np.zeros((len(sequences), length), np.int32)}
        for i, s in enumerate(sequences):
            rows["tokens"][i, : len(s)] = s
            rows["segment_ids"][i, : len(s)] = 1
            rows["positions"][i, : len(s)] = np.arange(len(s))
        return np.asarray(score_fn(state, head, {k: jnp.asarray(v) for k, v in rows.items()}))

    return scorer


def sample(policy_path: str, prompts: list[list[Message]], k: int, *, max_new_tokens: int, temperature: float,
           top_p: float, seed: int, batch_size: int, mesh=None) -> list[list[Sample]]:
    """K completions per prompt from the policy, `batch_size` prompts (x K rows) per generation call."""
    opened = open_checkpoint(policy_path, mesh=mesh)
    fmt = ChatFormat.from_directory(opened.files, opened.tokenizer)
    stop_ids = opened.generation.stop_ids
    samples = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        ids = [fmt.render_ids(p, add_generation_prompt=True) for p in chunk for _ in range(k)]
        new = generate(opened.model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + first,
                       stop_ids=stop_ids, mesh=mesh)
        drawn = [Sample(opened.tokenizer.decode([t for t in tokens if t not in stop_ids]),
                        bool(tokens) and tokens[-1] in stop_ids) for tokens in new]
        samples += [drawn[i * k : (i + 1) * k] for i in range(len(chunk))]
    return samples


def _report_unfinished(samples: list[list[Sample]], max_new_tokens: int, keep_unfinished: bool) -> None:
    """Says how many samples ran out at `max_new_tokens` and are left out (before the reward model loads); refuses
    a run none of whose samples finished, which would write nothing."""
    cut = sum(not s.finished for drawn in samples for s in drawn)
    if keep_unfinished or not cut:
        return
    fix = f"raise --max_new_tokens (now {max_new_tokens}), or let them compete with --keep_unfinished"
    if cut == sum(map(len, samples)):
        raise DataError(f"none of the {cut} samples ended with a stop token before --max_new_tokens: {fix}")
    skipped = sum(not any(s.finished for s in drawn) for drawn in samples)
    print(f"note: {cut} of {sum(map(len, samples))} samples ran out at --max_new_tokens before a stop token and are "
          f"left out, and {skipped} prompts with no finished sample are skipped: {fix}", file=sys.stderr)


_FLAG_RANGES = {"samples": lambda k: k >= 1, "batch_size": lambda b: b >= 1, "max_new_tokens": lambda n: n >= 1,
                "temperature": lambda t: t > 0, "top_p": lambda p: 0 < p <= 1}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_jax.rejection_sample",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--policy", required=True, help="the model to sample from (llama_jax run or Hugging Face dir)")
    p.add_argument("--reward", required=True, help="a reward-model run (objective.name='reward') or a Hugging Face "
                   "reward model (LlamaForSequenceClassification, one label)")
    p.add_argument("--prompts", required=True, help='.jsonl(.gz|.zst) or .parquet of {"prompt": ...}')
    p.add_argument("--samples", type=int, default=10, help="K samples per prompt (Llama 3: 10-30)")
    p.add_argument("--out", required=True, help="output JSON Lines (SFT conversations)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4, help="prompts per generation call (x K rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep_unfinished", action="store_true", help="let samples cut off at --max_new_tokens compete")
    p.add_argument("--mesh", default=None, help="shard both models over a mesh, e.g. tensor=2,fsdp=4")
    args = p.parse_args(argv)
    try:
        wrong = [f"--{name} {getattr(args, name)}" for name, fits in _FLAG_RANGES.items()
                 if not fits(getattr(args, name))]
        if wrong:
            raise ConfigError(f"{' and '.join(wrong)} out of range: --samples, --batch_size and --max_new_tokens must be "
                              "positive, --temperature above 0 (greedy samples would all be the same) and 0 < --top_p "
                              "<= 1")
        mesh = inference_mesh(args.mesh)
        prompts = read_prompts(args.prompts)
        check_writable(args.out, "--out", directory=False)  # now, not after hours of sampling
        samples = sample(args.policy, prompts, args.samples, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                         mesh=mesh)
        _report_unfinished(samples, args.max_new_tokens, args.keep_unfinished)
        scoring = reward.load_reward_model(args.reward, mesh=mesh)
        fmt = ChatFormat.from_directory(scoring.tokenizer, Tokenizer.from_file(scoring.tokenizer))
        records = best_of(prompts, samples, reward_scorer(scoring.model, scoring.head, fmt,
                                                          scores_end_token=scoring.scores_end_token),
                          keep_unfinished=args.keep_unfinished)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        return report_out_of_memory(e, "lower --batch_size (prompts per generation call, each --samples rows) or "
                                       "--max_new_tokens, or shard both models over more devices (--mesh)")
    out = as_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_whole(out, "".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote the best of up to {args.samples} samples for {len(records)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
