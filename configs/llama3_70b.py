"""Llama 3.1 70B, the whole Llama 3 pretraining recipe, on 1,024 H100 GPUs: tensor parallel 8 within each node, the
128 nodes shared by FSDP and context parallelism.

    python -m llama_jax.plan --config configs/llama3_70b.py      # every phase, and whether it fits
    python -m llama_jax.train --config configs/llama3_70b.py --workdir /shared/runs/llama3_70b

The recipe (llama_jax/recipe.py) as for 405B: 4M-token steps of 4,096-token sequences, 8M of 8,192 after 252M tokens,
16M after 2.87T; long-context stages at 16K, 32K, 64K and 128K tokens (800B tokens); 40M tokens of annealing to a
learning rate of 0, whose checkpoints are averaged. Peak learning rate 1.5e-4 (the paper gives only the 405B's), 8,000
warmup steps, cosine to lr / 100 at step 1.2M.

Tensor parallelism stays inside a node, on NVLink, as in the paper: it splits heads, the MLP and the vocabulary 8 ways,
and with them the activations. FSDP over the nodes splits the parameters, gradients and AdamW moments (16 bytes a
parameter, 1.1 TB in all). Each GPU holds 8,192 tokens of one sequence per microbatch (gradient accumulation makes up
the batch); longer sequences are split over a context-parallel axis of nodes and use the block-wise (flash) attention.
"""

from llama_jax.config import model_section
from llama_jax.recipe import llama3_pretraining, sequence_layout

# Placeholders to replace: your tokenized pretraining mix, a directory written by
# `python -m llama_jax.data.prepare --tokenizer TOKENIZER ...` (see the README's data section; the paper's mix, about
# 50% general knowledge, 25% math and reasoning, 17% code and 8% multilingual text, is not public), and Meta's
# tiktoken tokenizer (128,256 tokens) from the Llama 3.1 release (original/tokenizer.model). A run with them
# unchanged stops at once with an error naming the missing path.
DATA = "/path/to/prepared/llama3_pretraining_mix"
TOKENIZER = "/path/to/Llama-3.1-70B/original/tokenizer.model"


def get_config():
    # dim 8192, 80 layers, 64 heads / 8 KV heads, SwiGLU 28672, vocabulary 128,256, RoPE theta 500,000.
    model = model_section("llama3.1-70b", remat="dots_no_batch")
    # 128 nodes of 8 GPUs: tensor 8 within a node; 8,192 tokens of a sequence per GPU per microbatch.
    layout = sequence_layout(devices=128, tensor=8, tokens_per_device=8192)
    return llama3_pretraining(model, lr=1.5e-4, data=DATA, tokenizer=TOKENIZER, layout=layout)
