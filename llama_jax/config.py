"""The experiment schema: every key a config file may set, its default, and validation.

Config files in configs/ are Python: `get_config()` returns a ConfigDict, usually `default_config()` with some
keys changed. `validate(cfg)` compares a config against this schema and raises ConfigError naming the key
and the fix, so mistakes stop the run before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import importlib.util

import ml_collections

from llama_jax.data.schedule import BatchSchedule, Stage
from llama_jax import optim
from llama_jax.errors import ConfigError
from llama_jax.model.config import PALLAS_ATTENTION, LlamaConfig
from llama_jax.model.presets import preset
from llama_jax.phases import check_phases

OBJECTIVES = ("lm", "sft", "reward", "dpo")
STABILITY_POLICIES = ("rollback", "skip", "stop")
SCHEDULE_UNITS = ("steps", "tokens")
PAIR_OBJECTIVES = ("reward", "dpo")  # trained on (chosen, rejected) pairs
PIPELINE_SCHEDULES = ("gpipe", "circular", "1f1b", "zb-h1")
SCHEDULED_PIPELINES = ("1f1b", "zb-h1")  # backward units placed by a table, not by autodiff of the forward
MAX_SHUFFLE_WINDOW = 2**20  # rows: a window of 1M rows of 8K tokens spreads a document over 8.6B tokens


def model_section(name: str, **overrides) -> ml_collections.ConfigDict:
    """The `model` section for a preset (see model/presets.py), with fields overridden."""
    return ml_collections.ConfigDict(dataclasses.asdict(preset(name, **overrides)))


def pretrained_model_section(path: str, **overrides) -> ml_collections.ConfigDict:
    """The `model` section of a checkpoint that `checkpoint.init_from` starts a run from: a Hugging Face directory
    (its config.json) or a llama_jax workdir or step (its saved config), fields overridden.

    Compute settings keep the training defaults (float32 parameters, bfloat16 compute) unless overridden.
    """
    defaults = LlamaConfig()
    runtime = {"dtype": defaults.dtype, "param_dtype": defaults.param_dtype, **overrides}
    if _is_hugging_face(path):
        from llama_jax.convert import read_hf_config  # the imports are here, so that loading a config stays cheap

        return ml_collections.ConfigDict(dataclasses.asdict(read_hf_config(path, **runtime)))
    from llama_jax.checkpoint import SavedRun

    return ml_collections.ConfigDict(dataclasses.asdict(SavedRun.open(path).model_config.replace(**runtime)))


def pretrained_tokenizer(path: str) -> str:
    """The tokenizer (`data.tokenizer`) a checkpoint was trained with: a Hugging Face directory holds its own; a
    llama_jax run keeps a copy in its workdir."""
    if _is_hugging_face(path):
        return path
    from llama_jax.checkpoint import SavedRun

    return str(SavedRun.open(path).tokenizer)


def _is_hugging_face(path: str) -> bool:
    """A directory with config.json, or a path that does not exist (reading it then says what is missing). The path
    may be a URL (gs://...), as `checkpoint.init_from` may."""
    from llama_jax.workdir import as_path

    directory = as_path(path)
    return (directory / "config.json").is_file() or not directory.exists()


def mixture_source(source: str, weight: float, text_field: str = "text") -> ml_collections.ConfigDict:
    """One entry of `data.mixture`: where its documents are (as `data.source`) and its share of the rows."""
    return ml_collections.ConfigDict({"source": source, "weight": float(weight), "text_field": text_field})


def eval_source(source: str, text_field: str = "text") -> ml_collections.ConfigDict:
    """An entry of `cfg.data.eval_sources`: a source (as `data.source` takes) that is evaluated, never trained on."""
    return ml_collections.ConfigDict({"source": source, "text_field": text_field})


def default_config() -> ml_collections.ConfigDict:
    """All keys with their defaults: a small model on the embedded Python-stdlib corpus, on CPU."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0  # every random key (init, data order) derives from this

    cfg.model = model_section("tiny")  # all fields of llama_jax.model.LlamaConfig

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = -1  # data parallel (replicated params); -1 = the devices left over
    cfg.mesh.stage = 1  # pipeline stages
    cfg.mesh.fsdp = 1  # parameters and optimizer state sharded, batch split too
    cfg.mesh.context = 1  # sequence split (context parallel)
    cfg.mesh.tensor = 1  # heads / mlp / vocab split (tensor parallel)

    cfg.pipeline = ml_collections.ConfigDict()  # used when mesh.stage > 1 (see llama_jax/parallel/pipeline.py)
    cfg.pipeline.microbatches = 0  # microbatches each (accumulation) batch is cut into; 0 = 2 x mesh.stage
    # gpipe | circular (interleaved: pipeline.repeats layer chunks per stage) | 1f1b (at most mesh.stage microbatches'
    # activations kept, not all) | zb-h1 (1f1b with the weight gradients deferred into the bubble)
    cfg.pipeline.schedule = "gpipe"
    cfg.pipeline.repeats = 2  # circular only: chunks per stage; the bubble shrinks by this factor

    cfg.data = ml_collections.ConfigDict()
    # One source: "stdlib" (the Python standard library's sources), "stdlib_docstrings", "pydoc_topics", a local or
    # remote (gs://...) path or glob of .txt/.md/.py/.rst/.jsonl/.parquet files, or a directory written by
    # `python -m llama_jax.data.prepare`. Ignored when data.mixture is set.
    cfg.data.source = "stdlib"
    cfg.data.text_field = "text"  # the .jsonl field / Parquet column that holds each document's text
    # Weighted sources, by name: cfg.data.mixture.code = mixture_source("stdlib", weight=0.17). Empty = data.source.
    cfg.data.mixture = ml_collections.ConfigDict()
    cfg.data.tokenizer = ""  # tokenizer file (tokenizer.model / *.model / tokenizer.json); "" = train one on the corpus
    cfg.data.cache_dir = "~/.cache/llama_jax"  # tokenized corpora and trained tokenizers
    cfg.data.batch_size = 16  # global batch, in sequences
    cfg.data.seq_len = 256  # tokens per sequence
    # Later stages as (tokens_seen, batch_size, seq_len): each starts at the first step that has seen that many
    # tokens. Llama 3: batch_size 1024, seq_len 4096, then ((252_000_000, 1024, 8192), (2_870_000_000_000, 2048, 8192)).
    cfg.data.ramp = ()
    cfg.data.shuffle_window = 4096  # rows shuffled together, so that a long document's rows spread over batches
    cfg.data.eval_batches = 8  # batches in the fixed held-out evaluation set
    # Held-out sets besides the training sources' own, by name: cfg.data.eval_sources.wiki = eval_source(PATH), logged
    # as eval_loss/wiki at each evaluation (outside eval_loss). Every document of raw text counts, every token scored;
    # of a prepared directory, its eval split (chat: the assistant's tokens; preference pairs, in DPO and reward runs,
    # as the training pairs are scored).
    cfg.data.eval_sources = ml_collections.ConfigDict()

    cfg.optim = ml_collections.ConfigDict()
    cfg.optim.lr = 3e-3  # peak learning rate
    cfg.optim.schedule = "cosine"  # after the warmup: cosine | linear | constant | wsd (warmup-stable-decay)
    cfg.optim.min_lr_ratio = 0.1  # cosine, linear and wsd decay to lr * min_lr_ratio
    cfg.optim.warmup_steps = 50  # linear warmup from 0
    cfg.optim.decay_steps = 0  # length of the schedule after warmup; 0 = until the run's end (or its annealing phase)
    # "tokens": warmup_tokens and decay_tokens replace warmup_steps and decay_steps, so that a batch-size ramp keeps
    # the schedule's shape in tokens trained on (the learning rate at a given token count does not depend on the ramp)
    cfg.optim.schedule_unit = "steps"
    cfg.optim.warmup_tokens = 0
    cfg.optim.decay_tokens = 0  # 0 = until the run's end (or its annealing phase)
    cfg.optim.wsd_decay_fraction = 0.2  # wsd: the last fraction of decay_steps decays linearly; before it, lr stays
    cfg.optim.b1 = 0.9
    cfg.optim.b2 = 0.95
    cfg.optim.eps = 1e-8
    cfg.optim.weight_decay = 0.1  # decoupled (AdamW); not applied to norm scales
    cfg.optim.decay_embeddings = True  # weight decay on the embedding and output tables too
    cfg.optim.state_dtype = "float32"  # AdamW's moments: float32 | bfloat16 (half the memory; updates computed in f32)
    cfg.optim.grad_clip = 1.0  # global-norm clipping; 0 = off
    cfg.optim.grad_accum = 1  # microbatches per step (the batch is split, the gradient is exact)

    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 600  # the first phase's budget (see cfg.phases for the later ones)...
    cfg.train.tokens = 0  # ...or this many tokens instead, when set
    cfg.train.log_every = 10
    cfg.train.eval_every = 100  # 0 = only at the end (of each phase)
    # Multiple-choice tasks scored at each evaluation (llama_jax/evaluate.py), comma-separated: built-in names
    # ("stdlib_mc") or JSON Lines files; logged as <task>/acc, <task>/acc_norm, <task>/nll_norm, ...
    cfg.train.eval_tasks = ""
    # MFU's denominator, FLOP/s per device; 0 = the published dense bf16 peak of the accelerator, or on a CPU a matmul
    # rate measured once per workdir and kept in WORKDIR/peak_flops.json (so a resumed run is measured against it)
    cfg.train.peak_flops = 0.0
    # Compiled steps are kept here and loaded by any later process that compiles the same program (a restart after
    # preemption or a crash, a rerun, another run of the same shapes), so it skips XLA's compilation; a gs:// path
    # serves every host of a pod (process 0 writes). "" = off; JAX_COMPILATION_CACHE_DIR, when set, is used instead.
    cfg.train.compilation_cache_dir = "~/.cache/llama_jax/xla"
    # A jax.profiler trace of this many steps (0 = none) into WORKDIR/profile, for TensorBoard's profile plugin (and
    # ui.perfetto.dev), starting after the first profile_skip steps of the process (the first compiles the step, the
    # second is the first to reuse its memory); in each phase of a multi-phase run (WORKDIR/profile/<phase>); see
    # llama_jax/profiling.py
    cfg.train.profile_steps = 0
    cfg.train.profile_skip = 2
    # Weights & Biases: "PROJECT" or "ENTITY/PROJECT" to log every metrics line there too (process 0; needs `pip
    # install wandb` and a login, or WANDB_MODE=offline); "" = off. Restarts continue the same W&B run
    # (its id is kept in WORKDIR/wandb.json)
    cfg.train.wandb = ""

    cfg.checkpoint = ml_collections.ConfigDict()
    cfg.checkpoint.every_steps = 200  # a checkpoint is also always written at the last step
    cfg.checkpoint.every_minutes = 0.0  # also save when this much wall-clock time passed since the last save; 0 = off
    cfg.checkpoint.max_to_keep = 2  # the newest checkpoints kept...
    cfg.checkpoint.keep_every = 0  # ...plus every step divisible by this (a sparse history); 0 = none
    cfg.checkpoint.async_save = True
    # GCE host-maintenance notices count as preemption (save, exit 75): "auto" = watch the metadata server on Compute
    # Engine VMs (TPU and GPU VMs are stopped for maintenance), "" = never, or the URL of a maintenance-event key
    cfg.checkpoint.maintenance_url = "auto"
    cfg.checkpoint.init_from = ""  # weights that start a new run (fine-tuning): a HF directory or a llama_jax workdir/step

    cfg.objective = ml_collections.ConfigDict()
    cfg.objective.name = "lm"  # lm | sft | reward | dpo
    # Positions per row whose float32 logits exist at a time (the loss's chunks, recomputed in the backward pass);
    # 0 = all at once. Must divide every data.seq_len longer than it.
    cfg.objective.loss_chunk_len = 1024
    cfg.objective.z_loss = 0.0  # coefficient of log(Z)^2 per token (PaLM used 1e-4); in the training loss, not eval_loss
    # Post-training (sft, reward, dpo) starts from checkpoint.init_from. sft trains on chat data (prepare --chat);
    # reward and dpo on preference pairs (python -m llama_jax.data.preferences). Llama 3: optim.lr = 1e-5.
    cfg.objective.dpo_beta = 0.1  # DPO's beta: how far the policy may move from the reference (Llama 3: 0.1)
    cfg.objective.dpo_nll = 0.2  # coefficient of the chosen responses' NLL per token added to DPO (Llama 3: 0.2)

    # LoRA (llama_jax/lora.py): low-rank adapters on a frozen checkpoint.init_from; only they train and are saved.
    cfg.lora = ml_collections.ConfigDict()
    cfg.lora.rank = 0  # adapters' rank; 0 = off (every parameter trains)
    cfg.lora.alpha = 16.0  # the adapters' product A·B is scaled by alpha / rank
    cfg.lora.dropout = 0.0  # dropout rate on the adapters' input in training steps (not with objective "dpo")
    cfg.lora.targets = "wq,wk,wv,wo,w_gate,w_up,w_down"  # the projections that get adapters, comma-separated
    cfg.lora.base_dtype = "float32"  # the frozen base in memory: float32 | bfloat16 (half the memory)

    # A hung process (no step finished for this long) prints every thread's stack and exits 76, for a supervisor to
    # restart it (llama_jax/watchdog.py). 0 in either key turns the watchdog off.
    cfg.watchdog = ml_collections.ConfigDict()
    cfg.watchdog.multiple = 10.0  # the limit is this many median step times (evaluations and saves included)...
    cfg.watchdog.min_seconds = 300.0  # ...and never less than this

    # What a step with a non-finite loss or gradient norm, or a loss spike, does (llama_jax/stability.py):
    # "rollback": reload the newest checkpoint and go on with the batches after the bad one (they are skipped);
    # "skip": that step's update is not applied (decided inside the step; costs a select over the update);
    # "stop": end the run before it saves the bad state. Either way it is logged, and counted in metrics.jsonl.
    cfg.stability = ml_collections.ConfigDict()
    cfg.stability.policy = "rollback"
    cfg.stability.spike_factor = 0.0  # a loss above this x the median of the last `window` losses is a spike; 0 = off
    cfg.stability.window = 100  # steps in that median (spikes are looked for once it is full)
    cfg.stability.max_events = 5  # more bad steps than this in one process (or in a row, with "skip") stop the run

    # Later phases of the run (long-context extension, annealing, ...): llama_jax.phases.phase(...) entries, in order.
    cfg.phases = ()
    return cfg


def _check_wandb(project: str) -> None:
    """Before any work: the run would otherwise stop at its first log line, after preparing data and compiling."""
    if not project:
        return
    if project.count("/") > 1 or not all(project.split("/")):
        raise ConfigError(f"train.wandb={project!r} is not a W&B project: give PROJECT or ENTITY/PROJECT")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb={project!r} needs the wandb package: pip install wandb (or set "
                          "train.wandb='')")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for unknown keys, wrong types and impossible combinations."""
    _check_against_schema(cfg, default_config(), prefix="")
    model_config(cfg)  # LlamaConfig checks shapes, head divisibility and names
    if cfg.pipeline.schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(f"pipeline.schedule={cfg.pipeline.schedule!r} is not one of {PIPELINE_SCHEDULES}")
    if cfg.pipeline.microbatches < 0 or cfg.pipeline.repeats < 1:
        raise ConfigError("pipeline.microbatches must be >= 0 (0 = 2 x mesh.stage) and pipeline.repeats >= 1")
    _check_mesh_fits_model(cfg)
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.seq_len": cfg.data.seq_len,
        "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "stability.window": cfg.stability.window,
        "optim.grad_accum": cfg.optim.grad_accum,
        "data.eval_batches": cfg.data.eval_batches,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not cfg.data.mixture and not cfg.data.source.strip():
        raise ConfigError("data.source is empty: give a path, glob, prepared directory or built-in name (the default "
                          "is stdlib; a directory is read whole, so for this one write '.')")
    if not 0 < cfg.data.shuffle_window <= MAX_SHUFFLE_WINDOW:
        raise ConfigError(f"data.shuffle_window must be from 1 to {MAX_SHUFFLE_WINDOW:,} rows (a window's order is "
                          f"held in memory, 8 bytes a row, several at once), got {cfg.data.shuffle_window:,}")
    _check_wandb(cfg.train.wandb)
    if "://" in cfg.data.cache_dir:  # as a path it would name a local directory called gs: in the working directory
        raise ConfigError(f"data.cache_dir={cfg.data.cache_dir!r} is a URL, but the tokenized cache is read as local "
                          "files: give a local directory (default ~/.cache/llama_jax); sources and the workdir may be "
                          "gs:// URLs")
    for index, stage in enumerate(batch_schedule(cfg).stages):
        _check_stage(cfg, "data.batch_size / data.seq_len" if index == 0 else f"data.ramp[{index - 1}]", stage)
    non_negative = {
        "seed": cfg.seed,  # numpy's generators, which order the data, take no negative seed
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
        "checkpoint.keep_every": cfg.checkpoint.keep_every,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.decay_steps": cfg.optim.decay_steps,
        "objective.loss_chunk_len": cfg.objective.loss_chunk_len,
        "objective.z_loss": cfg.objective.z_loss,
        "watchdog.multiple": cfg.watchdog.multiple,
        "watchdog.min_seconds": cfg.watchdog.min_seconds,
        "train.tokens": cfg.train.tokens,
        "train.peak_flops": cfg.train.peak_flops,
        "train.profile_steps": cfg.train.profile_steps,
        "train.profile_skip": cfg.train.profile_skip,
        "optim.warmup_tokens": cfg.optim.warmup_tokens,
        "optim.decay_tokens": cfg.optim.decay_tokens,
        "stability.spike_factor": cfg.stability.spike_factor,
        "stability.max_events": cfg.stability.max_events,
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be zero or positive, got {value}")
    optim.check_choices(cfg.optim)
    if cfg.optim.eps <= 0:
        raise ConfigError(f"optim.eps={cfg.optim.eps} must be positive: Adam divides by sqrt(v) + eps, and v is 0 "
                          "where a gradient has always been 0 (an embedding row no batch has used), so eps 0 makes "
                          "those parameters NaN (the usual value: 1e-8)")
    for key in ("b1", "b2"):
        if not 0 <= cfg.optim[key] < 1:
            raise ConfigError(f"optim.{key}={cfg.optim[key]} must be in [0, 1): it is the decay of Adam's moment "
                              "estimates (Llama 3: b1 0.9, b2 0.95)")
    for key in ("min_lr_ratio", "wsd_decay_fraction"):
        if not 0 <= cfg.optim[key] <= 1:
            raise ConfigError(f"optim.{key}={cfg.optim[key]} must be in [0, 1]")
    if cfg.checkpoint.max_to_keep < 1:
        raise ConfigError(f"checkpoint.max_to_keep={cfg.checkpoint.max_to_keep} must be at least 1: the newest "
                          "checkpoint is what a restart resumes from")
    if cfg.checkpoint.maintenance_url not in ("auto", "") and not cfg.checkpoint.maintenance_url.startswith(
            ("http://", "https://")):
        raise ConfigError(f"checkpoint.maintenance_url={cfg.checkpoint.maintenance_url!r} must be 'auto', '' (off) or "
                          "an http:// URL of a GCE maintenance-event metadata key")
    if cfg.stability.policy not in STABILITY_POLICIES:
        raise ConfigError(f"stability.policy={cfg.stability.policy!r} is not one of {STABILITY_POLICIES}")
    if 0 < cfg.watchdog.multiple <= 1:
        raise ConfigError(f"watchdog.multiple={cfg.watchdog.multiple} would call half of all ordinary steps hung (the "
                          "limit is this many median step times): use a multiple well above 1 (default 10), or 0 to "
                          "turn the watchdog off")
    if 0 < cfg.stability.spike_factor <= 1:
        raise ConfigError(f"stability.spike_factor={cfg.stability.spike_factor} would call ordinary steps spikes: use a "
                          "factor above 1 (e.g. 3), or 0 to look for non-finite losses only")
    if cfg.optim.schedule_unit not in SCHEDULE_UNITS:
        raise ConfigError(f"optim.schedule_unit={cfg.optim.schedule_unit!r} is not one of {SCHEDULE_UNITS}")
    if cfg.objective.name not in OBJECTIVES:
        raise ConfigError(f"objective.name={cfg.objective.name!r} is not one of {OBJECTIVES}")
    _check_objective(cfg)
    _check_held_out_names(cfg)
    from llama_jax import lora  # here, so that loading a config stays cheap

    lora.check(cfg)
    if cfg.phases:
        check_phases(cfg)
    if cfg.checkpoint.init_from and not cfg.data.tokenizer:
        from llama_jax.workdir import as_path

        if not as_path(cfg.checkpoint.init_from).exists():
            raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from!r} does not exist: give a Hugging Face "
                              "directory or a llama_jax workdir (or one of its steps), e.g. with "
                              "--config configs/finetune.py:PATH, which also takes the tokenizer from there")
        raise ConfigError(
            f"checkpoint.init_from={cfg.checkpoint.init_from!r} needs the tokenizer the checkpoint was trained with: "
            "set data.tokenizer to the same directory"
        )


