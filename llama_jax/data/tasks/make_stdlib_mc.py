"""Writes stdlib_mc.jsonl: multiple-choice questions about the Python standard library, made from its docstrings.

Each question quotes the first line of a public function's docstring and asks which of four functions of the same
module it describes; the three distractors are other functions of that module. The default training corpus is the
standard library's source, so even the tiny CPU models of the scaling notebook can learn some of these. Everything
comes from the running Python (no download) and a fixed seed, so rerunning on the same Python gives the same file:

    python -m llama_jax.data.tasks.make_stdlib_mc [--out PATH] [--questions 48]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
from pathlib import Path

MODULES = ("base64", "bisect", "calendar", "copy", "difflib", "fnmatch", "functools", "glob", "heapq", "json",
           "posixpath", "random", "shutil", "statistics", "string", "tempfile", "textwrap", "urllib.parse")
CHOICES = 4


def candidate_functions(module_name: str) -> list[tuple[str, str]]:
    """(qualified name, first docstring line) of a module's public, pure-Python functions with a usable docstring
    that does not give the name away."""
    module = importlib.import_module(module_name)
    found = []
    for name, fn in sorted(inspect.getmembers(module, inspect.isfunction)):
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        if name.startswith("_") or fn.__module__ != module.__name__ or not doc:
            continue
        first = doc[0].strip()
        if 20 <= len(first) <= 120 and name.lower() not in first.lower():
            found.append((f"{module_name}.{name}", first))
    return found


def questions(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pools = {m: candidate_functions(m) for m in MODULES}
    pools = {m: fns for m, fns in pools.items() if len(fns) >= CHOICES}
    pairs = [(m, fn) for m, fns in pools.items() for fn in fns]
    rng.shuffle(pairs)
    out = []
    for module_name, (answer, doc) in pairs[:count]:
        distractors = rng.sample([name for name, _ in pools[module_name] if name != answer], CHOICES - 1)
        gold = rng.randrange(CHOICES)
        choices = distractors[:gold] + [answer] + distractors[gold:]
        question = f"Python's {module_name} module has a function documented as: \"{doc}\" Which function is it?"
        out.append({"question": question, "choices": choices, "answer": gold})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("stdlib_mc.jsonl")))
    parser.add_argument("--questions", type=int, default=48)
    args = parser.parse_args()
    lines = [json.dumps(q) for q in questions(args.questions)]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} questions to {args.out}")


if __name__ == "__main__":
    main()
