"""Llama 3.1 70B pretraining (Llama 3 paper recipe) on 1,024 H100 GPUs: tensor parallel 8 within each node, FSDP 128.

    python -m llama_jax.plan --config configs/llama3_70b.py      # fits: ~43 GiB of 80 GB per GPU
    python -m llama_jax.train --config configs/llama3_70b.py --workdir /shared/runs/llama3_70b

128 nodes of 8 H100s. Tensor parallelism stays inside a node, on NVLink, as in the paper: it splits heads, the MLP and
the vocabulary 8 ways, and with them the activations that dominate memory (one sequence's attention scores). FSDP
over the 128 nodes splits the parameters, gradients and AdamW moments (16 bytes a parameter, 1.1 TB in all) to about
1.3 GiB a GPU. Each GPU sees 8 sequences a step, one per microbatch (grad_accum 8).
"""

from llama_jax.config import default_config, model_section

# Placeholders to replace: your tokenized pretraining mix, a directory written by
# `python -m llama_jax.data.prepare --tokenizer TOKENIZER ...` (see the README's data section; the paper's mix, about
# 50% general knowledge, 25% math and reasoning, 17% code and 8% multilingual text, is not public), and Meta's
# tiktoken tokenizer (128,256 tokens) from the Llama 3.1 release (original/tokenizer.model). A run with them
# unchanged stops at once with an error naming the missing path.
DATA = "/path/to/prepared/llama3_pretraining_mix"
TOKENIZER = "/path/to/Llama-3.1-70B/original/tokenizer.model"


def get_config():
    cfg = default_config()
    # dim 8192, 80 layers, 64 heads / 8 KV heads, SwiGLU 28672, vocabulary 128,256, RoPE theta 500,000 (llama3 scaling).
    cfg.model = model_section("llama3.1-70b", remat="dots_no_batch")

    cfg.mesh.data = 1
    cfg.mesh.stage = 1
    cfg.mesh.fsdp = 128  # across the 128 nodes
    cfg.mesh.context = 1
    cfg.mesh.tensor = 8  # within a node: the 8 GPUs on NVLink

    cfg.data.source = DATA
    cfg.data.tokenizer = TOKENIZER
    cfg.data.seq_len = 8192
    cfg.data.batch_size = 1024  # 8.4M tokens a step: 8 sequences per FSDP shard...
    cfg.optim.grad_accum = 8  # ...one at a time

    cfg.optim.lr = 1.5e-4
    cfg.optim.warmup_steps = 8000
    cfg.optim.min_lr_ratio = 0.01  # cosine to lr / 100, as the paper's 405B schedule (8e-5 to 8e-7)
    cfg.train.steps = 1_800_000  # about 15T tokens, the Llama 3 pretraining budget
    cfg.train.log_every = 10
    cfg.train.eval_every = 1000
    cfg.checkpoint.every_steps = 1000
    cfg.checkpoint.every_minutes = 30.0  # bounds the work lost to a preemption
    return cfg
