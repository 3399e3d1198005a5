"""Tokenizes a corpus once into prepared shards: `python -m llama_jax.data.prepare --source ... --tokenizer ... --out DIR`.

Training then reads tokens instead of text, so the tokenizer's cost is paid once per corpus rather than once per
run, and the exact data a run saw is pinned by the manifest (source digests, tokenizer hash, filter counts).

The output is DIR/train and, unless --eval_fraction is 0, DIR/eval: two independent `ShardedCorpus` directories,
each with its own complete manifest, so either opens without the other. Which side a document lands on is decided
by a hash of its text alone, so adding or removing other documents never moves it across the split (no eval
document leaks into train on a re-preparation). The filter counts in both manifests cover the whole input, as the
filters run before the split.

Memory stays bounded whatever the corpus size: documents are read lazily, tokenized in batches by a process pool
with a fixed number of batches in flight, and written as results come back in input order, which also makes the
shards byte-identical for any number of workers. Only `--dedup` keeps per-document state (see `ExactDuplicates`).

`--chat` prepares SFT data instead: conversations in the `messages` JSON Lines format, each rendered in the
tokenizer's own chat format as one document with its loss mask (`sft_example`), so fine-tuning sees the very layout
that generation prompts with. The same workers, split and atomic output apply; the split and `--dedup` hash
a conversation's canonical JSON (sorted keys), so reordering a record's keys never moves it. The text filters
(--quality, --min_tokens) judge prose and are refused; a conversation over --max_tokens is skipped and counted,
never cut, as `sft_examples` does, and every skip lands in the manifests' `skipped` report.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TypeVar

import numpy as np
import tqdm

from llama_jax.data.chat import ChatFormat, Message
from llama_jax.data.conversations import SkipReport, read_conversations, sft_example
from llama_jax.data.documents import ReadReport, file_digest, list_files, read_documents
from llama_jax.data.filters import ExactDuplicates, Filters, TextFilter
from llama_jax.data.shards import (
    DEFAULT_SHARD_TOKENS,
    MANIFEST_FILE,
    ShardedCorpus,
    ShardWriter,
    local_directory,
    tokenizer_hash,
)
from llama_jax.data.sources import atomic_directory
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError, LlamaJaxError
from llama_jax.workdir import check_writable

DEFAULT_EVAL_FRACTION = 0.02
_BATCH_CHARACTERS = 1 << 20  # ~1 MB of text per task: large enough to amortize pickling, small enough to balance
_BATCH_DOCUMENTS = 1024
_BATCHES_IN_FLIGHT_PER_WORKER = 2
SPLITS = ("train", "eval")
_Item = TypeVar("_Item")
_Meta = TypeVar("_Meta")
_Task = TypeVar("_Task")
_Result = TypeVar("_Result")


def prepare(
    texts: Iterable[str],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sources_info: list[dict] | None = None,
    filters: Filters | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    read_report: ReadReport | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Filters, tokenizes and writes `texts` as prepared shards; returns the written manifests by split name.

    Each kept document is stored as `Tokenizer.encode_documents` frames it. `sources_info` ({pattern, files:
    [{path, bytes, sha256}]} per source) and `read_report` go into the manifests as provenance. `out_dir` is
    replaced as a whole, and only once everything is written.
    """
    _check_output(local_directory(out_dir, "--out"), eval_fraction)
    Tokenizer.from_file(tokenizer_path)  # a missing or broken tokenizer fails here, not in every worker
    filters = filters or Filters()
    read = collections.Counter()
    with (
        _split_writers(out_dir, tokenizer_path, eval_fraction, shard_tokens, sources_info) as writers,
        _progress(progress, "docs", writers) as advance,
    ):
        batches = _batches(((t, t) for t in _deduplicated(texts, filters, read)), eval_fraction)
        for (characters, is_eval), result in _tokenize(batches, tokenizer_path, filters.text, workers or _cpus()):
            _write_batch(characters, is_eval, result, filters, writers)
            advance(len(characters))
        removed = ", ".join(f"{f.name} removed {f.documents_removed}" for f in filters.in_order()) or "no filters"
        _check_not_empty(
            writers, f"{read['documents']} read ({removed})",
            "check --source, or loosen the filters (--min_tokens, --max_tokens, --quality, --dedup)", eval_fraction,
        )
        for writer in writers.values():
            writer.metadata.update(
                filters=filters.report(),
                read_report=read_report.summary() if read_report is not None else None,
                input={"documents": read["documents"], "characters": read["characters"]},
            )
    return {split: writer.manifest for split, writer in writers.items()}


