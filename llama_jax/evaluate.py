"""Multiple-choice evaluation by log-likelihood, as lm-eval-harness scores HellaSwag, ARC or PIQA; and the held-out
loss and perplexity of text.

Each question is a context and several choices; the model scores each choice's continuation (" " + choice) by the
summed log-probability of its tokens given the context, and picks the highest. Reported per task:

- `acc`: accuracy by the raw summed log-probability (favours short choices);
- `acc_norm`: accuracy by log-probability per *character* of the choice, lm-eval-harness's `acc_norm` (per character
  rather than per token, so the number does not depend on the tokenizer);
- `acc_per_token`: accuracy by log-probability per continuation token;
- `nll_norm`: the correct choice's negative log-likelihood per character (nats), and `nll_per_token` per token: the
  smooth quantity the Llama 3 paper's second scaling-law stage maps to accuracy;
- `n`: the number of questions.

Questions are read from JSON Lines files (see `parse_question` for the layouts). Every (context, choice) pair is one
row; rows are grouped by length into fixed-shape batches (lengths rounded up to powers of two) so that a whole task
compiles a handful of times. Rows are left-padded, so every continuation ends at the last position and only the last
few positions go through the vocabulary projection.

    python -m llama_jax.evaluate --checkpoint PATH --tasks stdlib_mc[,FILE.jsonl ...] [--batch_size 32] [--mesh data=8]

Text (`--data [NAME=]SOURCE`, `evaluate_text`) is scored as the training loop scores its held-out sets: the documents
in stored order, packed into rows of `--max_len` tokens, each document attending to itself only, every token after
a document's first predicted; reported as `<name>/loss` (nats per token), `<name>/perplexity` and `<name>/tokens`.
By default a document longer than a row goes on in the next row without the context before it (as in
lm-eval-harness's rolling windows, but for their last one). `--stride S` scores such a document in overlapping
windows instead, as Hugging Face's "perplexity of fixed-length models" does: a window of `--max_len` tokens every S
tokens, each scoring only the tokens no earlier window scored, so each of those is predicted with at least
max_len - S tokens before it. Every token is still scored once; the perplexity of long documents drops towards what
the model does with full context, at max_len / S times the compute.

    python -m llama_jax.evaluate --checkpoint PATH --data val=/data/val.jsonl [--data pydoc_topics] [--max_len 2048]
                                 [--stride 512]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax.data.documents import NotUtf8, json_line, read_records
from llama_jax.data.pipeline import DocumentStore, eval_batches
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError, LlamaJaxError
from llama_jax.model import Llama, ModelDef
from llama_jax.objectives import lm_loss_sum, token_nll
from llama_jax.parallel.mesh import logical_to_spec, replicated
from llama_jax.workdir import as_path, not_a_file

TASKS_DIR = Path(__file__).resolve().parent / "data" / "tasks"
BUILTIN_TASKS = {"stdlib_mc": TASKS_DIR / "stdlib_mc.jsonl"}  # shipped with the package; no download
TARGET_DELIMITER = " "  # between context and choice, as lm-eval-harness writes it
_CONTEXT_KEYS = ("question", "query", "context")
_CHOICES_KEYS = ("choices", "endings", "options")
_ANSWER_KEYS = ("answer", "label", "gold")
_LAYOUTS = ("each line needs a context ('question', 'query' or 'context'), a list of choices ('choices', 'endings' or "
            "'options') and the correct one ('answer', 'label' or 'gold': an index from 0 or a letter A, B, ...), or "
            "the HellaSwag (ctx, endings, label), ARC (question, choices {text, label}, answerKey) or PIQA (goal, sol1, "
            "sol2, label) layout")
_MIN_BUCKET = 16

ModelLike = Llama | tuple[ModelDef, dict]  # a module, or the trainer's (ModelDef, params) pair


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """A task's questions, tokenized once: load it at start-up and score it as often as wanted."""

    name: str
    questions: tuple[Question, ...]
    context_ids: tuple[tuple[int, ...], ...]  # per question: framing (bos) + context tokens, left-truncated to fit
    choice_ids: tuple[tuple[tuple[int, ...], ...], ...]  # per question, per choice: continuation tokens
    max_len: int

    @functools.cached_property
    def largest_id(self) -> int:
        return max(max(ids, default=0) for ids in (*self.context_ids, *(c for conts in self.choice_ids for c in conts)))

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer, max_len: int = 2048, name: str | None = None) -> ChoiceTask:
        """A JSON Lines file (local or a URL), or a built-in task's name (`BUILTIN_TASKS`). `max_len`: the longest row
        scored (the model's context); longer contexts lose their beginning, as in lm-eval-harness."""
        path = BUILTIN_TASKS.get(str(path), as_path(path))
        return cls.from_questions(name or path.stem, read_questions(path), tokenizer, max_len, source=str(path))

    @classmethod
    def from_questions(cls, name: str, questions: Sequence[Question], tokenizer: Tokenizer, max_len: int = 2048,
                       source: str = "") -> ChoiceTask:
        if max_len < 2:
            raise DataError(f"max_len={max_len} is too short to score anything: give at least 2 tokens")
        contexts, choices = [], []
        for index, question in enumerate(questions):
            encoded = [_encode_pair(tokenizer, question.context, TARGET_DELIMITER + c) for c in question.choices]
            longest = max(len(cont) for _, cont in encoded)
            if longest >= max_len:
                raise DataError(f"{source or name}: question {index + 1} has a choice of {longest} tokens, which leaves "
                                f"no room for its context within max_len={max_len}: raise max_len or shorten the choice")
            context = encoded[0][0][-(max_len + 1 - longest):]  # every choice of a question shares the context
            contexts.append(tuple(context))
            choices.append(tuple(tuple(cont) for _, cont in encoded))
        return cls(name, tuple(questions), tuple(contexts), tuple(choices), max_len)


