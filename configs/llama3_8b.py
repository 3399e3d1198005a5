"""Llama 3.1 8B, the whole Llama 3 pretraining recipe, on a TPU v5p-512 slice: 256 chips, FSDP over all of them.

    python -m llama_jax.plan --config configs/llama3_8b.py --accelerator v5p     # every phase, and whether it fits
    python -m llama_jax.train --config configs/llama3_8b.py --workdir gs://BUCKET/runs/llama3_8b

The recipe (llama_jax/recipe.py) as for 405B: 4M-token steps of 4,096-token sequences, 8M of 8,192 after 252M tokens,
16M after 2.87T; long-context stages at 16K, 32K, 64K and 128K tokens (800B tokens); 40M tokens of annealing to a
learning rate of 0, whose checkpoints are averaged. Peak learning rate 3e-4 (the paper gives only the 405B's), 8,000
warmup steps, cosine to lr / 100 at step 1.2M.

v5p slice names count TensorCores, two per chip: v5p-512 is 256 chips (64 hosts of 4), and JAX sees 256 devices.
An 8B model's parameters, gradients and AdamW moments (16 bytes a parameter, 128 GB in all) are 0.5 GiB a chip when
FSDP splits them 256 ways, so no tensor parallelism is needed; the activations decide the rest: each chip holds one
sequence of up to 8,192 tokens per microbatch (gradient accumulation makes up the batch), and longer sequences are
split over a context-parallel axis and use the block-wise (flash) attention, which never holds a whole sequence's
scores.
"""

from llama_jax.config import model_section
from llama_jax.recipe import llama3_pretraining, sequence_layout

# Placeholders to replace: your tokenized pretraining mix, a directory written by
# `python -m llama_jax.data.prepare --tokenizer TOKENIZER ...` (see the README's data section; the paper's mix, about
# 50% general knowledge, 25% math and reasoning, 17% code and 8% multilingual text, is not public), and Meta's
# tiktoken tokenizer (128,256 tokens) from the Llama 3.1 release (original/tokenizer.model). A run with them
# unchanged stops at once with an error naming the missing path.
DATA = "/path/to/prepared/llama3_pretraining_mix"
TOKENIZER = "/path/to/Llama-3.1-8B/original/tokenizer.model"


def get_config():
    # dim 4096, 32 layers, 32 heads / 8 KV heads, SwiGLU 14336, vocabulary 128,256, RoPE theta 500,000.
    # dots_no_batch keeps every projection's output and recomputes only attention and the elementwise ops.
    model = model_section("llama3.1-8b", remat="dots_no_batch")
    # 256 chips; one sequence of up to 8,192 tokens per chip per microbatch.
    layout = sequence_layout(devices=256, tokens_per_device=8192)
    return llama3_pretraining(model, lr=3e-4, data=DATA, tokenizer=TOKENIZER, layout=layout)
