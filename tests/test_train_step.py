"""The training step's equivalences, on a tiny float32 model and synthetic packed batches (8 fake CPU devices).

- Sharded == single device: the same steps on four meshes of the 8 devices give the single-device loss,
  gradient norm and parameters, and the parameters are laid out as the logical rules say.
- Gradient accumulation == full batch, on a batch whose microbatches hold very different numbers of real
  tokens (where a mean of microbatch means would be wrong, and we check that it would be).
- The loss is the masked mean NLL of the model's logits; padding contributes nothing.
- The learning-rate schedule, and weight decay skipping the norm scales.

Everything is float32 (compute included), so the tolerances below are float32 rounding, not bfloat16 slack:
sharded runs sum the same numbers in a different order (partial sums per shard, then an all-reduce).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import trainer
from llama_jax import train_step
from llama_jax.config import default_config, model_section
from llama_jax.errors import ConfigError
from llama_jax.optim import decay_mask, lr_schedule, make_optimizer
from llama_jax.parallel import mesh as mesh_lib

VOCAB, SEQ, BATCH = 512, 32, 8  # the "debug" preset: dim 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, ffn 192
LR = 1e-3

# Tolerances (float32 everywhere), with the largest differences measured on 8 fake CPU devices in brackets.
# Loss and gradient norm: reductions summed in another order. [loss 2.3e-7, grad_norm 1.1e-7 relative]
LOSS_RTOL = 2e-6
# AdamW moments: each step is also run from the reference's own state before it, so that its moments compare one
# step's gradient at equal parameters (after step 0 mu = 0.1 g and nu = 0.05 g^2, later steps fold in the same
# previous moments). An absolute part is relative to each tensor's largest entry: a sum's rounding error scales with
# its largest terms, not with the small result. [up to 1.2e-6]
# (Chained from step 0, step 1's gradient is taken at parameters that already differ by the amount below: AdamW
# amplifies rounding there, and the moments' difference measures that chaos (9e-5 to 1.1e-4), not the step.)
OPT_RTOL, OPT_ATOL_OF_MAX = 1e-5, 1e-5
# Parameters, chained over the steps as training runs them: AdamW's update m / (sqrt(v) + eps) is about lr * sign(g)
# and scale-free, so a gradient entry near eps (1e-8) whose last bits differ moves the update by a fraction of lr.
# The bound is relative to lr: a real error (a missing all-reduce, a wrong microbatch) moves parameters by ~lr = 1e-3
# and a gradient scale error shows in grad_norm and the moments above. [up to 1.1e-5 absolute, i.e. 1.1e-2 * lr, on an
# Intel Xeon; 2.6e-5 on an AMD EPYC, one entry of 16,384 of the tensor-parallel run's value projection after step 0]
PARAM_RTOL, PARAM_ATOL = 1e-5, 5e-2 * LR

# LLVM at -O0 halves the CPU compile time of each step (the tests compile eight); the program, its shardings and
# the SPMD partitioning are the ones trainer._loop compiles.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

SHARDED_MESHES = [
    dict(data=8),
    dict(data=2, fsdp=4),
    dict(data=2, fsdp=2, tensor=2),
    dict(data=1, fsdp=4, tensor=2),
]


# ---------------------------------------------------------------------------------------------- helpers


def make_cfg(grad_accum: int = 1, **mesh):
    cfg = default_config()
    cfg.model = model_section("debug", dtype="float32")
    cfg.data.batch_size = BATCH
    cfg.data.seq_len = SEQ
    cfg.optim.lr = LR
    cfg.optim.warmup_steps = 0  # every step moves the parameters
    cfg.optim.grad_accum = grad_accum
    cfg.train.steps = 20
    for axis in mesh_lib.MESH_AXES:
        cfg.mesh[axis] = mesh.get(axis, 1)
    return cfg


def packed_batch(doc_lengths: list[tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    """A packed batch like data.pipeline makes: two documents per row, then padding (segment 0, loss_mask 0)."""
    rng = np.random.default_rng(seed)
    shape = (len(doc_lengths), SEQ)
    tokens = np.zeros(shape, np.int32)
    targets = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for row, lengths in enumerate(doc_lengths):
        start = 0
        for doc, length in enumerate(lengths, start=1):
            assert length > 0 and start + length <= SEQ
            doc_tokens = rng.integers(1, VOCAB, length + 1)
            tokens[row, start : start + length] = doc_tokens[:-1]
            targets[row, start : start + length] = doc_tokens[1:]
            segment_ids[row, start : start + length] = doc
            positions[row, start : start + length] = np.arange(length)
            start += length
    return dict(tokens=tokens, targets=targets, segment_ids=segment_ids, positions=positions,
                loss_mask=(segment_ids > 0).astype(np.float32))


# Real tokens per row: 32, 16, 8, 3, 32, 18, 8, 3. With grad_accum=4 microbatch j holds rows j and j+4, so the
# microbatches count 64, 34, 16 and 6 tokens.
UNEVEN = [(16, 16), (10, 6), (5, 3), (2, 1), (20, 12), (9, 9), (4, 4), (1, 2)]
BATCHES = [packed_batch(UNEVEN, seed=1), packed_batch([(12, 20), (30, 1), (3, 3), (7, 9), (1, 1), (16, 8),
                                                        (25, 2), (11, 11)], seed=2)]


@dataclasses.dataclass
class Harness:
    """A Run and its step, compiled as trainer._loop compiles it (shardings given, state donated)."""

    run: trainer.Run

    def __post_init__(self):
        cfg = self.run.cfg
        self.schedule = lr_schedule(cfg.optim, cfg.train.steps)
        self.step = jax.jit(
            train_step.make_train_step(self.run.model_def, self.run.tx, self.schedule, cfg.optim.grad_accum,
                                    self.run.layers_fn, self.run.scheduled_grads,
                                    loss_chunk_len=cfg.objective.loss_chunk_len),
            in_shardings=(self.run.state_shardings, self.run.batch_sharding),
            out_shardings=(self.run.state_shardings, mesh_lib.replicated(self.run.mesh)),
            donate_argnums=0,
            compiler_options=FAST_COMPILE,
        )

    def train(self, host_state: train_step.TrainState, batches):
        """Steps from a host copy of the state; returns (host states after each step, host metrics, device state).

        Host states are numpy copies: on CPU, jax.device_get returns views of the device buffers and device_put aliases
        numpy memory, so without copies a state that later steps donate would share memory with the host states the
        tests keep and feed back in."""
        states, metrics = [], []
        with jax.set_mesh(self.run.mesh):
            state = jax.device_put(jax.tree.map(np.array, host_state), self.run.state_shardings)
            for batch in batches:
                state, step_metrics = self.step(state, self.run.to_global(batch))
                states.append(jax.tree.map(np.array, jax.device_get(state)))
                metrics.append(jax.device_get(step_metrics))
        return states, metrics, state


def setup_run(cfg, workdir, devices=None) -> trainer.Run:
    return trainer.setup(cfg, workdir, devices)


def leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def max_abs_diff(a, b) -> float:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    return max(float(np.max(np.abs(la[k].astype(np.float64) - lb[k]))) if la[k].size else 0.0 for k in la)


def max_diff_of_max(a, b) -> float:
    """Largest |a - b| per leaf, relative to the leaf's largest |b| entry."""
    la, lb = leaves(a), leaves(b)
    return max(float(np.max(np.abs(la[k].astype(np.float64) - lb[k])) / max(np.max(np.abs(lb[k])), 1e-30))
               if la[k].size else 0.0 for k in la)


