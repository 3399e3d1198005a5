"""Real text that every Python installation has, for building tokenizers inside the tests."""

import sysconfig
from pathlib import Path


def stdlib_sources(skip: int, limit_chars: int) -> list[str]:
    """The standard library's top-level .py files in sorted order from the `skip`-th, until `limit_chars` is reached."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip:]:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size >= limit_chars:
            break
    return texts
