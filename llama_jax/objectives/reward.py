"""A reward model: the Llama body with a scalar head, trained on preference pairs (Bradley-Terry).

    score(x, y) = reward_head . h_last        loss = mean over pairs of -log sigmoid(score(y_w) - score(y_l))

h_last is the final (normalised) hidden state at the last input position of the sequence: the one that reads the
response's last content token and predicts its end token, so it has seen the prompt and the whole response. The
head is one extra parameter, `params["reward_head"]` [dim], kept beside the model's own parameters, so the model code
knows nothing of it; `split_params` separates them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.model.llama import LayersFn, Llama
from llama_jax.objectives.pairs import Batch, hidden, pair_count, rejected_rows, valid_pairs

HEAD = "reward_head"


def init_head(dim: int) -> jax.Array:
    """Zeros: every pair starts tied (loss log 2), and the first step moves the head towards the data's direction."""
    return jnp.zeros((dim,), jnp.float32)


def split_params(params: dict) -> tuple[dict, jax.Array]:
    """(the model's parameters, the head)."""
    return {key: value for key, value in params.items() if key != HEAD}, params[HEAD]


def counts(batch: Batch) -> dict[str, jax.Array]:
    return {"pairs": pair_count(batch)}


def scores(model: Llama, head_d: jax.Array, rows: Batch, layers_fn: LayersFn | None = None) -> jax.Array:
    """[b] float32 scores: the head on the hidden state at each row's last real position (found by position, not by
    index, so a row laid out zig-zag for context parallelism gives the same score)."""
    h_btd = hidden(model, rows, layers_fn)
    last_b = jnp.argmax(jnp.where(rows["segment_ids"] > 0, rows["positions"], -1), axis=1)
    last_bt = jax.nn.one_hot(last_b, h_btd.shape[1], dtype=jnp.float32)  # a product, not a gather: shards like h
    return jnp.einsum("btd,bt,d->b", h_btd.astype(jnp.float32), last_bt, head_d.astype(jnp.float32))


def reward_loss(model: Llama, head_d: jax.Array, batch: Batch, totals: dict[str, jax.Array], *,
                layers_fn: LayersFn | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of the pairs in `batch`, divided by the whole batch's pair count."""
    margin = scores(model, head_d, batch, layers_fn) - scores(model, head_d, rejected_rows(batch), layers_fn)
    valid, pairs = valid_pairs(batch), totals["pairs"]
    loss = jnp.sum(valid * -jax.nn.log_sigmoid(margin)) / pairs
    return loss, {"pairwise_accuracy": jnp.sum(valid * (margin > 0)) / pairs,
                  "score_margin": jnp.sum(valid * margin) / pairs}


class RewardModel(NamedTuple):
    model: Llama
    head: jax.Array  # [dim] float32
    tokenizer: str  # the tokenizer file, beside which its chat template lies
    scores_end_token: bool  # scores the conversation's last token, its end token (Hugging Face's reward models)


def load_reward_model(path, *, mesh=None) -> RewardModel:
    """A reward-model run (objective "reward") or a Hugging Face reward model (a one-label
    LlamaForSequenceClassification, ours exported or another's), on the default device or sharded over `mesh` (the
    head replicated). A LoRA run's adapters are merged into its base."""
    from flax import nnx

    from llama_jax.checkpoint import SavedRun
    from llama_jax.convert import load_hf_reward_model
    from llama_jax.data.tokenizer import tokenizer_files
    from llama_jax.errors import CheckpointError
    from llama_jax.model import ModelDef
    from llama_jax.parallel.mesh import param_shardings, replicated
    from llama_jax.workdir import resolve

    head_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None else replicated(mesh)
    if (resolve(path) / "config.json").is_file():
        model, head, scores_end_token = load_hf_reward_model(path, mesh=mesh)
        return RewardModel(model, jax.device_put(head, head_sharding), str(tokenizer_files(resolve(path))[0]),
                           scores_end_token)
    saved = SavedRun.open(path)
    if saved.objective != "reward":
        raise CheckpointError(f"{path} is not a reward model: it was trained with objective.name={saved.objective!r}; "
                              "train one with objective.name='reward' (configs/reward_tiny.py)")
    model_def = ModelDef(saved.model_config)
    if mesh is None:
        shardings = jax.tree.map(lambda _: head_sharding, nnx.to_pure_dict(model_def.abstract_state))
    else:
        shardings = param_shardings(model_def.abstract_state, mesh)
    base, head = split_params(saved.restore_params(model_def.cfg, {**shardings, HEAD: head_sharding}))
    return RewardModel(model_def.merge(base), head, str(saved.tokenizer), False)
