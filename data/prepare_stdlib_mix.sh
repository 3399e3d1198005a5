#!/usr/bin/env bash
# Prepares the built-in mixture of configs/stdlib_mix.py as shards in DIR (default /tmp/stdlib_mix):
# a BPE tokenizer trained on the three texts, then one prepared directory per source.
#   bash data/prepare_stdlib_mix.sh DIR && python -m llama_jax.train --config configs/stdlib_mix.py:DIR
set -euo pipefail
out=${1:-/tmp/stdlib_mix}
vocab=${VOCAB:-8192}
mkdir -p "$out"
python - "$out/tokenizer.model" "$vocab" <<'PY'
import sys

from llama_jax.data import documents
from llama_jax.data.recipes import STDLIB_MIX
from llama_jax.data.tokenizer import train_bpe

texts = [text for source in STDLIB_MIX for text in documents.read_documents(source)]
train_bpe(texts, int(sys.argv[2]), sys.argv[1])
print(f"trained a {sys.argv[2]}-token tokenizer on {len(texts):,} documents: {sys.argv[1]}")
PY
for source in pydoc_topics stdlib_docstrings stdlib; do
  python -m llama_jax.data.prepare --source "$source" --tokenizer "$out/tokenizer.model" --out "$out/$source" --dedup
done