def assert_trees_close(actual, expected, rtol: float, atol: float, what: str, *, atol_of_max: float = 0.0):
    """allclose per leaf; `atol_of_max` adds an absolute tolerance relative to the leaf's largest entry."""
    la, le = leaves(actual), leaves(expected)
    assert la.keys() == le.keys(), what
    for key in le:
        assert la[key].shape == le[key].shape, (what, key)
        scale = float(np.max(np.abs(le[key]))) if le[key].size else 0.0
        np.testing.assert_allclose(la[key], le[key], rtol=rtol, atol=atol + atol_of_max * scale,
                                   err_msg=f"{what}: {key}")


def assert_steps_match(harness: Harness, init, expected_states: list, expected_metrics: list, what: str):
    """BATCHES' steps chained from `init`, as training runs them: losses, gradient norms, learning rates and parameters
    against the reference's; and every step from the reference's state before it: AdamW moments (see the tolerances
    above). Returns the chained run's last state, on its devices."""
    states, metrics, device_state = harness.train(init, BATCHES)
    assert_metrics_close(metrics, expected_metrics, what)
    befores = [init, *expected_states[:-1]]
    for i, (state, before, batch, expected) in enumerate(zip(states, befores, BATCHES, expected_states, strict=True)):
        one_step = state if i == 0 else harness.train(before, [batch])[0][0]
        loss_rel, norm_rel = (abs(float(metrics[i][key]) / float(expected_metrics[i][key]) - 1)
                              for key in ("loss", "grad_norm"))
        print(f"\n{what} step {i}: loss rel {loss_rel:.1e}, grad_norm rel {norm_rel:.1e}, "
              f"params abs {max_abs_diff(state.params, expected.params):.1e}, "
              f"opt_state (of leaf max) {max_diff_of_max(one_step.opt_state, expected.opt_state):.1e}", end="")
        assert_trees_close(state.params, expected.params, PARAM_RTOL, PARAM_ATOL, f"{what}: params after step {i}")
        assert_trees_close(one_step.opt_state, expected.opt_state, OPT_RTOL, 0, f"{what}: opt_state after step {i}",
                           atol_of_max=OPT_ATOL_OF_MAX)
    return device_state