def _check_objective(cfg: ml_collections.ConfigDict) -> None:
    """Post-training objectives start from trained weights; the pair objectives read one preference source in
    rows of one length."""
    name = cfg.objective.name
    if name == "lm":
        return
    if not cfg.checkpoint.init_from:
        raise ConfigError(f"objective.name={name!r} fine-tunes a trained model: set checkpoint.init_from to a Hugging "
                          "Face directory or a llama_jax run (see configs/sft_tiny.py and configs/dpo_tiny.py)")
    if cfg.objective.dpo_beta <= 0 or cfg.objective.dpo_nll < 0:
        raise ConfigError(f"objective.dpo_beta must be positive and objective.dpo_nll zero or positive, got "
                          f"{cfg.objective.dpo_beta} and {cfg.objective.dpo_nll} (Llama 3: 0.1 and 0.2)")
    if name not in PAIR_OBJECTIVES:
        return
    if name == "reward" and cfg.train.eval_tasks.strip():
        raise ConfigError("train.eval_tasks scores the choices of a language model, and a reward model's output is its "
                          "score head: leave train.eval_tasks empty (its held-out pairs give its accuracy)")
    if cfg.data.mixture:
        raise ConfigError(f"objective.name={name!r} trains on one preference source: set data.source to a directory "
                          "written by python -m llama_jax.data.preferences and leave data.mixture empty")
    if cfg.data.ramp:
        raise ConfigError(f"objective.name={name!r} keeps one batch size and seq_len: set data.ramp = ()")
    if cfg.mesh.stage > 1 and cfg.pipeline.schedule in SCHEDULED_PIPELINES:
        raise ConfigError(f"objective.name={name!r} needs the layer stack run by autodiff: use pipeline.schedule="
                          "'gpipe' or 'circular' with mesh.stage > 1")


