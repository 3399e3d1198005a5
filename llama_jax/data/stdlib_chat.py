"""Chat and preference data built from the Python standard library's docstrings, for the post-training recipes
that run on any machine with no download (configs/sft_tiny.py, configs/reward_tiny.py, configs/dpo_tiny.py).

A question is "What does `json.dumps` do?"; the true answer is the first paragraph of its docstring. A preference
pair prefers the true answer to another function's docstring with its words shuffled: wrong in content and in form.
A fluent wrong answer alone (another function's docstring as written) asks the model to tie the answer to the name in
the question, which a model of a few million parameters trained on a few hundred pairs does not learn (measured: the
reward model's held-out accuracy stayed near chance); the shuffled order is a signal it does learn, so the tiny chain
shows the preference metrics move. The questions alone are rejection sampling's prompts:

    python -m llama_jax.data.stdlib_chat prompts --out prompts.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import random
import sys
from pathlib import Path

from etils import epath

from llama_jax.data import documents
from llama_jax.data.conversations import read_conversations
from llama_jax.data.prepare import prepare_chat
from llama_jax.data.preferences import prepare_preferences
from llama_jax.data.sources import atomic_directory
from llama_jax.data.tokenizer import tokenizer_files
from llama_jax.errors import LlamaJaxError
from llama_jax.workdir import as_path, check_writable, write_whole

MODULES = ("os.path", "json", "math", "itertools", "functools", "textwrap", "shlex", "string", "random",
           "statistics", "collections", "heapq", "bisect", "base64", "fnmatch", "glob", "shutil", "difflib")
MAX_ANSWER_CHARS = 300


def docstring_answers() -> list[tuple[str, str]]:
    """(qualified name, first docstring paragraph) of the public functions of `MODULES`, sorted, deduplicated."""
    answers = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or not callable(value) or not inspect.getdoc(value):
                continue
            paragraph = " ".join(inspect.getdoc(value).split("\n\n")[0].split())
            if 20 <= len(paragraph) <= MAX_ANSWER_CHARS and paragraph not in answers.values():
                answers[f"{module_name}.{name}"] = paragraph
    return sorted(answers.items())


def question(name: str) -> str:
    return f"What does `{name}` do?"


def conversations() -> list[dict]:
    """{"messages": [...]} records: one question each, every third one followed by a question whose answer needs
    the first turn ("Which module is it in?"). The follow-up is about the same function: one about another function
    would repeat that function's own conversation, which the split (by conversation) may hold out while it trains on
    this one."""
    records = []
    for i, (name, answer) in enumerate(docstring_answers()):
        messages = [{"role": "user", "content": question(name)}, {"role": "assistant", "content": answer}]
        if i % 3 == 0:
            module = name.rpartition(".")[0]
            messages += [{"role": "user", "content": "Which module is it in?"},
                         {"role": "assistant", "content": f"It is in the `{module}` module."}]
        records.append({"messages": messages})
    return records


def preferences() -> list[dict]:
    """{"prompt", "chosen", "rejected"} records: the true docstring over that of a function half the list away, its
    words shuffled (the same shuffle on every machine)."""
    qa = docstring_answers()
    rng = random.Random(0)

    def shuffled(text: str) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    return [{"prompt": question(name), "chosen": answer, "rejected": shuffled(qa[(i + len(qa) // 2) % len(qa)][1])}
            for i, (name, answer) in enumerate(qa)]


def prompts(limit: int | None = None) -> list[dict]:
    """{"prompt"} records: the questions of `conversations` and `preferences`, the first `limit` of them."""
    return [{"prompt": question(name)} for name, _ in docstring_answers()][:limit]


def write_jsonl(records: list[dict], path: str | os.PathLike) -> Path | epath.Path:
    """Written whole (a local file beside and renamed into place), so a process reading `path` never sees another
    one's half-written copy; `path` may be a URL."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def prepared(name: str, tokenizer: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """The built-in corpus `name` (`documents.BUILTIN_CHAT_SOURCES`) prepared for `tokenizer`, built in `cache_dir` on
    first use and keyed by the tokenizer's files and the records, so it is never stale; returns its directory
    (data.source)."""
    kind = documents.BUILTIN_CHAT_SOURCES[name]
    records = conversations() if kind == "sft" else preferences()
    digest = hashlib.sha256(json.dumps(records).encode())
    for file in tokenizer_files(tokenizer):
        digest.update(documents.file_digest(file).encode())
    out = Path(cache_dir).expanduser() / f"stdlib-{kind}-{digest.hexdigest()[:16]}"
    if not (out / "train" / "manifest.json").is_file():
        print(f"Preparing the built-in {name!r} with the run's tokenizer in {out} (first use only)...", file=sys.stderr,
              flush=True)
        source = write_jsonl(records, out.with_name(out.name + ".jsonl"))
        with atomic_directory(out, replace=False) as tmp:  # another process may be building the same entry
            if kind == "sft":
                prepare_chat(read_conversations(source), tokenizer, tmp, eval_fraction=0.1, workers=1)
            else:
                prepare_preferences(source, tokenizer, tmp, eval_fraction=0.1)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.data.stdlib_chat",
                                     description="Writes the built-in questions as JSON Lines.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("prompts", help='{"prompt": ...} records, for python -m llama_jax.rejection_sample')
    command.add_argument("--out", required=True)
    command.add_argument("--limit", type=int, default=None, help="at most this many (default: all)")
    args = parser.parse_args(argv)
    records = prompts(args.limit)
    try:
        check_writable(args.out, "--out", directory=False)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(records, args.out)
    print(f"wrote {len(records)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
