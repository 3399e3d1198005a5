"""Data mixtures as recipes: named shares over sources the user supplies.

Kept in the package (not in a config file) so that every config can import them; `data/` at the top level holds
the scripts that prepare the sources a recipe names.
"""

from __future__ import annotations

import ml_collections
from etils import epath

from llama_jax.config import mixture_source
from llama_jax.errors import ConfigError

# The Llama 3 paper's final pretraining mix (section 3.1.2): "roughly 50% of tokens corresponding to general
# knowledge, 25% of mathematical and reasoning tokens, 17% code tokens, and 8% multilingual tokens".
LLAMA3_MIX = {"general": 0.50, "math_reasoning": 0.25, "code": 0.17, "multilingual": 0.08}

# Text every Python installation has: code, the docstrings written about it, and the prose of the documentation
# topics (pydoc_data). The shares echo Llama 3's prose-heavy mix on what exists here.
STDLIB_MIX = {"pydoc_topics": 0.25, "stdlib_docstrings": 0.35, "stdlib": 0.40}


def llama3_mixture(*, general: str, math_reasoning: str, code: str, multilingual: str,
                   text_field: str = "text") -> ml_collections.ConfigDict:
    """`data.mixture` for the Llama 3 shares over the four sources given (paths, globs or prepared directories)."""
    sources = {"general": general, "math_reasoning": math_reasoning, "code": code, "multilingual": multilingual}
    return ml_collections.ConfigDict(
        {name: mixture_source(sources[name], weight, text_field) for name, weight in LLAMA3_MIX.items()}
    )


def stdlib_mixture(prepared_dir: str = "") -> ml_collections.ConfigDict:
    """`data.mixture` over the built-in sources (runs anywhere, with no download), read as raw text or, given
    `prepared_dir`, from the prepared shards in prepared_dir/<source name> (see data/prepare_stdlib_mix.sh)."""
    if prepared_dir and not epath.Path(prepared_dir).is_dir():
        raise ConfigError(f"{prepared_dir} is not a directory of prepared shards: make it first with "
                          f"`bash data/prepare_stdlib_mix.sh {prepared_dir}`")
    return ml_collections.ConfigDict({
        name: mixture_source(f"{prepared_dir}/{name}" if prepared_dir else name, weight)
        for name, weight in STDLIB_MIX.items()
    })
