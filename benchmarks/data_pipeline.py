"""Is the input side ever the bottleneck? Tokens/s of the data pipeline against what training consumes.

    python benchmarks/data_pipeline.py [--batches 400] [--prepare_gb 1.0]

Measured in one process, on the default job's corpus (the standard library, its 8,192-token tokenizer) and
shape (16 x 256): the batches/s the pipeline produces from prepared ArrayRecord shards and from raw text
(read, tokenize, store, batch), and the tokens/s the `configs/tiny.py` training step consumes. Then the
preparation CLI on a corpus of more than `--prepare_gb` GB of text (the standard library repeated and
shuffled, in a temporary directory): its throughput and the peak memory of its process tree.
The last line is a JSON object with the figures; `ratio` = shards / trainer (the target is at least 10).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grain
import jax
import psutil

from llama_jax import train_step, trainer
from llama_jax.config import batch_schedule, default_config, model_section
from llama_jax.data import documents
from llama_jax.data.pipeline import TrainBatches
from llama_jax.data.schedule import BatchSchedule
from llama_jax.data.shards import ShardedCorpus, ShardWriter
from llama_jax.data.sources import TokenizedCorpus, prepare_stdlib_corpus
from llama_jax.data.tokenizer import Tokenizer

BATCH, SEQ_LEN = 16, 256
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def batches_per_second(store, num_batches: int) -> float:
    plan = TrainBatches([store], [1.0], BatchSchedule(BATCH, SEQ_LEN), seed=0)
    iterator = iter(plan.dataset().to_iter_dataset(READ_OPTIONS))
    next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches / (time.perf_counter() - start)


def shards_from(corpus: TokenizedCorpus, directory: Path) -> ShardedCorpus:
    with ShardWriter(directory, shard_tokens=1 << 20) as writer:
        for index in range(len(corpus)):
            writer.write(corpus.read(index))
    return ShardedCorpus.open(directory)


def text_tokens_per_second(tokenizer: Tokenizer, directory: Path, num_documents: int) -> float:
    """The raw-text path end to end: read files, tokenize, store, then batch every row of what was stored."""
    start = time.perf_counter()
    texts = [text for _, text in zip(range(num_documents), documents.read_documents("stdlib"))]
    store = TokenizedCorpus.build(texts, tokenizer, directory)
    rows = store.num_tokens // SEQ_LEN
    plan = TrainBatches([store], [1.0], BatchSchedule(BATCH, SEQ_LEN), seed=0)
    iterator = iter(plan.dataset().to_iter_dataset(READ_OPTIONS))
    for _ in range(rows // BATCH):
        next(iterator)
    return rows // BATCH * BATCH * SEQ_LEN / (time.perf_counter() - start)


def trainer_tokens_per_second(cache_dir: Path, store, steps: int) -> float:
    """The tiny config's jitted step, fed by the pipeline, timed after compilation."""
    cfg = default_config()
    cfg.model = model_section("tiny", attention="xla", remat="none")
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len = BATCH, SEQ_LEN
    run = trainer.setup(cfg, Path(tempfile.mkdtemp()))
    plan = TrainBatches([store], [1.0], batch_schedule(cfg), seed=0)
    iterator = iter(plan.dataset().to_iter_dataset(READ_OPTIONS))
    schedule = lambda step: cfg.optim.lr  # noqa: E731  (the value is irrelevant to the timing)
    step_fn = jax.jit(train_step.make_train_step(run.model_def, run.tx, schedule, 1), donate_argnums=0)
    with jax.set_mesh(run.mesh):
        state = run.init()
        for _ in range(2):
            state, metrics = step_fn(state, run.to_global(next(iterator)))
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, run.to_global(next(iterator)))
        jax.block_until_ready(metrics)
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - start)