def pipeline_repeats(cfg: ml_collections.ConfigDict) -> int:
    """Layer chunks per pipeline stage: 1 for GPipe, pipeline.repeats for the circular schedule."""
    return cfg.pipeline.repeats if cfg.pipeline.schedule == "circular" else 1


def pipeline_microbatches(cfg: ml_collections.ConfigDict) -> int:
    """Microbatches per (accumulation) batch in the pipeline; 1 without one."""
    if cfg.mesh.stage == 1:
        return 1
    return cfg.pipeline.microbatches or 2 * cfg.mesh.stage


def _check_mesh_fits_model(cfg: ml_collections.ConfigDict) -> None:
    """Mesh sizes the model's shapes cannot be split by (the device count is checked when the mesh is built)."""
    model, mesh = cfg.model, cfg.mesh
    if mesh.tensor > 1 and model.n_heads % mesh.tensor:
        raise ConfigError(f"mesh.tensor={mesh.tensor} does not divide model.n_heads={model.n_heads}: each tensor-"
                          f"parallel device needs whole query heads; use a mesh.tensor that divides {model.n_heads}")
    if mesh.stage > 1:
        chunks = mesh.stage * pipeline_repeats(cfg)
        if model.n_layers % chunks:
            what = f"mesh.stage={mesh.stage} x pipeline.repeats={cfg.pipeline.repeats}" \
                if cfg.pipeline.schedule == "circular" else f"mesh.stage={mesh.stage}"
            raise ConfigError(f"{what} = {chunks} layer chunks do not divide model.n_layers={model.n_layers}: "
                              f"choose stages (and repeats) whose product divides the layer count")
        if cfg.pipeline.schedule in SCHEDULED_PIPELINES and mesh.tensor > 1:
            raise ConfigError(f"pipeline.schedule={cfg.pipeline.schedule!r} does not combine with mesh.tensor > 1 yet "
                              "(XLA cannot partition tensor-parallel collectives inside a stage's choice of unit): use "
                              "pipeline.schedule='gpipe' or 'circular' with tensor parallelism")
        if model.attention in PALLAS_ATTENTION:
            raise ConfigError(f"model.attention={model.attention!r} does not run inside the pipeline (the Pallas "
                              "kernel's gradients are not typed as varying over the pipeline's manual stage axis): "
                              "use model.attention='flash' (or 'cudnn' on GPUs) with mesh.stage > 1")
        microbatches = pipeline_microbatches(cfg)
        if cfg.pipeline.schedule == "circular" and microbatches < mesh.stage:
            raise ConfigError(f"the circular pipeline needs pipeline.microbatches >= mesh.stage ({mesh.stage}), got "
                              f"{microbatches}: raise pipeline.microbatches")
    if mesh.context > 1:
        for index, stage in enumerate(batch_schedule(cfg).stages):
            if stage.seq_len % (2 * mesh.context):
                where = "data.seq_len" if index == 0 else f"data.ramp[{index - 1}]"
                raise ConfigError(f"{where}: seq_len {stage.seq_len} must be a multiple of 2 x mesh.context = "
                                  f"{2 * mesh.context} (the zig-zag context split cuts it into 2 chunks per device)")