# ------------------------------------------------------------------------------------------------- reading files


def read_questions(path: str | Path) -> list[Question]:
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"task file {path} {not_a_file(path)}: pass a .jsonl(.gz|.zst) or .parquet file or one of "
                        f"{sorted(BUILTIN_TASKS)}")
    questions = []
    for where, line in read_records(path):  # JSON Lines, or the Parquet files the Hub's benchmarks come as
        try:
            record = line if isinstance(line, dict) else json_line(line)
        except NotUtf8 as e:
            raise DataError(f"{where}: not UTF-8 text ({e}): write UTF-8 JSON Lines") from None
        except ValueError as e:
            raise DataError(f"{where}: not valid JSON ({e}): write one JSON object per line") from None
        questions.append(parse_question(record, where))
    if not questions:
        raise DataError(f"task file {path} holds no questions: {_LAYOUTS}")
    return questions


def parse_question(record: object, where: str) -> Question:
    """One line of a task file, in any of the layouts of `_LAYOUTS`.

    HellaSwag, ARC and PIQA are turned into the prompts lm-eval-harness gives them (HellaSwag: "activity: ctx";
    ARC and PIQA: "Question: ...\\nAnswer:"), so their scores are comparable with published ones. Generic lines use
    their context as it is.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {_LAYOUTS}")
    if "goal" in record and "sol1" in record:  # PIQA
        context = f"Question: {_text(record, 'goal', where)}\nAnswer:"
        choices = [_text(record, "sol1", where), _text(record, "sol2", where)]
        return Question(context, tuple(choices), _answer_index(record, ("label",), choices, None, where))
    if isinstance(record.get("choices"), dict):  # ARC: choices {"text": [...], "label": ["A", ...]}, answerKey
        context = f"Question: {_text(record, 'question', where)}\nAnswer:"
        choices = _choice_list(record["choices"], "text", where, field="choices.text")
        labels = [str(label) for label in record["choices"].get("label", [])]
        return Question(context, tuple(choices), _answer_index(record, ("answerKey",), choices, labels, where))
    if "endings" in record and ("ctx" in record or "ctx_a" in record):  # HellaSwag
        if "ctx_a" in record:  # as lm-eval-harness builds it; the published `ctx` leaves ctx_b in lower case
            ctx = f"{_text(record, 'ctx_a', where)} {str(record.get('ctx_b', '')).capitalize()}".strip()
        else:
            ctx = _text(record, "ctx", where)
        activity = record.get("activity_label")
        context = _hellaswag_clean(f"{activity}: {ctx}" if activity else ctx)
        choices = [_hellaswag_clean(c) for c in _choice_list(record, "endings", where)]
        return Question(context, tuple(choices), _answer_index(record, ("label",), choices, None, where))
    context_key = _first_present(record, _CONTEXT_KEYS, where, "context")
    choices_key = _first_present(record, _CHOICES_KEYS, where, "choices")
    choices = _choice_list(record, choices_key, where)
    return Question(_text(record, context_key, where), tuple(choices),
                    _answer_index(record, _ANSWER_KEYS, choices, None, where))


def _first_present(record: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for key in keys:
        if key in record:
            return key
    raise DataError(f"{where}: missing field {' / '.join(repr(k) for k in keys)} (the {what}); found "
                    f"{sorted(record)}: {_LAYOUTS}")


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}; found {sorted(record)}: {_LAYOUTS}")
    if not isinstance(record[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    return record[key]


def _choice_list(record: dict, key: str, where: str, field: str | None = None) -> list[str]:
    choices = record.get(key)
    field = field or key
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: field {field!r} must be a list of at least two non-empty strings, got {choices!r}")
    return choices


def _answer_index(record: dict, keys: tuple[str, ...], choices: list[str], labels: list[str] | None, where: str) -> int:
    """The correct choice from an index (0-based int or digit string) or a letter (A = first), or an ARC label."""
    key = _first_present(record, keys, where, "correct choice")
    value = record[key]
    index = None
    if labels and str(value) in labels:
        index = labels.index(str(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    if index is None or not 0 <= index < len(choices):
        raise DataError(f"{where}: field {key!r}={value!r} does not name one of the {len(choices)} choices: give an "
                        f"index from 0 to {len(choices) - 1} or a letter from A to {chr(ord('A') + len(choices) - 1)}")
    return index


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's HellaSwag preprocessing: WikiHow's bracketed markers removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the tokenizer's leading framing, continuation ids), split as lm-eval-harness splits them:
    the pair is encoded whole and the context's own tokens cut off, so a merge across the boundary is tokenized as
    the model saw such text in training; trailing spaces of the context move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
    whole_ids = tokenizer.encode(context + continuation, add_special_tokens=False)
    if whole_ids[: len(context_ids)] == context_ids:
        continuation_ids = whole_ids[len(context_ids):]
    else:
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    prefix = list(tokenizer.prefix_ids) + context_ids
    return prefix or [tokenizer.eos_id], continuation_ids  # a row needs one token before the continuation


# ------------------------------------------------------------------------------------------------------ scoring


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """Per question, per choice: summed log-probability, token count and character count of the choice."""

    logprobs: tuple[np.ndarray, ...]
    tokens: tuple[np.ndarray, ...]
    chars: tuple[np.ndarray, ...]
    gold: np.ndarray


def score_choices(model: ModelLike, task: ChoiceTask, batch_size: int = 32, mesh: Mesh | None = None) -> ChoiceScores:
    """Every choice's summed log-probability given its context.

    `model` is a `Llama` or the trainer's `(ModelDef, params)`. With `mesh`, the parameters must already live on it
    (as the trainer's or `open_checkpoint(path, mesh=mesh)`'s do): the rows are split over its data-parallel axes
    (`data` x `fsdp`, as training splits batches) and every batch runs under `jax.set_mesh(mesh)`.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be positive")
    _check_in_vocabulary(task.largest_id, model, f"task {task.name!r}")
    graphdef, state = nnx.split(_as_module(model))
    rows = [(q, c) for q, conts in enumerate(task.choice_ids) for c in range(len(conts))]
    rows.sort(key=lambda qc: -(len(task.context_ids[qc[0]]) + len(task.choice_ids[qc[0]][qc[1]])))
    batch_size = _split_evenly(batch_size, mesh)
    score = _scorer(mesh)
    pending = []  # read back after the loop, so that batches are dispatched while earlier ones run
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            arrays, window = _batch(task, chunk, batch_size)
            if mesh is not None:
                arrays = [_place(a, mesh) for a in arrays]
            pending.append((chunk, score(graphdef, state, *arrays, window=window)))
    logprob = {}
    for chunk, logprob_b in pending:
        logprob.update(zip(chunk, np.asarray(logprob_b).tolist()))
    return ChoiceScores(
        logprobs=tuple(np.array([logprob[(q, c)] for c in range(len(conts))]) for q, conts in enumerate(task.choice_ids)),
        tokens=tuple(np.array([len(ids) for ids in conts], float) for conts in task.choice_ids),
        chars=tuple(np.array([len(choice) for choice in q.choices], float) for q in task.questions),
        gold=np.array([q.gold for q in task.questions]),
    )


