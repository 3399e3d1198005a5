"""A reward model (objective "reward") trained from a chat checkpoint on preference pairs: the model plus a scalar
head on the final hidden state of the response's last token, the Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected). The pairs are configs/dpo_tiny.py's: a standard-library function's true docstring preferred to another
function's with its words shuffled, as the answer to "What does `X` do?".

    python -m llama_jax.train --config configs/reward_tiny.py:runs/sft_tiny --workdir runs/reward_tiny

The argument is the checkpoint to start from (usually the SFT run's). Each evaluation logs the held-out pairwise loss
(eval_loss) and the share of held-out pairs scored in the right order (eval_pairwise_accuracy). The run is what
python -m llama_jax.rejection_sample --reward takes.
"""

from llama_jax.config import default_config, pretrained_model_section, pretrained_tokenizer
from llama_jax.errors import ConfigError


def get_config(checkpoint: str = ""):
    if not checkpoint:
        raise ConfigError("configs/reward_tiny.py needs the checkpoint to start from: "
                          "--config configs/reward_tiny.py:PATH")
    cfg = default_config()
    cfg.model = pretrained_model_section(checkpoint)
    cfg.checkpoint.init_from = checkpoint
    cfg.data.tokenizer = pretrained_tokenizer(checkpoint)
    cfg.data.source = "stdlib_preferences"  # prepared under data.cache_dir when the run opens its data
    cfg.objective.name = "reward"
    cfg.data.batch_size = 8  # pairs
    cfg.data.seq_len = 256
    cfg.data.eval_batches = 2
    cfg.optim.lr = 1e-3  # the head starts at zero; a 5M-parameter model on 260 pairs needs a large step
    cfg.optim.warmup_steps = 5
    cfg.optim.weight_decay = 0.0
    cfg.train.steps = 60
    cfg.train.log_every = 5
    cfg.train.eval_every = 20
    cfg.checkpoint.every_steps = 60
    return cfg