def batch_schedule(cfg: ml_collections.ConfigDict) -> BatchSchedule:
    """The (batch_size, seq_len) stages: data.batch_size / data.seq_len first, then data.ramp's."""
    return BatchSchedule(cfg.data.batch_size, cfg.data.seq_len, cfg.data.ramp)


def _check_stage(cfg: ml_collections.ConfigDict, where: str, stage: Stage) -> None:
    if stage.batch_size % cfg.optim.grad_accum:
        raise ConfigError(
            f"{where}: the batch size ({stage.batch_size}) must be divisible by optim.grad_accum ({cfg.optim.grad_accum})"
        )
    if stage.batch_size % (cfg.optim.grad_accum * pipeline_microbatches(cfg)):
        raise ConfigError(
            f"{where}: the batch size ({stage.batch_size}) must be divisible by optim.grad_accum x the "
            f"{pipeline_microbatches(cfg)} pipeline microbatches (pipeline.microbatches): change one of them"
        )
    if stage.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"{where}: seq_len {stage.seq_len} exceeds model.max_seq_len ({cfg.model.max_seq_len}); raise it"
        )
    chunk = cfg.objective.loss_chunk_len
    if 0 < chunk < stage.seq_len and stage.seq_len % chunk:
        raise ConfigError(f"{where}: seq_len {stage.seq_len} is not a multiple of objective.loss_chunk_len ({chunk}): "
                          "use a chunk length that divides every seq_len, or 0 (no chunks)")


