"""The Llama 3 pretraining recipe (paper section 3.4) as the phases of one run, for any model size and pod.

The paper's recipe, in order:
1. pretraining at 4M tokens a step (sequences of 4,096), doubled to 8M (sequences of 8,192) after 252M tokens and to
   16M after 2.87T tokens; AdamW, 8,000 warmup steps, cosine decay over 1,200,000 steps (405B: 8e-5 to 8e-7);
2. long-context pretraining: the context grows in stages toward 128K tokens (about 800B tokens in all), with the
   llama3 RoPE frequency scaling that Llama 3.1's released configs carry (factor 8 over the 8,192 original context);
3. annealing: the last 40M tokens at 128K context, the learning rate linearly to 0, on a mixture that upsamples
   high-quality sources; the checkpoints saved during it are averaged (Polyak) into the final model.

Each batch-size step of the ramp is a phase of its own (rather than a `data.ramp` entry) because a pod's mesh and
accumulation that fit one batch shape rarely divide the next: `layout(seq_len, batch_size)` gives each phase the
mesh sections that fit it (e.g. a larger context-parallel axis for longer sequences).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import ml_collections

from llama_jax.errors import ConfigError
from llama_jax.phases import phase

Layout = Callable[[int, int], dict]  # (seq_len, global batch) -> section overrides, e.g. {"mesh": {...}}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    seq_len: int
    batch_size: int  # global, in sequences
    tokens: int  # the stage's budget
    long_context: bool = False  # RoPE scaled as for 128K (Llama 3.1) from this stage on
    anneal: bool = False  # learning rate linearly to 0, checkpoints averaged, `anneal_mixture` data


def sequence_layout(*, devices: int, tokens_per_device: int, tensor: int = 1, stage: int = 1, min_context: int = 1,
                    flash_above: int = 8192, pipeline: dict | None = None) -> Layout:
    """The usual pod layout for a recipe: `devices` (per pipeline stage and tensor rank) shared by FSDP and context
    parallelism, each device holding `tokens_per_device` tokens of one sequence per microbatch, so the context axis
    grows with the sequence (at least `min_context`) and gradient accumulation makes up the batch; sequences longer
    than `flash_above` use the block-wise attention."""
    microbatches = (pipeline or {}).get("microbatches", 1)

    def layout(seq_len: int, batch_size: int) -> dict:
        context = max(min_context, seq_len // tokens_per_device)
        fsdp = devices // context
        sections = {"mesh": {"data": 1, "stage": stage, "fsdp": fsdp, "context": context, "tensor": tensor},
                    "optim": {"grad_accum": max(1, batch_size // (microbatches * fsdp))}}
        if pipeline:
            sections["pipeline"] = dict(pipeline)
        if seq_len > flash_above:
            sections["model"] = {"attention": "flash"}
        return sections

    return layout


def llama3_stages(*, total_tokens: int = 15_600_000_000_000, long_context_lengths: Sequence[int] = (16384, 32768, 65536, 131072),
                  long_context_tokens: int = 800_000_000_000, anneal_tokens: int = 40_000_000,
                  ramp_tokens: tuple[int, int] = (252_000_000, 2_870_000_000_000),
                  tokens_per_step: tuple[int, int, int] = (4_194_304, 8_388_608, 16_777_216),
                  seq_lens: tuple[int, int] = (4096, 8192)) -> list[Stage]:
    """The paper's stages; the defaults are its figures (the lengths of its six long-context stages are not published:
    four doublings here, each an equal share of the long-context tokens, each step holding 16M tokens)."""
    short, long = seq_lens
    main_tokens = total_tokens - long_context_tokens - anneal_tokens
    if main_tokens <= ramp_tokens[1]:
        raise ConfigError(f"the recipe's {total_tokens:,} tokens leave its main stage none: the batch ramp takes "
                          f"{ramp_tokens[1]:,}, the long-context stages {long_context_tokens:,} and the annealing "
                          f"{anneal_tokens:,}; raise the budget (configs/llama3_recipe_tiny.py: a larger scale=F)")
    stages = [
        Stage("pretrain", short, tokens_per_step[0] // short, ramp_tokens[0]),
        Stage("pretrain_2x", long, tokens_per_step[1] // long, ramp_tokens[1] - ramp_tokens[0]),
        Stage("pretrain_4x", long, tokens_per_step[2] // long, main_tokens - ramp_tokens[1]),
    ]
    share = long_context_tokens // len(long_context_lengths)
    stages += [Stage(f"long_context_{n // 1024}k" if n >= 1024 else f"long_context_{n}", n, tokens_per_step[2] // n,
                     share, long_context=True) for n in long_context_lengths]
    last = long_context_lengths[-1]
    stages.append(Stage("anneal", last, tokens_per_step[2] // last, anneal_tokens, long_context=True, anneal=True))
    return stages


def apply_llama3_recipe(cfg: ml_collections.ConfigDict, stages: Sequence[Stage], layout: Layout, *,
                        long_context_rope: dict, anneal_mixture: ml_collections.ConfigDict | None = None) -> None:
    """Makes `cfg` run `stages`: the first one through the top-level keys, the others as `cfg.phases`.

    `long_context_rope`: the `model` fields the long-context and annealing stages set (e.g. rope_type="llama3",
    rope_factor=8.0, rope_original_max_len=8192); `anneal_mixture`: the annealing data (None: the run's)."""
    first, *later = stages
    cfg.data.seq_len, cfg.data.batch_size = first.seq_len, first.batch_size
    cfg.train.tokens = first.tokens
    for section, values in layout(first.seq_len, first.batch_size).items():
        for key, value in values.items():
            cfg[section][key] = value
    phases = []
    for stage in later:
        sections = layout(stage.seq_len, stage.batch_size)
        sections["data"] = {**sections.get("data", {}), "seq_len": stage.seq_len, "batch_size": stage.batch_size}
        if stage.long_context:
            sections["model"] = {**sections.get("model", {}), **long_context_rope}
        if stage.anneal:
            steps = -(-stage.tokens // (stage.seq_len * stage.batch_size))
            sections["checkpoint"] = {**sections.get("checkpoint", {}), "every_steps": max(1, steps // 4)}
            if anneal_mixture is not None:
                sections["data"]["mixture"] = anneal_mixture
        phases.append(phase(stage.name, tokens=stage.tokens, lr="anneal" if stage.anneal else "continue",
                            average=stage.anneal, **sections))
    cfg.phases = tuple(phases)


def llama3_pretraining(model: ml_collections.ConfigDict, *, lr: float, data: str, tokenizer: str, layout: Layout,
                       stages: Sequence[Stage] | None = None,
                       anneal_mixture: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A whole Llama 3 pretraining run: `model` (a `model_section` of a Llama 3.1 preset) trained on `data` with
    `tokenizer`, peak learning rate `lr`, on the pod that `layout` describes. Pretraining uses plain RoPE (Llama 3's
    8K context); the long-context and annealing phases switch to the preset's llama3 scaling, so the final model is
    the Llama 3.1 architecture."""
    from llama_jax.config import default_config  # config imports phases; this module is for config files

    cfg = default_config()
    long_context_rope = {key: model[key] for key in ("rope_type", "rope_factor", "rope_low_freq_factor",
                                                     "rope_high_freq_factor", "rope_original_max_len")}
    cfg.model = model
    cfg.model.rope_type = "default"
    cfg.data.source = data
    cfg.data.tokenizer = tokenizer
    cfg.optim.lr = lr
    cfg.optim.warmup_steps = 8000
    cfg.optim.min_lr_ratio = 0.01  # cosine to lr / 100 (405B: 8e-5 to 8e-7)...
    cfg.optim.decay_steps = 1_200_000 - 8000  # ...reached at step 1,200,000
    cfg.train.log_every = 10
    cfg.train.eval_every = 1000
    cfg.checkpoint.every_steps = 500
    cfg.checkpoint.every_minutes = 30.0  # bounds the work lost to a preemption (or a failed node)
    apply_llama3_recipe(cfg, stages or llama3_stages(), layout, long_context_rope=long_context_rope,
                        anneal_mixture=anneal_mixture)
    return cfg
