"""4D parallelism on 8 fake CPU devices: every combination of data, fsdp, tensor, pipeline stages and context is the
same training step as one device, within the float32 tolerances of test_train_step.py.

Each case trains two optimizer steps from the single-device initial state and compares loss, gradient norm,
parameters and AdamW moments with the single-device run of the same model. Three small models cover the cases:
the "debug" preset (2 layers, 4 heads, 2 KV heads), WIDE (4 layers, 8 heads, 8 KV heads: tensor 8 splits every
head) and GQA (4 layers, 8 heads, 2 KV heads: tensor 4 has fewer KV heads than devices, so they are replicated;
untied output projection).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from test_train_step import (BATCHES, Harness, assert_steps_match, leaves_with_sharding, make_cfg, packed_batch,
                               setup_run)

from llama_jax.config import validate
from llama_jax.model.attention import reference_attention
from llama_jax.parallel import mesh as mesh_lib
from llama_jax.parallel.context import context_attention, to_zigzag, zigzag_order
from llama_jax.parallel.pipeline import bubble_fraction, peak_microbatches

MODELS = {
    "debug": {},
    "wide": dict(n_layers=4, n_heads=8, n_kv_heads=8, head_dim=8),
    "gqa": dict(n_layers=4, n_heads=8, n_kv_heads=2, head_dim=8, tie_embeddings=False),
}

# (model, mesh, pipeline settings). The batch is 8 rows of 32 tokens.
CASES = [
    ("debug", dict(fsdp=8), {}),
    ("wide", dict(tensor=8), {}),
    ("gqa", dict(data=2, tensor=4), {}),
    ("gqa", dict(stage=2, fsdp=2, tensor=2), {}),  # GPipe, 4 microbatches (the default 2 x stages)
    ("gqa", dict(stage=4, data=2), dict(microbatches=4)),
    ("debug", dict(context=2, fsdp=4), {}),
    ("gqa", dict(context=2, stage=2, tensor=2), {}),
    ("gqa", dict(stage=2, data=4), dict(microbatches=1)),  # GPipe with one microbatch: no overlap at all
    ("gqa", dict(stage=2, tensor=4), dict(microbatches=8)),  # GPipe with one row per microbatch
    ("gqa", dict(stage=2, data=2, tensor=2), dict(schedule="circular", repeats=2, microbatches=2)),
    ("gqa", dict(stage=2, tensor=4), dict(schedule="circular", repeats=2, microbatches=8)),
    ("gqa", dict(stage=2, context=2, fsdp=2), dict(microbatches=2, grad_accum=2)),  # with gradient accumulation
    # backward units placed by a table: 1F1B keeps at most S microbatches' inputs, ZB-H1 also defers weight grads
    ("gqa", dict(stage=2, data=2, fsdp=2), dict(schedule="1f1b", microbatches=2)),
    ("gqa", dict(stage=4, data=2), dict(schedule="1f1b", microbatches=4)),
    ("debug", dict(stage=2, context=2, data=2), dict(schedule="zb-h1", microbatches=2)),
]


def case_cfg(model: str, mesh: dict, pipeline: dict):
    cfg = make_cfg(grad_accum=pipeline.get("grad_accum", 1), **mesh)
    cfg.model.update(MODELS[model])
    for key, value in pipeline.items():
        if key != "grad_accum":
            cfg.pipeline[key] = value
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per model: the single-device initial state and the states and metrics after each of BATCHES (lazily)."""
    workdir = tmp_path_factory.mktemp("parallel")
    cache = {}

    def get(model: str):
        if model not in cache:
            harness = Harness(setup_run(case_cfg(model, {}, {}), workdir, devices=jax.devices()[:1]))
            with jax.set_mesh(harness.run.mesh):
                init = jax.device_get(harness.run.init())
            states, metrics, _ = harness.train(init, BATCHES)
            cache[model] = dict(init=init, states=states, metrics=metrics)
        return cache[model]

    return workdir, get