def plain(value):
    """A config (or any value in it) as plain dicts, lists and scalars: what JSON takes, phases included (a tuple of
    sections, which `ConfigDict.to_dict` leaves as ConfigDicts)."""
    if isinstance(value, ml_collections.ConfigDict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(item) for item in value]
    return value


def model_config(cfg: ml_collections.ConfigDict) -> LlamaConfig:
    """The frozen model config from the `model` section."""
    return LlamaConfig(**cfg.model.to_dict())


def _check_against_schema(cfg, schema, prefix: str) -> None:
    missing = [f"{prefix}{key}" for key in schema.keys() if key not in cfg]
    if missing:
        raise ConfigError(
            f"config is missing {missing}: build configs from llama_jax.config.default_config() and change keys"
        )
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {sorted(schema.keys())}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        value, expected = cfg[key], schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {path!r} must be a section (ConfigDict), got {type(value).__name__}")
            if path == "data.mixture":
                _check_mixture(value)
            elif path == "data.eval_sources":
                _check_eval_sources(value)
            else:
                _check_against_schema(value, expected, prefix=f"{path}.")
        elif path == "phases":
            if not isinstance(value, (tuple, list)):
                raise ConfigError("config key 'phases' must be a tuple of llama_jax.phases.phase(...) entries")
        elif not _type_ok(value, expected):
            raise ConfigError(
                f"config key {path!r} must be {type(expected).__name__}, got {value!r} ({type(value).__name__})"
            )
        elif isinstance(value, float) and not math.isfinite(value):  # passed every range check written as a comparison
            raise ConfigError(f"config key {path!r} is {value}: give a finite number")
        elif path == "seed" and value >= 2**32:  # numpy's generators, which order the data, take 32-bit seeds
            raise ConfigError(f"seed={value} must be below 2**32")