def prepare_chat(
    conversations: Iterable[list[Message]],
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sources_info: list[dict] | None = None,
    max_tokens: int | None = None,
    dedup: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    skip_report: SkipReport | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Writes each conversation as one document with its SFT loss mask; returns the written manifests by split.

    Tokens and mask are `sft_example`'s, in the tokenizer directory's chat format, so training masks exactly what
    `sft_examples` would. `skip_report` may already hold the reading's skips (pass the one given to
    `read_conversations`): the conversations over `max_tokens`, and with `dedup` the repeats of an earlier
    conversation, are added to it, and the whole report goes into the manifests. Output is as in `prepare`.
    """
    _check_output(local_directory(out_dir, "--out"), eval_fraction)
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be at least 1, got {max_tokens}: it is the longest conversation kept")
    fmt = _chat_format(tokenizer_path)  # fails here, not in every worker
    report = SkipReport() if skip_report is None else skip_report
    read = collections.Counter()
    chat = {
        "template_sha256": hashlib.sha256(fmt.template_text.encode()).hexdigest(),
        "max_tokens": max_tokens,
        "dedup": dedup,
    }
    with (
        _split_writers(out_dir, tokenizer_path, eval_fraction, shard_tokens, sources_info, chat=chat) as writers,
        _progress(progress, "conversations", writers) as advance,
    ):
        batches = _batches(_keyed_conversations(conversations, dedup, read, report), eval_fraction)
        for (indices, is_eval), result in _render(batches, tokenizer_path, workers or _cpus()):
            _write_conversations(indices, is_eval, result, max_tokens, report, writers)
            advance(len(indices))
        skipped = ", ".join(f"{reason}: {n}" for reason, n in report.counts.most_common()) or "none skipped"
        _check_not_empty(
            writers, f"{read['documents']} conversations read ({skipped})",
            "check --source and the skipped lines, or raise --max_tokens", eval_fraction,
        )
        for writer in writers.values():
            writer.metadata.update(
                skipped={"total": report.total, "counts": dict(report.counts.most_common()),
                         "examples": report.examples},
                input={"documents": read["documents"], "characters": read["characters"]},
            )
    return {split: writer.manifest for split, writer in writers.items()}


def _cpus() -> int:
    return os.cpu_count() or 1


def _check_output(out_dir: Path, eval_fraction: float) -> None:
    """Checks what can be wrong with the output before any work, so a mistake costs nothing."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}: 0.02 holds out 2% of the documents")
    check_output_directory(out_dir)


def check_output_directory(out_dir: Path) -> None:
    """Refuses an --out that cannot be written, or that holds anything but an earlier preparation (or nothing): it is
    replaced wholesale."""
    check_writable(out_dir, "--out", directory=True)
    if not out_dir.exists():
        return
    if Path.cwd().is_relative_to(out_dir.resolve()):
        raise DataError(f"--out {out_dir} is the current directory or holds it, and preparing would replace it: give a "
                        "new directory, e.g. --out prepared")
    if out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "train" / MANIFEST_FILE).is_file()):
        return
    raise DataError(
        f"{out_dir} exists and is not a prepared corpus, and preparing would replace it: choose a new --out, or "
        "delete it yourself if it is meant to go"
    )


@contextlib.contextmanager
def _split_writers(
    out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, eval_fraction: float, shard_tokens: int,
    sources_info: list[dict] | None, *, chat: dict | None = None,
) -> Iterator[dict[str, ShardWriter]]:
    """A writer per split, all in one temporary directory that replaces `out_dir` only when the block succeeds, so
    a failure leaves the earlier preparation whole. A `chat` entry makes the shards carry loss masks."""
    metadata = {
        "eval_fraction": eval_fraction,
        "tokenizer": {"path": str(tokenizer_path), "tokenizer_hash": tokenizer_hash(tokenizer_path)},
        "sources": sources_info or [],
        "command": sys.argv,
        **({"chat": chat} if chat is not None else {}),
    }
    splits = SPLITS if eval_fraction > 0 else SPLITS[:1]
    with atomic_directory(Path(out_dir)) as tmp, contextlib.ExitStack() as stack:
        yield {
            split: stack.enter_context(ShardWriter(
                tmp / split, shard_tokens=shard_tokens, loss_mask=chat is not None,
                metadata={"split": split, **metadata},
            ))
            for split in splits
        }


