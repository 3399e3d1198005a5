"""1F1B pipeline schedule (llama_jax/parallel/schedules.py): valid tables, expected bubble and memory numbers, and
loss + gradients equal to `jax.value_and_grad` of the plain sequential stack on 4 stages x 2 data devices.

Tolerance: float32, rtol 1e-5 / atol 1e-5 (the pipeline sums the same per-microbatch terms in a different order and
recomputes the forward in the backward, so results differ from the reference only by rounding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.parallel import mesh as mesh_lib
from llama_jax.parallel.schedules import (BWD, FWD, IDLE, WGT, check_schedule, make_schedule, make_tables,
                                          peak_in_flight, pipeline_value_and_grad, schedule_stats)

S, D, ROWS = 4, 16, 4  # stages, width, rows per microbatch (split over data=2)


def stage_fn(params, x, aux):
    return x + jnp.tanh(x @ params["w"] + params["b"]) * aux


def loss_fn(head, y, target):
    return jnp.mean((y @ head - target) ** 2)


def sequential_loss(params, head, x_mbd, aux_mb, targets_mb):
    """The reference: no pipeline, stages applied in order to every microbatch, losses summed."""
    total = 0.0
    for m in range(x_mbd.shape[0]):
        y = x_mbd[m]
        for s in range(S):
            y = stage_fn(jax.tree.map(lambda a: a[s], params), y, aux_mb[m])
        total = total + loss_fn(head, y, targets_mb[m])
    return total


@pytest.mark.parametrize("schedule,microbatches", [("1f1b", 1), ("1f1b", 4), ("1f1b", 8), ("gpipe", 4),
                                                   ("zb-h1", 1), ("zb-h1", 8)])
def test_pipeline_gradients_equal_sequential(schedule, microbatches):
    M = microbatches
    keys = jax.random.split(jax.random.key(M), 6)
    params = dict(w=jax.random.normal(keys[0], (S, D, D)) / np.sqrt(D), b=0.1 * jax.random.normal(keys[1], (S, D)))
    head = jax.random.normal(keys[4], (D, D)) / np.sqrt(D)
    x = jax.random.normal(keys[2], (M, ROWS, D))
    aux = 1 + jax.random.uniform(keys[5], (M, ROWS, 1))  # a per-microbatch side input (not differentiated)
    targets = jax.random.normal(keys[3], (M, ROWS, D))
    ref_loss, (ref_gp, ref_gh, ref_gx) = jax.jit(jax.value_and_grad(sequential_loss, argnums=(0, 1, 2)))(
        params, head, x, aux, targets)

    mesh = mesh_lib.make_mesh(dict(data=2, stage=S, fsdp=1, context=1, tensor=1))
    with jax.set_mesh(mesh):
        params_s = jax.device_put(params, NamedSharding(mesh, P("stage")))
        x_s, a_s, t_s = (jax.device_put(a, NamedSharding(mesh, P(None, "data"))) for a in (x, aux, targets))
        run = jax.jit(lambda p, h, x, a, t: pipeline_value_and_grad(
            stage_fn, loss_fn, p, h, x, a, t, stages=S, microbatches=M, schedule=schedule))
        loss, gp, gh, gx = run(params_s, head, x_s, a_s, t_s)

    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(ref_loss), **tol)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(ref_gx), **tol)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(ref_gh), **tol)
    for name in params:
        np.testing.assert_allclose(np.asarray(gp[name]), np.asarray(ref_gp[name]), **tol)
    assert float(jnp.abs(gp["w"][0]).sum()) > 0  # the first stage really got a gradient


@pytest.mark.parametrize("kind", ["1f1b", "gpipe", "zb-h1"])
@pytest.mark.parametrize("stages,microbatches", [(4, 1), (4, 4), (4, 8), (4, 16), (2, 5), (8, 3)])
def test_schedule_is_valid(kind, stages, microbatches):
    ops = make_schedule(kind, stages, microbatches, backward_cost=2 if kind == "zb-h1" else 1)
    check_schedule(ops, stages, microbatches)  # dependencies and one unit per stage per tick
    when = {(op.kind, op.stage, op.mb): op.start for op in ops}
    for s in range(stages):
        for m in range(microbatches):
            assert s == 0 or when[(FWD, s, m)] > when[(FWD, s - 1, m)]
            assert s == stages - 1 or when[(BWD, s, m)] > when[(BWD, s + 1, m)]
            assert when[(BWD, s, m)] > when[(FWD, s, m)]
            assert kind != "zb-h1" or when[(WGT, s, m)] > when[(BWD, s, m)]
    peak = max(peak_in_flight(ops, stages))
    if kind in ("1f1b", "zb-h1"):
        assert peak == min(stages, microbatches)
        assert make_tables(kind, stages, microbatches).slots <= stages  # the executor's buffer
    else:
        assert peak == microbatches
    # The tables say the same thing as the ops: one unit per stage per tick.
    tabs = make_tables(kind, stages, microbatches)
    assert (tabs.kind != IDLE).sum() == (3 if kind == "zb-h1" else 2) * stages * microbatches
    assert set(np.unique(tabs.kind)) <= {IDLE, FWD, BWD, WGT}


def test_a_broken_schedule_is_caught():
    ops = make_schedule("1f1b", 4, 4)
    late = next(op for op in ops if op.kind == FWD and op.stage == 1 and op.mb == 2)
    early = type(late)(late.kind, late.stage, late.mb, 0, 1)
    with pytest.raises(AssertionError):
        check_schedule([early if op is late else op for op in ops], 4, 4)


@pytest.mark.parametrize("microbatches", [1, 4, 8, 16])
@pytest.mark.parametrize("backward_cost", [1, 2])
def test_schedule_stats(microbatches, backward_cost):
    M, c = microbatches, backward_cost
    gpipe, ofob = (schedule_stats(k, S, M, backward_cost=c) for k in ("gpipe", "1f1b"))
    # Both take (M + S - 1) (1 + c) time: 1F1B does not shrink the bubble, it bounds memory.
    for stats in (gpipe, ofob):
        assert stats["makespan"] == (M + S - 1) * (1 + c)
        assert stats["bubble_fraction"] == pytest.approx((S - 1) / (M + S - 1))
    assert gpipe["peak_activations"] == M
    assert ofob["peak_activations"] == min(S, M)
    assert ofob["peak_activations_per_stage"] == [min(S - s, M) for s in range(S)]


@pytest.mark.parametrize("microbatches", [4, 8, 16])
def test_zero_bubble_shrinks_the_bubble_at_the_same_memory(microbatches):
    """Backward = 2 forwards; ZB-H1 splits it into B = W = 1 and places W in the bubble."""
    ofob, zb = (schedule_stats(k, S, microbatches, backward_cost=2) for k in ("1f1b", "zb-h1"))
    assert zb["bubble_fraction"] < ofob["bubble_fraction"]
    assert zb["makespan"] < ofob["makespan"]
    assert zb["peak_activations"] == ofob["peak_activations"] == S
    with pytest.raises(ValueError):
        schedule_stats("zb-h1", S, microbatches, backward_cost=1)
