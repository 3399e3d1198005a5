"""Llama 3.1 8B pretraining (Llama 3 paper recipe) on a TPU v5p-512 slice: 256 chips, FSDP over all of them.

    python -m llama_jax.plan --config configs/llama3_8b.py --accelerator v5p     # fits: ~61 GiB of 95 GiB per chip
    python -m llama_jax.train --config configs/llama3_8b.py --workdir gs://BUCKET/runs/llama3_8b

v5p slice names count TensorCores, two per chip: v5p-512 is 256 chips (64 hosts of 4), and JAX sees 256 devices.
An 8B model's parameters, gradients and AdamW moments (16 bytes a parameter, 128 GB in all) are 0.6 GiB a chip when
FSDP splits them 256 ways, so no tensor parallelism is needed; the activations decide the rest. The attention
implementations materialise each head's [8192, 8192] scores, so one sequence's attention backward alone takes about
39 GiB: hence one sequence per chip per microbatch (grad_accum 4). On v6e chips (32 GiB) the plan says this does not
fit; there split the heads too (19 GiB): --config.mesh.fsdp=64 --config.mesh.tensor=4 --config.optim.grad_accum=16.
"""

from llama_jax.config import default_config, model_section

# Placeholders to replace: your tokenized pretraining mix, a directory written by
# `python -m llama_jax.data.prepare --tokenizer TOKENIZER ...` (see the README's data section; the paper's mix, about
# 50% general knowledge, 25% math and reasoning, 17% code and 8% multilingual text, is not public), and Meta's
# tiktoken tokenizer (128,256 tokens) from the Llama 3.1 release (original/tokenizer.model). A run with them
# unchanged stops at once with an error naming the missing path.
DATA = "/path/to/prepared/llama3_pretraining_mix"
TOKENIZER = "/path/to/Llama-3.1-8B/original/tokenizer.model"


def get_config():
    cfg = default_config()
    # dim 4096, 32 layers, 32 heads / 8 KV heads, SwiGLU 14336, vocabulary 128,256, RoPE theta 500,000 (llama3 scaling).
    # dots_no_batch keeps every projection's output and recomputes only attention and the elementwise ops.
    cfg.model = model_section("llama3.1-8b", remat="dots_no_batch")

    cfg.mesh.data = 1
    cfg.mesh.stage = 1
    cfg.mesh.fsdp = 256  # all 256 chips: parameters, gradients and optimizer state split 256 ways
    cfg.mesh.context = 1
    cfg.mesh.tensor = 1

    cfg.data.source = DATA
    cfg.data.tokenizer = TOKENIZER
    cfg.data.seq_len = 8192
    cfg.data.batch_size = 1024  # 8.4M tokens a step: 4 sequences a chip...
    cfg.optim.grad_accum = 4  # ...one at a time

    cfg.optim.lr = 3e-4
    cfg.optim.warmup_steps = 8000
    cfg.optim.min_lr_ratio = 0.01  # cosine to lr / 100, as the paper's 405B schedule (8e-5 to 8e-7)
    cfg.train.steps = 1_800_000  # about 15T tokens, the Llama 3 pretraining budget
    cfg.train.log_every = 10
    cfg.train.eval_every = 1000
    cfg.checkpoint.every_steps = 1000
    cfg.checkpoint.every_minutes = 30.0  # bounds the work lost to a preemption
    return cfg