@contextlib.contextmanager
def _progress(enabled: bool, unit: str, writers: dict[str, ShardWriter]) -> Iterator[Callable[[int], None]]:
    """A function that advances a progress bar by n items and shows the tokens written per second."""
    start = time.perf_counter()
    # disable=None: only on a terminal, where the bar redraws in place; in a log file it would be noise.
    with tqdm.tqdm(unit=f" {unit}", file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True) as bar:

        def advance(items: int) -> None:
            bar.update(items)
            tokens = sum(w.tokens for w in writers.values())
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)

        yield advance


def _deduplicated(texts: Iterable[str], filters: Filters, read: collections.Counter) -> Iterator[str]:
    """The texts the deduplicator keeps, counting every text read (the summary reports both)."""
    for text in texts:
        read["documents"] += 1
        read["characters"] += len(text)
        if filters.dedup is None or filters.dedup.keep(text):
            yield text


def _keyed_conversations(
    conversations: Iterable[list[Message]], dedup: bool, read: collections.Counter, report: SkipReport
) -> Iterator[tuple[tuple[int, list[Message]], str]]:
    """((index, messages), canonical JSON) of each conversation kept, counting every one read.

    The canonical JSON (sorted keys) is what the split and the deduplicator hash: the same conversation written
    with its keys in another order is the same conversation. The index names a skipped one in the report, counted
    as `sft_examples` counts (from 0, over the conversations read, in --source order).
    """
    seen = ExactDuplicates() if dedup else None
    for index, messages in enumerate(conversations):
        key = json.dumps(messages, sort_keys=True)
        read["documents"] += 1
        read["characters"] += len(key)
        if seen is not None and not seen.keep(key):
            report.skip("exact duplicate", f"conversation {index}", "the same messages as an earlier conversation")
            continue
        yield (index, messages), key


def _batches(items: Iterable[tuple[_Item, str]], eval_fraction: float) -> Iterator[tuple[list[_Item], list[bool]]]:
    """Batches of items with whether each is held out, from (item, key) pairs: the key's hash decides the split,
    and its length stands for the item's size."""
    batch: list[_Item] = []
    is_eval: list[bool] = []
    size = 0
    for item, key in items:
        batch.append(item)
        is_eval.append(in_eval_split(key, eval_fraction))
        size += len(key)
        if size >= _BATCH_CHARACTERS or len(batch) >= _BATCH_DOCUMENTS:
            yield batch, is_eval
            batch, is_eval, size = [], [], 0
    if batch:
        yield batch, is_eval


def in_eval_split(text: str, eval_fraction: float) -> bool:
    """Whether `text` is held out: a fixed function of its content, so the split is stable across re-preparations."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < eval_fraction * 2**64


# ---------------------------------------------------------------------------------------------------------
# Tokenizing workers

_worker_tokenizer: Tokenizer | None = None
_worker_filters: list[TextFilter] = []
_worker_format: ChatFormat | None = None


def _init_worker(tokenizer_path: str, text_filters: list[TextFilter]) -> None:
    global _worker_tokenizer, _worker_filters
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)
    _worker_filters = text_filters


def _init_chat_worker(tokenizer_path: str) -> None:
    global _worker_format
    _worker_format = _chat_format(tokenizer_path)


def _chat_format(tokenizer_path: str | os.PathLike) -> ChatFormat:
    """The chat format of the tokenizer's directory (its template, else Llama 3's for a tokenizer with Llama 3's
    chat tokens), so the data is laid out as the model will be prompted; none at all is a DataError naming the
    template file to write."""
    return ChatFormat.from_directory(tokenizer_path, Tokenizer.from_file(tokenizer_path))


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index of the first text filter rejecting each text or -1, the kept texts' tokens concatenated, their lengths).

    Flat numpy arrays, because pickling them back is far cheaper than lists of Python ints.
    """
    verdicts = np.array(
        [next((i for i, f in enumerate(_worker_filters) if f.rejects(t)), -1) for t in texts], dtype=np.int16
    )
    documents = _worker_tokenizer.encode_documents([t for t, v in zip(texts, verdicts) if v < 0])
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(documents), dtype=np.uint32, count=int(lengths.sum()))
    return verdicts, tokens, lengths