def evaluate_choices(model: ModelLike, task: ChoiceTask, batch_size: int = 32, mesh: Mesh | None = None
                     ) -> dict[str, float]:
    """`{task}/acc`, `/acc_norm` (per character), `/acc_per_token`, `/nll_norm` (per character),
    `/nll_per_token` and `/n`: see the module docstring."""
    return summarize(task.name, score_choices(model, task, batch_size, mesh))


def evaluate_tasks(model: ModelLike, tasks: Sequence[ChoiceTask], batch_size: int = 32, mesh: Mesh | None = None
                   ) -> dict[str, float]:
    """`evaluate_choices` over several tasks, in one dict. Two tasks of one name (a task takes its file's stem: the
    Hub's ARC-Easy and ARC-Challenge are both `test-00000-of-00001`) are refused: the second's figures replaced the
    first's."""
    check_task_names(tasks)
    metrics = {}
    for task in tasks:
        metrics.update(evaluate_choices(model, task, batch_size, mesh))
    return metrics


def check_task_names(tasks: Sequence[ChoiceTask]) -> None:
    names = [task.name for task in tasks]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(f"more than one task is named {' and '.join(map(repr, twice))} (a task is named after its "
                        "file's stem), so one's figures would replace the other's: rename the files apart")


def summarize(name: str, scores: ChoiceScores) -> dict[str, float]:
    def accuracy(normaliser) -> float:
        picks = [int(np.argmax(lp / norm)) for lp, norm in zip(scores.logprobs, normaliser)]
        return float(np.mean(np.array(picks) == scores.gold))

    ones = [np.ones_like(lp) for lp in scores.logprobs]
    gold_nll = np.array([-lp[g] for lp, g in zip(scores.logprobs, scores.gold)])
    gold_chars = np.array([n[g] for n, g in zip(scores.chars, scores.gold)])
    gold_tokens = np.array([n[g] for n, g in zip(scores.tokens, scores.gold)])
    return {
        f"{name}/acc": accuracy(ones),
        f"{name}/acc_norm": accuracy(scores.chars),
        f"{name}/acc_per_token": accuracy(scores.tokens),
        f"{name}/nll_norm": float(np.mean(gold_nll / gold_chars)),
        f"{name}/nll_per_token": float(np.mean(gold_nll / gold_tokens)),
        f"{name}/n": float(len(scores.gold)),
    }


