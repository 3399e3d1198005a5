"""Prepares preference pairs for the `reward` and `dpo` objectives:
`python -m llama_jax.data.preferences --source PAIRS.jsonl --tokenizer DIR --out OUT`.

Input lines are {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message lists), or two whole
conversations that begin with the prompt (see `conversations.read_preferences`). Each pair is rendered in the
tokenizer directory's chat format and written as two documents of a prepared corpus, 2i = prompt + chosen and 2i + 1
= prompt + rejected, each with the mask of its response's tokens and end tokens; `PreferenceBatches` derives DPO's
masks (without the end tokens) from it. The output is OUT/train and OUT/eval like `python -m
llama_jax.data.prepare`, so `data.source=OUT` with the same `data.tokenizer` trains on it; which side a pair lands
on is a function of its content alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from llama_jax.data.chat import ChatFormat
from llama_jax.data.conversations import SkipReport, preference_example, read_preferences
from llama_jax.data.prepare import DEFAULT_EVAL_FRACTION, check_output_directory, in_eval_split
from llama_jax.data.shards import ShardWriter, local_directory, tokenizer_hash
from llama_jax.data.sources import atomic_directory
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError, LlamaJaxError

MARKER = "preferences"  # the manifest entry that says a prepared corpus holds pairs


def prepare_preferences(pattern: str | os.PathLike, tokenizer_path: str | os.PathLike, out_dir: str | os.PathLike,
                        *, eval_fraction: float = DEFAULT_EVAL_FRACTION, max_tokens: int | None = None) -> dict[str, int]:
    """Writes the pairs of the JSON Lines files matching `pattern`; returns the pairs written per split. A pair one
    of whose sequences has more than `max_tokens` tokens is skipped and counted (never cut).

    The split is by prompt: data with several pairs per prompt (UltraFeedback's, Nectar's rankings) would otherwise
    hold out pairs whose prompt, and often a response, the model trains on, and overstate the held-out accuracy."""
    out_dir = local_directory(out_dir, "--out")
    check_output_directory(out_dir)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    fmt = ChatFormat.from_directory(tokenizer_path, tokenizer)
    report = SkipReport()
    metadata = {"tokenizer": {"path": str(tokenizer_path), "tokenizer_hash": tokenizer_hash(tokenizer_path)},
                MARKER: {"source": str(pattern), "max_tokens": max_tokens, "layout": "2i chosen, 2i+1 rejected"}}
    splits = ("train", "eval") if eval_fraction > 0 else ("train",)
    written = dict.fromkeys(splits, 0)
    with atomic_directory(out_dir) as tmp, contextlib.ExitStack() as stack:
        writers = {split: stack.enter_context(ShardWriter(tmp / split, loss_mask=True,
                                                          metadata={"split": split, **metadata}))
                   for split in splits}
        for index, (prompt, chosen, rejected) in enumerate(read_preferences(pattern, report=report)):
            example = preference_example(fmt, prompt, chosen, rejected)
            longest = max(len(example.chosen_tokens), len(example.rejected_tokens))
            if max_tokens is not None and longest > max_tokens:
                report.skip("longer than max_tokens", f"pair {index}", f"{longest} tokens > {max_tokens}")
                continue
            split = "eval" if in_eval_split(json.dumps(prompt, sort_keys=True), eval_fraction) else "train"
            writers[split].write(example.chosen_tokens, example.chosen_nll_mask)
            writers[split].write(example.rejected_tokens, example.rejected_nll_mask)
            written[split] += 1
        empty = [split for split, n in written.items() if not n]
        if empty:
            raise DataError(f"the {' and '.join(empty)} split got no pair ({sum(written.values())} written, "
                            f"{report.total} skipped): give more pairs, or change --eval_fraction or --max_tokens")
    if report.total:
        print(report.summary(), file=sys.stderr, flush=True)
    return written


def is_preference_store(store) -> bool:
    """Whether a document store was written by `prepare_preferences`."""
    return MARKER in getattr(store, "manifest", {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_jax.data.preferences",
                                description="Prepares preference pairs for the reward and dpo objectives.")
    p.add_argument("--source", required=True,
                   help="file, glob or directory of preference pairs: .jsonl(.gz|.zst) or .parquet")
    p.add_argument("--tokenizer", required=True, help="the tokenizer (directory) the model was trained with")
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    p.add_argument("--eval_fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                   help="held-out fraction of the prompts, each with all its pairs")
    p.add_argument("--max_tokens", type=int, help="skip pairs with a longer sequence")
    args = p.parse_args(argv)
    try:
        written = prepare_preferences(args.source, args.tokenizer, args.out, eval_fraction=args.eval_fraction,
                                      max_tokens=args.max_tokens)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{n} {split} pairs' for split, n in written.items())} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