def _check_mixture(mixture: ml_collections.ConfigDict) -> None:
    """Entry names are the user's; each entry has the fields of `mixture_source`."""
    for name, entry in mixture.items():
        if not isinstance(entry, ml_collections.ConfigDict):
            raise ConfigError(
                f"data.mixture.{name} must be a section: write data.mixture.{name} = mixture_source(SOURCE, weight=W)"
            )
        _check_against_schema(entry, mixture_source("", 1.0), prefix=f"data.mixture.{name}.")
        if entry.weight <= 0:
            raise ConfigError(f"data.mixture.{name}.weight must be positive, got {entry.weight}")
        if not entry.source:
            raise ConfigError(f"data.mixture.{name}.source is empty: give a path, glob, prepared directory or built-in name")


def _check_eval_sources(eval_sources: ml_collections.ConfigDict) -> None:
    """Entry names are the user's; each entry has the fields of `eval_source`."""
    for name, entry in eval_sources.items():
        if not isinstance(entry, ml_collections.ConfigDict):
            raise ConfigError(f"data.eval_sources.{name} must be a section: write data.eval_sources.{name} = "
                              "eval_source(SOURCE)")
        _check_against_schema(entry, eval_source(""), prefix=f"data.eval_sources.{name}.")
        if not entry.source:
            raise ConfigError(f"data.eval_sources.{name}.source is empty: give a path, glob, prepared directory or "
                              "built-in name")


def _check_held_out_names(cfg: ml_collections.ConfigDict) -> None:
    """An evaluation-only set's name must not be a training source's: both are logged as eval_loss/<name>."""
    if not cfg.data.eval_sources:
        return
    training = list(cfg.data.mixture.keys()) or ["data"]
    taken = sorted(set(training) & set(cfg.data.eval_sources.keys()))
    if taken:
        raise ConfigError(f"data.eval_sources {taken} has the name of a training source ({training}): both would be "
                          "logged as eval_loss/<name>; rename it")


def _type_ok(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(expected))