def _render_batch(conversations: list[tuple[int, list[Message]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the conversations' tokens concatenated, their loss masks concatenated, their lengths), flat for the same
    reason as `_encode_batch`. A conversation the chat format refuses stops the preparation, as in `sft_examples`:
    a template that fails on some conversations would otherwise silently drop a kind of data."""
    examples = []
    for index, messages in conversations:
        try:
            examples.append(sft_example(_worker_format, messages))
        except DataError as e:
            raise DataError(f"conversation {index} (from 0, in --source order): {e}") from None
    lengths = np.array([len(e.tokens) for e in examples], dtype=np.int64)
    return np.concatenate([e.tokens for e in examples]), np.concatenate([e.loss_mask for e in examples]), lengths


def _tokenize(
    batches: Iterator[tuple[list[str], list[bool]]], tokenizer_path: str | os.PathLike, text_filters: list[TextFilter],
    workers: int,
) -> Iterator[tuple[tuple[list[int], list[bool]], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """((characters, is_eval) of each batch, its `_encode_batch` result), in input order."""
    tasks = ((([len(t) for t in texts], is_eval), texts) for texts, is_eval in batches)
    return _in_order(_encode_batch, tasks, _init_worker, (str(tokenizer_path), text_filters), workers)


def _render(
    batches: Iterator[tuple[list[tuple[int, list[Message]]], list[bool]]], tokenizer_path: str | os.PathLike,
    workers: int,
) -> Iterator[tuple[tuple[list[int], list[bool]], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """((conversation indices, is_eval) of each batch, its `_render_batch` result), in input order."""
    tasks = ((([index for index, _ in batch], is_eval), batch) for batch, is_eval in batches)
    return _in_order(_render_batch, tasks, _init_chat_worker, (str(tokenizer_path),), workers)


def _in_order(
    work: Callable[[_Task], _Result], tasks: Iterator[tuple[_Meta, _Task]], initializer: Callable[..., None],
    initargs: tuple, workers: int,
) -> Iterator[tuple[_Meta, _Result]]:
    """(meta, work(task)) of each (meta, task), in input order, computed by `workers` processes.

    Not `Pool.imap`: its feeder thread drains the input as fast as it can, so a fast reader would pile the corpus
    up in memory; here at most a fixed number of batches is submitted and not yet written. And a process pool
    from concurrent.futures, because a worker that dies (say, to the out-of-memory killer) breaks it with an
    error, where a multiprocessing.Pool would wait forever for the lost batch.
    """
    if workers == 1:
        initializer(*initargs)
        for meta, task in tasks:
            yield meta, work(task)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=_worker_context(), initializer=initializer, initargs=initargs
    )
    in_flight: collections.deque = collections.deque()
    try:
        for meta, task in tasks:
            in_flight.append((meta, pool.submit(work, task)))
            if len(in_flight) >= _BATCHES_IN_FLIGHT_PER_WORKER * workers:
                meta, future = in_flight.popleft()
                yield meta, future.result()
        while in_flight:
            meta, future = in_flight.popleft()
            yield meta, future.result()
    except BrokenProcessPool as e:
        raise DataError(
            f"a tokenizing worker process died ({e}), most often killed for memory: retry with fewer --workers"
        ) from None
    finally:
        pool.shutdown(cancel_futures=True)


def _worker_context() -> multiprocessing.context.BaseContext:
    """fork where the platform has it: spawn and forkserver re-import the caller's __main__ in every worker, which
    fails for a script without a main guard or code piped to python. The workers only tokenize (no JAX, whose
    threads make fork unsafe), and the tokenizer is loaded in each worker after the fork."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _write_batch(
    characters: list[int], is_eval: list[bool], result: tuple[np.ndarray, np.ndarray, np.ndarray], filters: Filters,
    writers: dict[str, ShardWriter],
) -> None:
    verdicts, tokens, lengths = result
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    kept = 0
    for verdict, size, held_out in zip(verdicts.tolist(), characters, is_eval):
        if verdict >= 0:
            filters.text[verdict].count(size)
            continue
        document = tokens[offsets[kept] : offsets[kept + 1]]
        kept += 1
        if filters.length is None or filters.length.keep(len(document)):
            writers["eval" if held_out else "train"].write(document)


def _write_conversations(
    indices: list[int], is_eval: list[bool], result: tuple[np.ndarray, np.ndarray, np.ndarray],
    max_tokens: int | None, report: SkipReport, writers: dict[str, ShardWriter],
) -> None:
    """Writes each rendered conversation, or skips and counts one over `max_tokens`: cut, it would teach an
    answer that stops mid-sentence without its end token."""
    tokens, masks, lengths = result
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for index, held_out, start, stop in zip(indices, is_eval, offsets[:-1].tolist(), offsets[1:].tolist()):
        if max_tokens is not None and stop - start > max_tokens:
            report.skip("longer than max_tokens", f"conversation {index}", f"{stop - start} tokens > {max_tokens}")
            continue
        writers["eval" if held_out else "train"].write(tokens[start:stop], masks[start:stop])


def _check_not_empty(writers: dict[str, ShardWriter], read: str, fix: str, eval_fraction: float) -> None:
    """Refuses an output with nothing to train or evaluate on; `read` says what was read and removed."""
    if writers["train"].documents == 0:
        raise DataError(f"no documents left to train on: {read}: {fix}")
    if "eval" in writers and writers["eval"].documents == 0:
        raise DataError(
            f"no document fell in the eval split ({writers['train'].documents} kept documents with eval_fraction "
            f"{eval_fraction}): raise --eval_fraction, or pass --eval_fraction 0"
        )


# ---------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama_jax.data.prepare",
        description="Tokenize text, or with --chat SFT conversations, into prepared ArrayRecord shards "
        "(DIR/train, DIR/eval) with manifests.",
    )
    p.add_argument("--source", action="append", metavar="PATTERN",
                   help="a file, directory or glob (** spans directories; local, gs://, s3://...) of text, "
                   ".jsonl(.gz|.zst) or .parquet files, or a built-in source (stdlib, stdlib_docstrings, "
                   "pydoc_topics); repeatable")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model / tokenizer.json, or a directory holding one")
    p.add_argument("--out", metavar="DIR", help="output directory (replaced if it holds an earlier preparation)")
    p.add_argument("--chat", action="store_true",
                   help='SFT conversations instead of text: .jsonl(.gz|.zst) or .parquet files of {"messages": '
                   '[{"role": ..., "content": ...}, ...]} (or ShareGPT\'s conversations, prompt and completion, '
                   "Alpaca's instruction and output), each stored with its loss mask (the assistant turns), in "
                   "the chat format of the tokenizer's directory (its template, else Llama 3's)")
    p.add_argument("--text_field", help="the .jsonl field or Parquet column that holds the text (default: text)")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard at most")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    p.add_argument("--dedup", action="store_true",
                   help="drop exact duplicate documents or conversations (keeps the first)")
    p.add_argument("--min_tokens", type=int, help="drop documents with fewer tokens")
    p.add_argument("--max_tokens", type=int,
                   help="drop (never truncate) documents or conversations with more tokens")
    p.add_argument("--quality", action="store_true",
                   help="Gopher's repetition and symbol filters: for web prose, not for code (comments use '#')")
    p.add_argument("--eval_fraction", type=float, default=DEFAULT_EVAL_FRACTION, help="held-out fraction (0: none)")
    p.add_argument("--verify", metavar="DIR", help="only check the sha256 digests of a prepared corpus, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verify is None and not (args.source and args.tokenizer and args.out):
        parser.error("--source, --tokenizer and --out are required (or --verify DIR alone)")
    if args.workers < 1 or args.shard_tokens < 1:
        parser.error("--workers and --shard_tokens must be at least 1")
    if not 0 <= args.eval_fraction < 1:  # checked before the sources are hashed, which can take long
        parser.error(f"--eval_fraction must be in [0, 1), got {args.eval_fraction}")
    if args.chat:
        _check_chat_options(parser, args)
    try:
        if args.verify is not None:
            for line in verify(args.verify):
                print(line)
        else:
            check_output_directory(local_directory(args.out, "--out"))  # before the sources' digests, which take long
            for line in (_run_chat if args.chat else _run)(args):
                print(line, file=sys.stderr)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _check_chat_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses the text-only options rather than ignore them, which would leave a user believing they applied."""
    text_only = {"--quality": args.quality, "--min_tokens": args.min_tokens is not None,
                 "--text_field": args.text_field is not None}
    given = [flag for flag, present in text_only.items() if present]
    if given:
        parser.error(
            f"{', '.join(given)} apply to text documents, not to --chat conversations: drop them (with --chat, "
            "--max_tokens skips long conversations and --dedup drops repeated ones)"
        )
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max_tokens must be at least 1, got {args.max_tokens}")


def verify(directory: str | os.PathLike) -> list[str]:
    """Checks every digest of a prepared corpus (DIR with train/eval, or one split); one line per split checked."""
    directory = local_directory(directory, "--verify")
    splits = [directory / s for s in SPLITS if (directory / s / MANIFEST_FILE).is_file()] or [directory]
    lines = []
    for split in splits:
        corpus = ShardedCorpus.open(split)
        corpus.verify()
        lines.append(f"ok: {split} ({len(corpus):,} documents, {corpus.num_tokens:,} tokens, "
                     f"{len(corpus.manifest['shards'])} shards)")
    return lines


def _run(args: argparse.Namespace) -> list[str]:
    start = time.perf_counter()
    filters = Filters.from_options(
        dedup=args.dedup, quality=args.quality, min_tokens=args.min_tokens, max_tokens=args.max_tokens
    )
    sources_info = [_source_info(pattern, args.workers) for pattern in args.source]
    report = ReadReport()
    texts = itertools.chain.from_iterable(
        read_documents(pattern, text_field=args.text_field or "text", report=report) for pattern in args.source
    )
    manifests = prepare(
        texts, args.tokenizer, args.out, sources_info=sources_info, filters=filters, shard_tokens=args.shard_tokens,
        workers=args.workers, eval_fraction=args.eval_fraction, read_report=report, progress=True,
    )
    return _summary(manifests, time.perf_counter() - start)


def _run_chat(args: argparse.Namespace) -> list[str]:
    start = time.perf_counter()
    report = SkipReport()
    # Opened before the sources are hashed, so that a pattern matching no file fails at once.
    conversations = itertools.chain.from_iterable([read_conversations(p, report=report) for p in args.source])
    sources_info = [_source_info(pattern, args.workers) for pattern in args.source]
    manifests = prepare_chat(
        conversations, args.tokenizer, args.out, sources_info=sources_info, max_tokens=args.max_tokens,
        dedup=args.dedup, shard_tokens=args.shard_tokens, workers=args.workers, eval_fraction=args.eval_fraction,
        skip_report=report, progress=True,
    )
    lines = _split_lines(manifests) + (report.summary().splitlines() if report.total else [])
    return lines + _speed_lines(manifests, time.perf_counter() - start, "conversations")


def _source_info(pattern: str, workers: int) -> dict:
    """The files of a source with their sizes and digests, hashed by threads (hashlib releases the GIL)."""
    files = list_files(pattern)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(file_digest, files))
    entries = [{"path": str(f), "bytes": f.stat().length, "sha256": d} for f, d in zip(files, digests)]
    return {"pattern": pattern, "files": entries}


def _summary(manifests: dict[str, dict], seconds: float) -> list[str]:
    """The lines printed after a preparation: what was written, what each filter removed, speed and memory."""
    first = next(iter(manifests.values()))
    lines = _split_lines(manifests)
    for f in first["filters"]:
        unit = "tokens" if "tokens_removed" in f else "characters"
        lines.append(f"filter {f['name']}: removed {f['documents_removed']:,} documents ({f[f'{unit}_removed']:,} {unit})")
    if first["read_report"]:
        lines.append(f"read: {first['read_report']}")
    return lines + _speed_lines(manifests, seconds, "documents")


def _split_lines(manifests: dict[str, dict]) -> list[str]:
    return [
        f"{split}: {m['documents']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards"
        for split, m in manifests.items()
    ]


def _speed_lines(manifests: dict[str, dict], seconds: float, unit: str) -> list[str]:
    """Throughput and peak memory, the two numbers that size a preparation of a larger corpus. A conversation's
    characters are those of its canonical JSON."""
    read = next(iter(manifests.values()))["input"]
    tokens = sum(m["tokens"] for m in manifests.values())
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    speed = (
        f"{read['documents']:,} {unit} read in {seconds:.1f} s: {tokens / seconds:,.0f} tokens/s, "
        f"{read['characters'] / seconds / 1e6:.2f} M characters/s"
    )
    memory = f"peak RSS: {own:,.0f} MiB" + (f" (main process), {worker:,.0f} MiB (largest worker)" if worker else "")
    return [speed, memory]


if __name__ == "__main__":
    sys.exit(main())
