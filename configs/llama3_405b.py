"""Llama 3.1 405B pretraining (Llama 3 paper recipe) on 14,336 H100 GPUs: tensor 8 x context 2 x pipeline 7 x FSDP 128.

    python -m llama_jax.plan --config configs/llama3_405b.py      # fits: ~36 GiB of 80 GB per GPU
    python -m llama_jax.train --config configs/llama3_405b.py --workdir /shared/runs/llama3_405b

The paper trained on 16,384 H100s as TP 8, CP 1, PP 16, DP 128 with 16 sequences of 8,192 tokens per data-parallel
rank. Here the pipeline's stages must hold equal shares of the 126 layers, so 16 stages are impossible; and our
schedules that combine with tensor parallelism keep every tick's activations (the paper's interleaved 1F1B keeps only
the microbatches in flight; our 1F1B does not combine with mesh.tensor yet). The nearest paper shape, 14 stages x 16
microbatches, plans at 78 GiB a GPU (circular, 3 chunks) or 97 GiB (GPipe), over 80 GB (try
`python -m llama_jax.plan --config configs/llama3_405b.py --config.mesh.stage=14 --config.mesh.context=1
--config.pipeline.microbatches=16 --config.optim.grad_accum=1 --config.pipeline.repeats=3`).
So this layout trades half the pipeline stages for context parallelism, which halves every GPU's tokens:
- tensor 8: within a node, on NVLink (heads, MLP and vocabulary split 8 ways), as in the paper;
- context 2: each sequence split over 2 nodes (zig-zag, for causal load balance);
- stage 7: 18 layers a stage, run as the circular schedule with 6 chunks of 3 layers: bubble 11%;
- fsdp 128: the paper's 128 data-parallel ranks, with parameters, gradients and AdamW moments sharded over them.
Each GPU holds half of 8 sequences per accumulation step; each pipeline microbatch is half of one sequence.
"""

from llama_jax.config import default_config, model_section

# Placeholders to replace: your tokenized pretraining mix, a directory written by
# `python -m llama_jax.data.prepare --tokenizer TOKENIZER ...` (see the README's data section; the paper's mix, about
# 50% general knowledge, 25% math and reasoning, 17% code and 8% multilingual text, is not public), and Meta's
# tiktoken tokenizer (128,256 tokens) from the Llama 3.1 release (original/tokenizer.model). A run with them
# unchanged stops at once with an error naming the missing path.
DATA = "/path/to/prepared/llama3_pretraining_mix"
TOKENIZER = "/path/to/Llama-3.1-405B/original/tokenizer.model"


def get_config():
    cfg = default_config()
    # dim 16384, 126 layers, 128 heads / 8 KV heads, SwiGLU 53248, vocabulary 128,256, RoPE theta 500,000.
    # Full remat keeps only each layer's input: the pipeline holds 54 ticks x 3 layers of them.
    cfg.model = model_section("llama3.1-405b", remat="full")

    cfg.mesh.data = 1
    cfg.mesh.stage = 7
    cfg.mesh.fsdp = 128
    cfg.mesh.context = 2
    cfg.mesh.tensor = 8

    cfg.pipeline.schedule = "circular"
    cfg.pipeline.repeats = 6  # 7 x 6 = 42 chunks of 3 layers
    cfg.pipeline.microbatches = 8  # >= the 7 stages, as the circular schedule needs

    cfg.data.source = DATA
    cfg.data.tokenizer = TOKENIZER
    # 16.8M tokens a step: the paper's final batch size. Its earlier, smaller batches (4M tokens at sequence 4,096,
    # then 8M at 8,192) need a mesh of their own: 1,024 sequences cannot be cut into the 2 x 8 x 128 pieces below.
    cfg.data.seq_len = 8192
    cfg.data.batch_size = 2048
    cfg.optim.grad_accum = 2

    cfg.optim.lr = 8e-5
    cfg.optim.warmup_steps = 8000
    cfg.optim.min_lr_ratio = 0.01  # cosine to 8e-7...
    cfg.train.steps = 1_200_000  # ...over 1.2M steps, as the paper
    cfg.train.log_every = 10
    cfg.train.eval_every = 1000
    cfg.checkpoint.every_steps = 500
    cfg.checkpoint.every_minutes = 30.0  # bounds the work lost to a preemption (or a failed node)
    return cfg