def _split_evenly(batch_size: int, mesh: Mesh | None) -> int:
    """`batch_size` rounded up to a multiple of the mesh's data-parallel shards (`data` x `fsdp`), over which the
    rows are split as training splits its batches."""
    if mesh is None:
        return batch_size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-batch_size // shards) * shards


def _check_in_vocabulary(largest_id: int, model: ModelLike, what: str) -> None:
    """Ids past the embedding's rows give NaN scores, which the accuracies took for picks of the first choice."""
    vocab_size = (model.cfg if isinstance(model, Llama) else model[0].cfg).vocab_size
    if largest_id >= vocab_size:
        raise DataError(f"{what} holds token id {largest_id}, past the model's vocabulary of {vocab_size} ids: the "
                        "tokenizer is not the model's; evaluate with the tokenizer the model was trained with")


def _as_module(model: ModelLike) -> Llama:
    if isinstance(model, Llama):
        return model
    model_def, params = model
    return model_def.merge(params)


def _bucket(length: int, cap: int) -> int:
    """Lengths rounded up to a power of two (at least `_MIN_BUCKET`), so that few shapes compile."""
    return min(max(_MIN_BUCKET, 1 << (length - 1).bit_length()), max(cap, length))


def _batch(task: ChoiceTask, rows: list[tuple[int, int]], batch_size: int) -> tuple[list[np.ndarray], int]:
    """Left-padded inputs [b, t] and the last-`window` targets and mask [b, window] of these rows (filler rows
    after them have an all-zero mask)."""
    sequences = [task.context_ids[q] + task.choice_ids[q][c] for q, c in rows]
    t = _bucket(max(len(s) - 1 for s in sequences), task.max_len)
    window = _bucket(max(len(task.choice_ids[q][c]) for q, c in rows), t)
    tokens, segments, positions = (np.zeros((batch_size, t), np.int32) for _ in range(3))
    targets, mask = np.zeros((batch_size, window), np.int32), np.zeros((batch_size, window), np.float32)
    for row, ((q, c), seq) in enumerate(zip(rows, sequences)):
        n, k = len(seq) - 1, len(task.choice_ids[q][c])
        tokens[row, t - n:] = seq[:-1]
        segments[row, t - n:] = 1
        positions[row, t - n:] = np.arange(n)
        targets[row, window - k:] = seq[-k:]
        mask[row, window - k:] = 1.0
    return [tokens, segments, positions, targets, mask], window