def assert_metrics_close(actual: list[dict], expected: list[dict], what: str):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(a["loss"], e["loss"], rtol=LOSS_RTOL, err_msg=f"{what}: loss at step {i}")
        np.testing.assert_allclose(a["grad_norm"], e["grad_norm"], rtol=LOSS_RTOL, err_msg=f"{what}: grad_norm {i}")
        np.testing.assert_allclose(a["lr"], e["lr"], rtol=1e-7, err_msg=f"{what}: lr at step {i}")


def leaves_with_sharding(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


def masked_mean_nll(logits_btv: np.ndarray, batch: dict, rows=slice(None)) -> tuple[float, float]:
    """(sum of NLL over loss_mask, token count), by hand in float64."""
    logits = logits_btv[rows].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][rows][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"][rows].astype(np.float64)
    return float((nll * mask).sum()), float(mask.sum())


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer_step")


@pytest.fixture(scope="module")
def reference(workdir):
    """The single-device run: its initial state (host), and the state and metrics after each of BATCHES."""
    harness = Harness(setup_run(make_cfg(), workdir, devices=jax.devices()[:1]))
    assert harness.run.mesh.devices.size == 1
    with jax.set_mesh(harness.run.mesh):
        init = jax.device_get(harness.run.init())
    states, metrics, _ = harness.train(init, BATCHES)
    return dict(harness=harness, init=init, states=states, metrics=metrics)


@pytest.fixture(scope="module")
def init_logits(reference):
    """Logits of the initial model on BATCHES[0], outside jit."""
    model = reference["harness"].run.model_def.merge(jax.tree.map(np.asarray, reference["init"].params))
    batch = BATCHES[0]
    with jax.set_mesh(reference["harness"].run.mesh):
        logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    return np.asarray(logits)


# ---------------------------------------------------------------------------------------------- the reference


def test_reference_run_trains(reference):
    losses = [float(m["loss"]) for m in reference["metrics"]]
    assert all(np.isfinite(losses))
    assert abs(losses[0] - np.log(VOCAB)) < 0.5  # a fresh model is close to uniform
    assert int(reference["states"][-1].step) == len(BATCHES)
    schedule = reference["harness"].schedule
    lrs = [float(m["lr"]) for m in reference["metrics"]]
    assert lrs == pytest.approx([float(schedule(i)) for i in range(len(BATCHES))], rel=1e-6)  # jit vs eager cosine
    assert float(reference["metrics"][0]["lr"]) == pytest.approx(LR, rel=1e-7)
    # the first AdamW step moves every parameter tensor by about lr somewhere
    moved = leaves(reference["states"][0].params)
    for key, before in leaves(reference["init"].params).items():
        assert np.max(np.abs(moved[key] - before)) > 0.5 * LR, key


def test_loss_is_the_masked_mean_nll_of_the_logits(reference, init_logits):
    batch = BATCHES[0]
    nll_sum, count = masked_mean_nll(init_logits, batch)
    assert count == sum(a + b for a, b in UNEVEN) == 120
    step_loss = float(reference["metrics"][0]["loss"])
    np.testing.assert_allclose(step_loss, nll_sum / count, rtol=LOSS_RTOL)
    # ... and not the mean over every position, padding included (which would also be a finite number near ln V)
    everything = dict(batch, loss_mask=np.ones_like(batch["loss_mask"]))
    nll_all, count_all = masked_mean_nll(init_logits, everything)
    assert count_all == BATCH * SEQ
    assert abs(nll_all / count_all - step_loss) > 100 * LOSS_RTOL * step_loss


def test_padding_content_has_no_effect(reference):
    """Other tokens and targets under loss_mask 0 give bit-identical loss and parameters."""
    batch = BATCHES[1]
    rng = np.random.default_rng(7)
    pad = batch["loss_mask"] == 0
    assert pad.sum() > 0
    noisy = dict(batch)
    noisy["tokens"] = np.where(pad, rng.integers(0, VOCAB, pad.shape), batch["tokens"]).astype(np.int32)
    noisy["targets"] = np.where(pad, rng.integers(0, VOCAB, pad.shape), batch["targets"]).astype(np.int32)
    states, metrics, _ = reference["harness"].train(reference["states"][0], [noisy])
    assert float(metrics[0]["loss"]) == float(reference["metrics"][1]["loss"])
    assert_trees_close(states[0].params, reference["states"][1].params, 0, 0, "params")


# ---------------------------------------------------------------------------------------------- sharded == single


@pytest.mark.parametrize("mesh", SHARDED_MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_sharded_step_matches_single_device(reference, workdir, mesh):
    harness = Harness(setup_run(make_cfg(**mesh), workdir))
    run = harness.run
    assert run.mesh.devices.size == 8
    assert {k: v for k, v in run.mesh.shape.items() if v > 1} == {k: v for k, v in mesh.items() if v > 1}
    device_state = assert_steps_match(harness, reference["init"], reference["states"], reference["metrics"],
                                      f"mesh {mesh}")

    # the updated state really is laid out as the rules say: wq [layers, embed, heads, head_dim]
    fsdp, tensor = run.mesh.shape["fsdp"], run.mesh.shape["tensor"]
    wq = device_state.params["layers"]["attn"]["wq"]
    assert wq.sharding.spec == P("stage", "fsdp", "tensor", None)
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 64 // fsdp, 4 // tensor, 16)}
    embed = device_state.params["embed"]  # [vocab, embed]: vocab over tensor, embed over fsdp
    assert {s.data.shape for s in embed.addressable_shards} == {(VOCAB // tensor, 64 // fsdp)}
    (adam,) = [s for s in jax.tree.leaves(device_state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    for moment in (adam.mu, adam.nu):  # AdamW's moments are sharded like their parameters
        assert {s.data.shape for s in moment["layers"]["attn"]["wq"].addressable_shards} == {(2, 64 // fsdp, 4 // tensor, 16)}
    expected = leaves_with_sharding(run.state_shardings)
    for key, arr in leaves_with_sharding(device_state).items():
        assert arr.sharding == expected[key], key


@pytest.mark.parametrize("mesh, schedule", [(dict(), "gpipe"), (dict(data=2, context=2, tensor=2), "gpipe"),
                                             (dict(stage=2, fsdp=2, tensor=2), "gpipe"), (dict(stage=2, data=2, context=2), "1f1b")],
                         ids=["one-device", "data,context,tensor", "stage,fsdp,tensor", "stage-1f1b"])
def test_a_loss_in_chunks_trains_as_the_whole_loss(reference, workdir, mesh, schedule):
    """objective.loss_chunk_len=8 (4 chunks of SEQ=32 positions, recomputed in the backward pass): the same steps as
    the reference's unchunked loss, on one device and on meshes that split the chunks' rows, positions and vocab."""
    cfg = make_cfg(**mesh)
    cfg.objective.loss_chunk_len, cfg.pipeline.schedule = 8, schedule
    harness = Harness(setup_run(cfg, workdir, devices=jax.devices()[:1] if not mesh else None))
    assert_steps_match(harness, reference["init"], reference["states"], reference["metrics"],
                       f"chunked loss, mesh {mesh}")


def test_sharded_init_matches_single_device(reference, workdir):
    """run.init() creates the parameters already sharded, and the same numbers whatever the mesh."""
    run = setup_run(make_cfg(data=2, fsdp=2, tensor=2), workdir)
    with jax.set_mesh(run.mesh):
        state = run.init()
    wq = state.params["layers"]["attn"]["wq"]
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 32, 2, 16)}
    assert_trees_close(jax.device_get(state), reference["init"], 0, 0, "initial state")


# ---------------------------------------------------------------------------------------------- accumulation


def test_naive_mean_of_microbatch_means_would_differ(reference, init_logits):
    """The batch the accumulation tests use is one where averaging per-microbatch means gives another loss."""
    accum = 4
    parts = [masked_mean_nll(init_logits, BATCHES[0], rows=slice(j, None, accum)) for j in range(accum)]
    assert [count for _, count in parts] == [64, 34, 16, 6]
    exact = sum(s for s, _ in parts) / sum(c for _, c in parts)
    naive = np.mean([s / c for s, c in parts])
    np.testing.assert_allclose(float(reference["metrics"][0]["loss"]), exact, rtol=LOSS_RTOL)
    assert abs(naive - exact) > 10 * LOSS_RTOL * exact, (naive, exact)


@pytest.mark.parametrize("grad_accum, mesh", [(4, None), (2, dict(data=2, fsdp=2, tensor=2))],
                         ids=["accum4-single-device", "accum2-data2-fsdp2-tensor2"])
def test_grad_accum_matches_full_batch(reference, workdir, grad_accum, mesh):
    cfg = make_cfg(grad_accum=grad_accum, **(mesh or {}))
    run = setup_run(cfg, workdir, devices=None if mesh else jax.devices()[:1])
    assert_steps_match(Harness(run), reference["init"], reference["states"], reference["metrics"],
                       f"grad_accum={grad_accum} mesh {mesh}")


def test_evaluation_in_microbatches_matches_the_whole_batch_in_less_memory(reference, init_logits):
    """Held-out batches go through in optim.grad_accum parts, as training does, so that an evaluation never needs
    more memory than the step that fits: the same loss sum and token count, a fraction of the temporaries."""
    run, params = reference["harness"].run, reference["init"].params
    exact_sum, exact_count = masked_mean_nll(init_logits, BATCHES[0])
    temps = {}
    for microbatches in (1, 4):
        eval_fn = jax.jit(train_step.make_eval_step(run.model_def, microbatches=microbatches))
        with jax.set_mesh(run.mesh):
            loss_sum, count = jax.device_get(eval_fn(params, BATCHES[0]))
            temps[microbatches] = eval_fn.lower(params, BATCHES[0]).compile().memory_analysis().temp_size_in_bytes
        np.testing.assert_allclose(float(loss_sum), exact_sum, rtol=LOSS_RTOL)
        assert float(count) == exact_count == 120
    assert temps[4] < temps[1] / 2, temps


# ---------------------------------------------------------------------------------------------- optimizer


def test_lr_schedule_warmup_peak_and_floor():
    optim = default_config().optim
    optim.lr, optim.warmup_steps, optim.min_lr_ratio, optim.decay_steps = 2e-3, 10, 0.1, 0
    schedule = lr_schedule(optim, total_steps=110)
    values = np.array([float(schedule(step)) for step in range(0, 131)])
    assert values[0] == 0.0
    np.testing.assert_allclose(values[5], 1e-3, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(values[10], 2e-3, rtol=1e-6)  # the peak, at warmup_steps
    assert values.max() == pytest.approx(2e-3, rel=1e-6)
    np.testing.assert_allclose(values[60], 1.1e-3, rtol=1e-5)  # half-way down the cosine: (peak + floor) / 2
    np.testing.assert_allclose(values[110], 2e-4, rtol=1e-5)  # lr * min_lr_ratio at the last step ...
    np.testing.assert_allclose(values[110:], 2e-4, rtol=1e-5)  # ... and after
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:111]) < 0)
    # an explicit decay length ends the cosine earlier
    optim.decay_steps = 40
    np.testing.assert_allclose(float(lr_schedule(optim, 110)(50)), 2e-4, rtol=1e-5)


def test_weight_decay_skips_norm_scales(reference):
    params = jax.tree.map(np.asarray, reference["init"].params)
    mask = leaves(decay_mask(params))
    decayed = {k for k, v in mask.items() if v}
    assert {k for k in mask if k not in decayed} == {
        "['layers']['attn_norm']['scale']", "['layers']['mlp_norm']['scale']", "['norm']['scale']"}

    # The effect: with zero gradients AdamW's only update is decay, -lr * wd * param, on matrices only.
    optim = make_cfg().optim
    optim.warmup_steps, optim.weight_decay = 0, 0.1
    tx = make_optimizer(optim, total_steps=10)

    @jax.jit
    def step_with_zero_grads(params):
        updates, _ = tx.update(jax.tree.map(jax.numpy.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = leaves(step_with_zero_grads(params))
    for key, before in leaves(params).items():
        if key in decayed:
            np.testing.assert_allclose(new[key], before * (1 - LR * 0.1), rtol=1e-6, err_msg=key)
        else:
            assert np.array_equal(new[key], before), key
            # norm scales start at 1: decay would have moved them by lr * wd = 1e-4, far above float32 rounding
            assert np.all(before == 1.0)


@pytest.mark.parametrize("name, at_60, at_110", [
    ("linear", 1.1e-3, 2e-4),  # half-way down a straight line from the peak to the floor
    ("constant", 2e-3, 2e-3),
    ("wsd", 2e-3, 2e-4),  # stable until the last 20% of the span (steps 90-110), then straight down
])
def test_other_lr_schedules(name, at_60, at_110):
    optim = default_config().optim
    optim.lr, optim.warmup_steps, optim.min_lr_ratio, optim.schedule = 2e-3, 10, 0.1, name
    schedule = lr_schedule(optim, total_steps=110)
    values = np.array([float(schedule(step)) for step in range(0, 131)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 2e-3, 11), rtol=1e-6)  # the same warmup for all
    np.testing.assert_allclose([values[60], values[110], values[130]], [at_60, at_110, at_110], rtol=1e-5)
    if name == "wsd":
        np.testing.assert_allclose(values[10:91], 2e-3, rtol=1e-6)
        np.testing.assert_allclose(values[100], 1.1e-3, rtol=1e-5)
    optim.schedule = "exponential"
    with pytest.raises(ConfigError, match="optim.schedule='exponential' is not one of"):
        lr_schedule(optim, 110)


def test_weight_decay_can_leave_the_embeddings_alone(reference):
    params = jax.tree.map(np.asarray, reference["init"].params)
    skipped = {k for k, v in leaves(decay_mask(params, embeddings=False)).items() if not v}
    assert skipped == {"['embed']", "['layers']['attn_norm']['scale']", "['layers']['mlp_norm']['scale']",
                       "['norm']['scale']"}


def test_bfloat16_optimizer_state_halves_its_memory_and_follows_float32(reference):
    """Five AdamW steps on the same gradients: the bf16-state run stays within bf16 rounding of the f32 one."""
    params = jax.tree.map(jax.numpy.asarray, reference["init"].params)
    grads = [jax.tree.map(lambda p, i=i: jax.numpy.sin(p * (i + 1)) * 0.01, params) for i in range(5)]
    results = {}
    for dtype in ("float32", "bfloat16"):
        optim = make_cfg().optim
        optim.warmup_steps, optim.state_dtype = 0, dtype
        tx = make_optimizer(optim, total_steps=10)
        state, current = tx.init(params), params
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, current)
            current = optax.apply_updates(current, updates)
        results[dtype] = (current, state)
    floats = [x for x in jax.tree.leaves(results["bfloat16"][1]) if x.ndim]
    assert floats and {x.dtype for x in floats} == {jax.numpy.dtype("bfloat16")}
    size = {d: sum(x.nbytes for x in jax.tree.leaves(results[d][1])) for d in results}
    assert size["bfloat16"] < 0.51 * size["float32"]
    for a, b in zip(jax.tree.leaves(results["float32"][0]), jax.tree.leaves(results["bfloat16"][0])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5 * LR * 2**-8)  # per step, |update| <= lr

    optim.state_dtype = "float8"
    with pytest.raises(ConfigError, match="optim.state_dtype='float8' is not one of"):
        make_optimizer(optim, 10)