def case_id(case) -> str:
    model, mesh, pipeline = case
    return "-".join([model, *(f"{k}{v}" for k, v in mesh.items()), *(f"{k}{v}" for k, v in pipeline.items())])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parallel_step_matches_single_device(references, case):
    model, mesh, pipeline = case
    workdir, get = references
    reference = get(model)
    run = setup_run(case_cfg(model, mesh, pipeline), workdir)
    assert {k: v for k, v in run.mesh.shape.items() if v > 1} == mesh
    device_state = assert_steps_match(Harness(run), reference["init"], reference["states"], reference["metrics"],
                                      case_id(case))

    # parameters and optimizer state are laid out as the rules say, on real arrays
    expected = leaves_with_sharding(run.state_shardings)
    for key, array in leaves_with_sharding(device_state).items():
        assert array.sharding == expected[key], key
    cfg = run.model_def.cfg
    stage, fsdp, tensor = (run.mesh.shape[a] for a in ("stage", "fsdp", "tensor"))
    kv_split = tensor if cfg.n_kv_heads % tensor == 0 else 1  # fewer KV heads than tensor devices: each keeps all
    attn = device_state.params["layers"]["attn"]
    h = cfg.resolved_head_dim
    assert {s.data.shape for s in attn["wq"].addressable_shards} == {
        (cfg.n_layers // stage, 64 // fsdp, cfg.n_heads // tensor, h)}
    assert {s.data.shape for s in attn["wk"].addressable_shards} == {
        (cfg.n_layers // stage, 64 // fsdp, cfg.n_kv_heads // kv_split, h)}
    assert attn["wq"].sharding.spec[0] == ("stage" if stage > 1 else None) or stage == 1


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelines_train_in_bfloat16(references, schedule):
    """The default compute dtype through a pipeline: same losses as the unpipelined bfloat16 step, to bfloat16
    rounding (the sums over stages run in float32, which XLA's CPU backend needs)."""
    workdir, _ = references
    losses = {}
    for name, mesh, pipeline in (("plain", dict(data=8), {}),
                                 ("pipelined", dict(stage=2, data=4), dict(schedule=schedule, microbatches=2))):
        cfg = case_cfg("gqa", mesh, pipeline)
        cfg.model.dtype = "bfloat16"
        run = setup_run(cfg, workdir)
        with jax.set_mesh(run.mesh):
            init = jax.device_get(run.init())
        losses[name] = [float(m["loss"]) for m in Harness(run).train(init, BATCHES)[1]]
    np.testing.assert_allclose(losses["pipelined"], losses["plain"], rtol=2e-4)


@pytest.mark.parametrize("loss_chunk_len", [0, 8])
def test_tensor_parallel_step_is_megatron_and_vocabulary_parallel(references, loss_chunk_len):
    """On tensor=8 the compiled step never gathers weights or logits: its only collectives are all-reduces of the
    [batch, length, embed] activations after row-parallel matmuls (and their gradients), of per-token [batch,
    length] statistics (the loss's max and sum over vocabulary shards, per chunk of 8 positions when the loss is
    chunked), and of scalars."""
    workdir, _ = references
    cfg = case_cfg("wide", dict(tensor=8), {})
    cfg.objective.loss_chunk_len = loss_chunk_len
    run = setup_run(cfg, workdir)
    harness = Harness(run)
    with jax.set_mesh(run.mesh):
        hlo = harness.step.lower(run.abstract_state, run.to_global(BATCHES[0])).compile().as_text()
    collectives = re.findall(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)\(", hlo)
    kinds = {kind for _, kind in collectives}
    assert kinds == {"all-reduce"}, kinds
    shapes = set(re.findall(r"f32\[([\d,]*)\]", " ".join(result for result, _ in collectives)))
    chunks = {"8,8,64", "8,8", "8,8,1"} if loss_chunk_len else set()  # a chunk's hidden-state gradient and statistics
    assert shapes <= {"8,32,64", "8,32", "8,32,1", "", *chunks}, shapes  # no vocabulary- or weight-sized result


# ---------------------------------------------------------------------------------------------- context attention


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("context", [2, 4])
def test_context_attention_equals_reference_attention_on_packed_documents(implementation, context):
    """Queries split over `context` devices (zig-zag), K/V gathered: the same output as plain attention."""
    rng = np.random.default_rng(context)
    b, t, n, k, h = 2, 32, 4, 2, 8
    q, key, value = (rng.normal(size=(b, t, heads, h)).astype(np.float32) for heads in (n, k, k))
    segment_ids = np.asarray([[1] * 5 + [2] * 19 + [3] * 3 + [0] * 5, [1] * 13 + [2] * 19], np.int32)
    expected = np.asarray(reference_attention(q, key, value, segment_ids))
    mesh = mesh_lib.make_mesh(dict(data=1, stage=1, fsdp=1, context=context, tensor=-1))
    order = zigzag_order(t, context)
    with jax.set_mesh(mesh):
        spec = mesh_lib.logical_to_spec(("batch", "length"))
        placed = [jax.device_put(a[:, order], jax.sharding.NamedSharding(mesh, P(*spec, *(None,) * (a.ndim - 2))))
                  for a in (q, key, value, segment_ids)]
        out = jax.jit(context_attention(implementation, context))(*placed)
    assert {s.data.shape[1] for s in out.addressable_shards} == {t // context}  # the output stays split
    np.testing.assert_allclose(np.asarray(out)[:, np.argsort(order)], expected, rtol=1e-5, atol=1e-6)


def test_zigzag_balances_causal_work():
    """Each device holds chunks c and 2C-1-c, so each sees the same number of causal (query, key) pairs."""
    t, context = 64, 4
    order = zigzag_order(t, context)
    assert sorted(order) == list(range(t))
    pairs_per_device = [int(np.sum(order[c * t // context:(c + 1) * t // context] + 1)) for c in range(context)]
    assert len(set(pairs_per_device)) == 1, pairs_per_device
    contiguous = [int(np.sum(np.arange(c * t // context, (c + 1) * t // context) + 1)) for c in range(context)]
    assert max(contiguous) > 3 * min(contiguous)  # what the zig-zag avoids
    batch = packed_batch([(20, 12)] * 2, seed=0)
    laid_out = to_zigzag(batch, 2)
    assert all(np.array_equal(laid_out[key][:, np.argsort(zigzag_order(32, 2))], batch[key]) for key in batch)
    assert to_zigzag(batch, 1) is batch


def test_bubble_fractions():
    assert bubble_fraction(4, 1) == pytest.approx(3 / 4)  # one microbatch: each stage busy 1 tick in 4
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction(4, 12, repeats=2) == pytest.approx(3 / 27)  # circular: R times smaller chunks
    assert bubble_fraction(4, 8, schedule="1f1b") == pytest.approx(3 / 11)  # 1F1B saves memory, not time
    assert bubble_fraction(4, 8, schedule="zb-h1") == pytest.approx(0.2)  # deferred weight gradients fill some
    assert [peak_microbatches(4, 8, kind) for kind in ("gpipe", "1f1b", "zb-h1")] == [8, 4, 4]