def write_big_corpus(directory: Path, gigabytes: float) -> int:
    """JSON Lines of the standard library's files, repeated in shuffled order until the text passes `gigabytes`."""
    texts = list(documents.read_documents("stdlib"))
    rng, written, part = random.Random(0), 0, 0
    while written < gigabytes * 1e9:
        rng.shuffle(texts)
        with open(directory / f"part-{part:03d}.jsonl", "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode("utf-8"))
        part += 1
    return written


def prepare_throughput(tokenizer_path: Path, gigabytes: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "text", Path(tmp) / "prepared"
        source.mkdir()
        text_bytes = write_big_corpus(source, gigabytes)
        command = [sys.executable, "-m", "llama_jax.data.prepare", "--source", str(source / "*.jsonl"),
                   "--tokenizer", str(tokenizer_path), "--out", str(out), "--workers", str(os.cpu_count())]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = PeakTreeMemory(process.pid)
        _, stderr = process.communicate()
        seconds = time.perf_counter() - start
        peak.stop()
        if process.returncode:
            raise SystemExit(f"prepare failed:\n{stderr[-2000:]}")
        tokens = sum(json.loads((out / split / "manifest.json").read_text())["tokens"] for split in ("train", "eval"))
    return {"prepare_text_gb": text_bytes / 1e9, "prepare_tokens": tokens, "prepare_seconds": seconds,
            "prepare_tokens_per_s": tokens / seconds, "prepare_text_mb_per_s": text_bytes / 1e6 / seconds,
            "prepare_peak_rss_mb": peak.peak_bytes / 2**20}


class PeakTreeMemory:
    """Samples the summed resident memory of a process and all its children (the tokenizing workers)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.peak_bytes = 0
        self._root = psutil.Process(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._done.wait(interval):
            try:
                tree = [self._root, *self._root.children(recursive=True)]
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                continue

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=400, help="batches timed per pipeline")
    parser.add_argument("--train_steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--text_documents", type=int, default=300, help="files read and tokenized for the text path")
    parser.add_argument("--prepare_gb", type=float, default=1.0, help="text for the preparation run (0: skip it)")
    parser.add_argument("--cache_dir", default="~/.cache/llama_jax", help="where the default corpus is cached")
    args = parser.parse_args()

    cache_dir = Path(args.cache_dir).expanduser()
    default = prepare_stdlib_corpus(cache_dir, vocab_size=8192)
    tokenizer = Tokenizer.from_file(default.tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        shards = shards_from(default.train, Path(tmp) / "shards")
        figures = {
            "tokens_per_s_shards": batches_per_second(shards, args.batches) * BATCH * SEQ_LEN,
            "tokens_per_s_cache": batches_per_second(default.train, args.batches) * BATCH * SEQ_LEN,
            "tokens_per_s_text": text_tokens_per_second(tokenizer, Path(tmp) / "text", args.text_documents),
        }
    figures["trainer_tokens_per_s"] = trainer_tokens_per_second(cache_dir, default.train, args.train_steps)
    figures["ratio"] = figures["tokens_per_s_shards"] / figures["trainer_tokens_per_s"]
    figures["ratio_text"] = figures["tokens_per_s_text"] / figures["trainer_tokens_per_s"]
    print(f"pipeline from shards:     {figures['tokens_per_s_shards']:>12,.0f} tokens/s")
    print(f"pipeline from the cache:  {figures['tokens_per_s_cache']:>12,.0f} tokens/s (memory-mapped .npy)")
    print(f"pipeline from raw text:   {figures['tokens_per_s_text']:>12,.0f} tokens/s (read + tokenize + store + batch)")
    print(f"tiny training step:       {figures['trainer_tokens_per_s']:>12,.0f} tokens/s")
    print(f"shards / trainer = {figures['ratio']:.0f}x, raw text / trainer = {figures['ratio_text']:.0f}x")
    if args.prepare_gb > 0:
        figures.update(prepare_throughput(default.tokenizer_path, args.prepare_gb))
        print(f"prepare: {figures['prepare_text_gb']:.2f} GB of text, {figures['prepare_tokens']:,} tokens in "
              f"{figures['prepare_seconds']:.0f} s = {figures['prepare_tokens_per_s']:,.0f} tokens/s "
              f"({figures['prepare_text_mb_per_s']:.1f} MB/s) with {os.cpu_count()} workers; peak memory "
              f"{figures['prepare_peak_rss_mb']:,.0f} MiB (all processes)")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
