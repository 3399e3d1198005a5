"""Llama 3.1 405B, the whole Llama 3 pretraining recipe, on 14,336 H100 GPUs: pipeline 7 x tensor 8 x 256 GPUs shared
by FSDP and context parallelism, the context axis growing with the sequence.

    python -m llama_jax.plan --config configs/llama3_405b.py      # every phase, and whether it fits
    python -m llama_jax.train --config configs/llama3_405b.py --workdir gs://BUCKET/runs/llama3_405b

The recipe (llama_jax/recipe.py): 4M-token steps of 4,096-token sequences, 8M of 8,192 after 252M tokens, 16M after
2.87T; long-context stages at 16K, 32K, 64K and 128K tokens (800B tokens); 40M tokens of annealing to a learning rate
of 0, whose checkpoints are averaged. Peak learning rate 8e-5, 8,000 warmup steps, cosine to 8e-7 at step 1.2M.

The paper trained on 16,384 H100s as TP 8, CP 1, PP 16, DP 128. Here the pipeline's stages must hold equal shares of
the 126 layers, so 16 stages are impossible; 7 stages of 18 layers run as the circular schedule (6 chunks of 3 layers,
bubble 11%). Tensor 8 stays within a node, on NVLink. The other 256 GPUs of each stage-and-tensor group split the batch
(fsdp) and the sequence (context): each GPU holds 4,096 tokens of one sequence per microbatch, so the context axis
grows with the sequence, from 2 (8K) to 32 (128K), and sequences longer than 8K use the block-wise (flash)
attention, which never holds a whole sequence's scores (the 128K phases plan at 44 GiB a GPU; with the dense
attention, 188 GiB).
"""

from llama_jax.config import model_section
from llama_jax.recipe import llama3_pretraining, sequence_layout

# Placeholders to replace: your tokenized pretraining mix, a directory written by
# `python -m llama_jax.data.prepare --tokenizer TOKENIZER ...` (see the README's data section; the paper's mix, about
# 50% general knowledge, 25% math and reasoning, 17% code and 8% multilingual text, is not public), and Meta's
# tiktoken tokenizer (128,256 tokens) from the Llama 3.1 release (original/tokenizer.model). A run with them
# unchanged stops at once with an error naming the missing path.
DATA = "/path/to/prepared/llama3_pretraining_mix"
TOKENIZER = "/path/to/Llama-3.1-405B/original/tokenizer.model"


def get_config():
    # dim 16384, 126 layers, 128 heads / 8 KV heads, SwiGLU 53248, vocabulary 128,256, RoPE theta 500,000.
    # Full remat keeps only each layer's input: the pipeline holds 54 ticks x 3 layers of them.
    model = model_section("llama3.1-405b", remat="full")
    # 7 stages x tensor 8 x 256: 4,096 tokens of a sequence per GPU per microbatch (2,048 at sequence 4,096, where the
    # context axis stays 2), 8 pipeline microbatches of 6 chunks a stage.
    layout = sequence_layout(devices=256, tensor=8, stage=7, min_context=2, tokens_per_device=4096,
                             pipeline={"schedule": "circular", "repeats": 6, "microbatches": 8})
    return llama3_pretraining(model, lr=8e-5, data=DATA, tokenizer=TOKENIZER, layout=layout)