def _place(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch, rows split over the data-parallel axes; every process holds all rows, so each fills its
    own shards from them (works on one host and on several)."""
    sharding = NamedSharding(mesh, logical_to_spec(("batch", None)))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


@functools.lru_cache(maxsize=None)
def _scorer(mesh: Mesh | None):
    """The jitted scoring step; with a mesh its result is replicated, so every process can read it."""

    def score(graphdef, state, tokens_bt, segment_ids_bt, positions_bt, targets_bk, mask_bk, *, window: int):
        model = nnx.merge(graphdef, state)
        h_btd = model.hidden(tokens_bt, segment_ids=segment_ids_bt, positions=positions_bt)
        nll_bk = token_nll(model.logits(h_btd[:, -window:]), targets_bk)
        return -jnp.sum(nll_bk * mask_bk, axis=-1)

    out = replicated(mesh) if mesh is not None else None
    return jax.jit(score, static_argnames=("graphdef", "window"), out_shardings=out)


# ------------------------------------------------------------------------------------------- the loss of text

_TEXT_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
_LOSS_CHUNK = 1024  # positions whose float32 logits exist at a time, when it divides the row length


def evaluate_text(model: ModelLike, store: DocumentStore, name: str, *, seq_len: int, batch_size: int = 8,
                  mesh: Mesh | None = None, pad_id: int = 0, max_batches: int = 0, stride: int = 0
                  ) -> dict[str, float]:
    """`<name>/tokens`, `<name>/loss` and `<name>/perplexity` of the documents in `store` (see the module's
    docstring), over all of them or the first `max_batches` batches of `batch_size` rows; with a `stride`, in
    overlapping windows. On a `mesh`, `batch_size` is rounded up to split over its data-parallel axes. A store with
    a loss mask (chat) is scored in windows whatever the stride: the pipeline never splits such documents over rows,
    and left out those longer than a row."""
    batch_size = _split_evenly(batch_size, mesh)
    if stride or store.has_loss_mask:
        store = StridedWindows(store, seq_len, stride or seq_len)
    every = -(-int(store.lengths.sum()) // (seq_len * batch_size)) + len(store.lengths)  # more than they fill
    batches = eval_batches(store, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches or every,
                           pad_id=pad_id)
    _check_in_vocabulary(max((int(batch[key].max()) for batch in batches for key in ("tokens", "targets")), default=0),
                         model, f"--data {name}")
    graphdef, state = nnx.split(_as_module(model))
    total = _text_loss(mesh)
    chunk = _LOSS_CHUNK if seq_len > _LOSS_CHUNK and seq_len % _LOSS_CHUNK == 0 else 0
    sums = [total(graphdef, state, *(batch[k] if mesh is None else _place(batch[k], mesh) for k in _TEXT_KEYS),
                  chunk_len=chunk) for batch in batches]
    loss_sum, count = (float(sum(values)) for values in zip(*jax.device_get(sums)))
    if not count:
        raise DataError(f"{name}: no token to predict (every document is a single token)")
    loss = loss_sum / count
    return {f"{name}/tokens": count, f"{name}/loss": loss, f"{name}/perplexity": math.exp(loss)}


def check_stride(stride: int, seq_len: int) -> None:
    if stride and not 0 < stride <= seq_len:
        raise DataError(f"a stride of {stride} tokens does not fit windows of {seq_len}: give a --stride from 1 to "
                        f"--max_len ({seq_len}), or 0 for windows that do not overlap")


class StridedWindows:
    """A store's documents as windows of at most `seq_len` pairs, one every `stride` tokens, whose loss mask keeps the
    tokens no earlier window of the document scored. A window is a whole document to the pipeline (packed whole,
    attending to itself), so short documents still share rows."""

    has_loss_mask = True

    def __init__(self, store: DocumentStore, seq_len: int, stride: int):
        check_stride(stride, seq_len)
        self.store = store
        spans = []  # (document, first token, end, first token scored)
        for document, length in enumerate(np.asarray(store.lengths, np.int64)):
            begin, scored = 0, 0
            while True:
                end = min(begin + seq_len + 1, int(length))
                spans.append((document, begin, end, scored))
                if end == length:
                    break
                begin, scored = begin + stride, end
        self.spans = np.array(spans, np.int64).reshape(-1, 4)
        self.lengths = self.spans[:, 2] - self.spans[:, 1]

    def read(self, index: int) -> np.ndarray:
        document, begin, end, _ = self.spans[index]
        return self.store.read(int(document))[begin:end]

    def read_loss_mask(self, index: int) -> np.ndarray:
        """The tokens this window scores first, of those the store scores (chat: the assistant's)."""
        document, begin, end, scored = self.spans[index]
        mask = (np.arange(begin, end) >= scored).astype(np.uint8)
        if self.store.has_loss_mask:
            mask &= np.asarray(self.store.read_loss_mask(int(document))[begin:end], np.uint8)
        return mask


@functools.lru_cache(maxsize=None)
def _text_loss(mesh: Mesh | None):
    """The jitted (loss sum, token count) of a batch of rows; with a mesh, replicated."""

    def total(graphdef, state, tokens_bt, targets_bt, segment_ids_bt, positions_bt, mask_bt, *, chunk_len: int):
        model = nnx.merge(graphdef, state)
        h_btd = model.hidden(tokens_bt, segment_ids=segment_ids_bt, positions=positions_bt)
        return lm_loss_sum(model.logits, h_btd, targets_bt, mask_bt, chunk_len=chunk_len)

    out = replicated(mesh) if mesh is not None else None
    return jax.jit(total, static_argnames=("graphdef", "chunk_len"), out_shardings=out)


def _named_sources(entries: Sequence[str]) -> dict[str, str]:
    """{name: source} of `--data` entries, each `NAME=SOURCE` or a SOURCE named by its file's stem (a built-in source
    by its name). Two of one name would report under one name, the second's figures in place of the first's."""
    sources = {}
    for entry in entries:
        name, sep, source = entry.partition("=")
        if not (sep and name and "/" not in name):
            name, source = (Path(entry.rstrip("/")).stem or entry), entry
        if name in sources:
            raise DataError(f"--data {sources[name]} and --data {source} are both named {name!r}: name them apart, "
                            f"e.g. --data {name}_2={source}")
        sources[name] = source
    return sources


# ------------------------------------------------------------------------------------------------------- CLI


def format_table(metrics: dict[str, float], columns: Sequence[str] = ("n", "acc", "acc_norm", "acc_per_token",
                                                                       "nll_norm", "nll_per_token"),
                 label: str = "task") -> str:
    """One row per name in `metrics` (`<name>/<column>` keys), the first column a count."""
    names = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in metrics))
    width = max(len(label), *(len(n) for n in names))
    lines = [f"{label:<{width}}  " + "  ".join(f"{c:>13}" for c in columns)]
    for name in names:
        cells = [f"{int(metrics[f'{name}/{columns[0]}']):>13d}"] + [f"{metrics[f'{name}/{c}']:>13.4f}"
                                                                    for c in columns[1:]]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.evaluate",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model directory, or a llama_jax workdir/checkpoint")
    parser.add_argument("--tasks", default=None, help=f"comma-separated .jsonl(.gz|.zst) or .parquet files or built-in "
                        f"tasks ({', '.join(BUILTIN_TASKS)}); default stdlib_mc, or none when --data is given")
    parser.add_argument("--data", action="append", default=[], metavar="[NAME=]SOURCE",
                        help="the loss and perplexity of a text source: a path, glob or built-in name as data.source "
                        "takes (every document), or a prepared directory (its eval split); repeatable")
    parser.add_argument("--text_field", default="text", help="the .jsonl field / Parquet column of --data's text")
    parser.add_argument("--cache_dir", default="~/.cache/llama_jax", help="where --data's tokens are kept")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--max_len", type=int, default=0,
                        help="longest row in tokens (--data: every row's length); 0 = min(model.max_seq_len, 2048)")
    parser.add_argument("--stride", type=int, default=0,
                        help="--data: score documents longer than --max_len in windows this many tokens apart, each "
                        "token with at least max_len - stride tokens of context; 0 = windows that do not overlap")
    parser.add_argument("--mesh", default=None, help="shard the model over a device mesh, e.g. data=4,tensor=2 "
                                                     "(as python -m llama_jax.generate); default: one device")
    args = parser.parse_args(argv)
    from llama_jax.convert import open_checkpoint  # the checkpoint readers are needed by the CLI only
    from llama_jax.data.corpus import held_out_store
    from llama_jax.data.preferences import is_preference_store
    from llama_jax.generate import inference_mesh
    from llama_jax.memory import report_out_of_memory

    try:
        if args.batch_size < 1 or args.max_len < 0:
            raise DataError(f"--batch_size must be positive and --max_len positive or 0 (the model's context up to "
                            f"2048), got {args.batch_size} and {args.max_len}")
        text_only = [flag for flag, given in (("--stride", args.stride), ("--text_field", args.text_field != "text"))
                     if given]
        if text_only and not args.data:
            raise DataError(f"{' and '.join(text_only)} apply to the text of --data, and none is given: add --data "
                            "SOURCE, or leave them out")
        mesh = inference_mesh(args.mesh)
        tasks_arg = args.tasks if args.tasks is not None else ("" if args.data else "stdlib_mc")
        files = [t.strip() for t in tasks_arg.split(",") if t.strip()]
        if not files and not args.data:
            raise DataError("--tasks is empty: give .jsonl files or built-in task names, comma-separated")
        sources = _named_sources(args.data)
        opened = open_checkpoint(args.checkpoint, mesh=mesh)
        context = opened.model.cfg.max_seq_len
        if args.max_len > context:
            raise DataError(f"--max_len {args.max_len} exceeds the model's context (model.max_seq_len {context}): "
                            f"give at most {context}, or 0 for {min(context, 2048)}")
        max_len = args.max_len or min(context, 2048)
        check_stride(args.stride, max_len)
        tasks = [ChoiceTask.load(f, opened.tokenizer, max_len) for f in files]
        metrics = evaluate_tasks(opened.model, tasks, args.batch_size, mesh)
        text = {}
        for name, source in sources.items():
            store = held_out_store(name, source, opened.files, Path(args.cache_dir).expanduser(), args.text_field)
            if is_preference_store(store):  # two documents a pair: the rejected responses would count as text
                raise DataError(f"--data {source} holds preference pairs, whose rejected responses would be scored as "
                                "much as the chosen ones: evaluate the chosen conversations alone (python -m "
                                "llama_jax.data.prepare --chat)")
            text.update(evaluate_text(opened.model, store, name, seq_len=max_len, batch_size=args.batch_size,
                                      mesh=mesh, pad_id=opened.tokenizer.pad_id, stride=args.stride))
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        return report_out_of_memory(e, "lower --batch_size (or --max_len), or shard the model over more devices "
                                       "(--mesh)")
    if metrics:
        print(format_table(metrics))
    if text:
        print(format_table(text, ("tokens", "loss", "perplexity"), label="data"))
    print(json.dumps({**metrics, **text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
