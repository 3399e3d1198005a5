"""A tiny base checkpoint for the post-training tests: a random "debug"-preset Llama (float32) saved as a Hugging Face
directory with a BPE tokenizer trained on two stdlib files (it has Llama 3's chat tokens), built in well under a
second with no download."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from flax import nnx

from llama_jax.config import model_section
from llama_jax.convert import save_hf
from llama_jax.data.tokenizer import train_bpe
from llama_jax.model import ModelDef
from llama_jax.model.config import LlamaConfig

VOCAB = 1024


def tiny_base(path: Path, seed: int = 0) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tokenizer = train_bpe([(stdlib / name).read_text() for name in ("textwrap.py", "shlex.py")], VOCAB,
                          path / "tokenizer.model")
    cfg = LlamaConfig(**model_section("debug", vocab_size=VOCAB, dtype="float32", max_seq_len=256).to_dict())
    with nnx.use_eager_sharding(False):
        model = ModelDef(cfg).merge(ModelDef(cfg).init(seed))
    save_hf(model, path, tokenizer=tokenizer)
    return path
