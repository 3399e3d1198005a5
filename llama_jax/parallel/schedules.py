"""Hand-written pipeline schedules: one-forward-one-backward (1F1B, PipeDream-flush) in SPMD form.

`pipeline.py` gets its backward pass from JAX autodiff of the GPipe loop: a second, reversed sweep, with every
microbatch's activations alive at the peak (M per stage). Here the forward *and* backward units are placed by a
static table (`make_schedule`, plain Python) and executed by one `lax.scan` over ticks inside a `jax.shard_map`
manual over `stage`:

- each tick every stage runs at most one unit, chosen with `lax.switch` on its own row of the table
  (`jax.lax.axis_index("stage")`): idle, forward of microbatch m, or backward of microbatch m;
- a stage keeps only the *inputs* of the microbatches in flight in a small slot buffer (at most S for 1F1B);
  the backward recomputes the forward with `jax.vjp` from the saved input (full activation recomputation);
- activations go to the next stage and cotangents to the previous one with one `ppermute` each per tick; the
  receiving stage stores them into the slot the table assigned to that microbatch;
- the last stage computes the microbatch's loss inside its backward unit and seeds the cotangent.

Cost model (`schedule_stats`): time is counted in units; a forward unit costs 1 and a backward unit costs
`backward_cost` (1 by default; 2 is the usual "backward = 2 forwards" model, or 3 with the recomputation done here).
A unit depends on its predecessor having *finished* (the message arrives at the next tick). The executor runs in
lockstep and needs `backward_cost=1` tables (one unit per tick); the weighted statistics are for reporting.
Bubble fraction = idle stage-time / (stages x makespan). Peak activations = the largest number of microbatches a
stage has started the forward of and not yet finished the backward of (what it must keep alive).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IDLE, FWD, BWD, WGT = 0, 1, 2, 3  # WGT: the deferred weight-gradient half of a split backward (ZB-H1)


@dataclasses.dataclass(frozen=True)
class Op:
    kind: int  # FWD, BWD or WGT
    stage: int
    mb: int
    start: int
    end: int  # exclusive: the unit occupies [start, end)


def stage_orders(kind: str, stages: int, microbatches: int) -> list[list[tuple[int, int]]]:
    """The order in which each stage runs its units: a list of (FWD|BWD, microbatch) per stage."""
    S, M = stages, microbatches
    orders = []
    for s in range(S):
        if kind == "gpipe":
            # All forwards, then all backwards in reverse (the order autodiff of the GPipe loop runs them).
            order = [(FWD, m) for m in range(M)] + [(BWD, m) for m in reversed(range(M))]
        elif kind == "1f1b":
            warmup = min(S - 1 - s, M)
            order = [(FWD, m) for m in range(warmup)]
            for i in range(M - warmup):
                order += [(FWD, warmup + i), (BWD, i)]
            order += [(BWD, m) for m in range(M - warmup, M)]
        else:
            raise ValueError(f"unknown schedule {kind!r}: expected 'gpipe' or '1f1b'")
        orders.append(order)
    return orders


def make_schedule(kind: str, stages: int, microbatches: int, backward_cost: int = 1) -> list[Op]:
    """Simulates the schedule: each stage runs its units in order, each as early as its dependencies allow.

    Dependencies: F(m, s) after F(m, s-1) finished; B(m, s) after F(m, s) and B(m, s+1) finished; W(m, s) after
    B(m, s). "zb-h1" splits each backward into B (input gradient, cost ceil(c/2)) and W (weight gradient, floor(c/2))
    and places them greedily: B first, then F while fewer than S - s microbatches are alive on the stage (as in
    1F1B), else a pending W. This greedy placement is ZB-H1-like, not the paper's hand-tuned one: with F = B = W = 1
    it mostly runs W right after B (F is held back by the memory limit), so the gain comes from the shorter critical
    path (B = 1 instead of 2) more than from W filling the cool-down; S=4, M=8: makespan 30 where ZB-H1 reaches 27."""
    if kind == "zb-h1":
        return _zb_h1(stages, microbatches, backward_cost)
    S, M = stages, microbatches
    orders = stage_orders(kind, S, M)
    cost = {FWD: 1, BWD: backward_cost}
    done: dict[tuple[int, int, int], int] = {}  # (kind, stage, mb) -> finish time
    pos = [0] * S
    free_at = [0] * S
    ops: list[Op] = []
    t = 0
    while any(pos[s] < len(orders[s]) for s in range(S)):
        started = []
        for s in range(S):
            if pos[s] == len(orders[s]) or free_at[s] > t:
                continue
            k, m = orders[s][pos[s]]
            if all(d in done and done[d] <= t for d in _deps(k, s, m, S)):
                started.append(Op(k, s, m, t, t + cost[k]))
        for op in started:  # commit after the sweep: nothing started at t can feed another unit at t
            done[(op.kind, op.stage, op.mb)] = op.end
            free_at[op.stage] = op.end
            pos[op.stage] += 1
            ops.append(op)
        t += 1
        if t > 10 * (S + M) * (1 + backward_cost) + 10:
            raise RuntimeError("schedule simulation did not finish (deadlock)")
    return ops


def _deps(k: int, s: int, m: int, S: int) -> list[tuple[int, int, int]]:
    if k == FWD:
        return [(FWD, s - 1, m)] if s > 0 else []
    if k == BWD:
        return [(FWD, s, m)] + ([(BWD, s + 1, m)] if s < S - 1 else [])
    return [(BWD, s, m)]


def _zb_h1(S: int, M: int, backward_cost: int) -> list[Op]:
    if backward_cost < 2:
        raise ValueError("zb-h1 splits the backward into B and W units: backward_cost must be >= 2")
    cost = {FWD: 1, BWD: (backward_cost + 1) // 2, WGT: backward_cost // 2}
    done: dict[tuple[int, int, int], int] = {}
    next_f, next_b = [0] * S, [0] * S
    pending_w: list[list[int]] = [[] for _ in range(S)]
    free_at = [0] * S
    ops: list[Op] = []
    t = 0
    ready = lambda k, s, m: all(d in done and done[d] <= t for d in _deps(k, s, m, S))
    while len(ops) < 3 * S * M:
        started = []
        for s in range(S):
            if free_at[s] > t:
                continue
            alive = next_f[s] - sum(1 for op in ops if op.stage == s and op.kind == WGT)
            if next_b[s] < M and ready(BWD, s, next_b[s]):
                started.append(Op(BWD, s, next_b[s], t, t + cost[BWD]))
            elif next_f[s] < M and alive < S - s and ready(FWD, s, next_f[s]):
                started.append(Op(FWD, s, next_f[s], t, t + cost[FWD]))
            elif pending_w[s]:
                started.append(Op(WGT, s, pending_w[s][0], t, t + cost[WGT]))
        for op in started:
            done[(op.kind, op.stage, op.mb)] = op.end
            free_at[op.stage] = op.end
            if op.kind == FWD:
                next_f[op.stage] += 1
            elif op.kind == BWD:
                next_b[op.stage] += 1
                pending_w[op.stage].append(op.mb)
            else:
                pending_w[op.stage].pop(0)
            ops.append(op)
        t += 1
        if t > 10 * (S + M) * (1 + backward_cost) + 10:
            raise RuntimeError("schedule simulation did not finish (deadlock)")
    return ops


def check_schedule(ops: list[Op], stages: int, microbatches: int) -> None:
    """Raises AssertionError unless every unit runs once, after its dependencies, one unit at a time per stage."""
    when = {(op.kind, op.stage, op.mb): op for op in ops}
    units = 3 if any(op.kind == WGT for op in ops) else 2
    assert len(when) == len(ops) == units * stages * microbatches, "each (kind, stage, microbatch) exactly once"
    for (k, s, m), op in when.items():
        if k == FWD and s > 0:
            assert when[(FWD, s - 1, m)].end <= op.start, f"F{m} on stage {s} before its forward on {s - 1}"
        if k == BWD:
            assert when[(FWD, s, m)].end <= op.start, f"B{m} on stage {s} before its own forward"
            if s < stages - 1:
                assert when[(BWD, s + 1, m)].end <= op.start, f"B{m} on stage {s} before its backward on {s + 1}"
        if k == WGT:
            assert when[(BWD, s, m)].end <= op.start, f"W{m} on stage {s} before its input-gradient unit"
    for s in range(stages):
        mine = sorted((op for op in ops if op.stage == s), key=lambda op: op.start)
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:])), f"stage {s} runs two units at once"


def peak_in_flight(ops: list[Op], stages: int) -> list[int]:
    """Per stage: most microbatches whose forward has started and whose backward (B and W) has not finished."""
    peaks = []
    for s in range(stages):
        last: dict[int, int] = {}
        for op in ops:
            if op.stage == s and op.kind != FWD:
                last[op.mb] = max(last.get(op.mb, 0), op.end)
        events = [(op.start, 1) for op in ops if op.stage == s and op.kind == FWD]
        events += [(end, -1) for end in last.values()]
        live = peak = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # a finish at t frees before a start at t
            live += delta
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def schedule_stats(kind: str, stages: int, microbatches: int, backward_cost: int = 1) -> dict[str, Any]:
    """Makespan, bubble fraction and peak live microbatch activations of a schedule (model: module docstring)."""
    ops = make_schedule(kind, stages, microbatches, backward_cost)
    makespan = max(op.end for op in ops)
    busy = sum(op.end - op.start for op in ops)
    peaks = peak_in_flight(ops, stages)
    return dict(kind=kind, stages=stages, microbatches=microbatches, backward_cost=backward_cost,
                makespan=makespan, bubble_fraction=1 - busy / (stages * makespan),
                peak_activations=max(peaks), peak_activations_per_stage=peaks)


@dataclasses.dataclass(frozen=True)
class Tables:
    """Per tick (rows) and stage (columns): what the executor does. -1 where nothing."""
    kind: np.ndarray  # IDLE / FWD / BWD
    mb: np.ndarray  # the microbatch of that unit
    slot: np.ndarray  # the buffer slot holding that microbatch's input (and cotangent)
    recv_act: np.ndarray  # slot to store the activation arriving from stage s-1 at the end of the tick
    recv_grad: np.ndarray  # slot to store the cotangent arriving from stage s+1 at the end of the tick
    slots: int  # buffer size per stage


def make_tables(kind: str, stages: int, microbatches: int) -> Tables:
    """The executor's tables for a unit-cost schedule, with buffer slots assigned per stage (greedy, reused)."""
    S, M = stages, microbatches
    ops = make_schedule(kind, S, M, backward_cost=2 if kind == "zb-h1" else 1)  # one unit per tick
    check_schedule(ops, S, M)
    T = max(op.end for op in ops)
    when = {(op.kind, op.stage, op.mb): op.start for op in ops}
    tab = {name: np.full((T, S), -1, np.int32) for name in ("kind", "mb", "slot", "recv_act", "recv_grad")}
    tab["kind"][:] = IDLE
    n_slots = 1
    slot_of = {}
    for s in range(S):
        # Slot lifetime in half ticks: stage 0 loads its input at the start of its forward tick; other stages
        # receive it at the end of the previous stage's forward tick; the slot is read last by the backward.
        intervals = []
        for m in range(M):
            begin = 2 * when[(FWD, 0, m)] if s == 0 else 2 * when[(FWD, s - 1, m)] + 1
            intervals.append((begin, 2 * max(when[(BWD, s, m)], when.get((WGT, s, m), -1)), m))
        free_after: list[int] = []  # per slot: the half tick after which it is free
        for begin, end, m in sorted(intervals):
            slot = next((i for i, f in enumerate(free_after) if f < begin), None)
            if slot is None:
                slot = len(free_after)
                free_after.append(0)
            free_after[slot] = end
            slot_of[(s, m)] = slot
        n_slots = max(n_slots, len(free_after))
    for op in ops:
        t, s, m = op.start, op.stage, op.mb
        tab["kind"][t, s], tab["mb"][t, s], tab["slot"][t, s] = op.kind, m, slot_of[(s, m)]
        if op.kind == FWD and s < S - 1:
            tab["recv_act"][t, s + 1] = slot_of[(s + 1, m)]
        if op.kind == BWD and s > 0:
            tab["recv_grad"][t, s - 1] = slot_of[(s - 1, m)]
    return Tables(slots=n_slots, **tab)


def pipeline_value_and_grad(stage_fn: Callable, loss_fn: Callable, stage_params, head_params, x_mbd, aux_mb,
                            targets_mb, *, stages: int, microbatches: int, schedule: str = "1f1b"):
    """Loss (summed over microbatches) and its gradients through an S-stage pipeline, by a hand-written schedule.

    stage_fn(params_of_one_stage, x, aux) -> y of x's shape; loss_fn(head_params, y, target) -> scalar, run on the
    last stage. `stage_params`: a pytree whose leaves have a leading [stages, ...] axis (sharded over the `stage`
    mesh axis); `head_params`: the loss's own parameters (replicated over stages); `x_mbd`: [M, ...] inputs;
    `aux_mb`, `targets_mb`: pytrees of [M, ...] per-microbatch side inputs (not differentiated) and targets.
    Returns (loss, grads like stage_params, grads like head_params, float32 grads of x_mbd). Must run under a mesh with
    a `stage` axis of size `stages` (`jax.set_mesh`); other mesh axes stay automatic.
    `schedule="gpipe"` runs the GPipe order through the same executor (for comparison; it keeps M inputs);
    `schedule="zb-h1"` splits each backward into an input-gradient unit and a deferred weight-gradient unit."""
    S, M = stages, microbatches
    assert x_mbd.shape[0] == M, f"x_mbd has {x_mbd.shape[0]} microbatches, expected {M}"
    tabs = make_tables(schedule, S, M)
    split = schedule == "zb-h1"
    rows = tuple(jnp.asarray(a) for a in (tabs.kind, tabs.mb, tabs.slot, tabs.recv_act, tabs.recv_grad))
    fwd_perm = [(i, i + 1) for i in range(S - 1)]
    bwd_perm = [(i + 1, i) for i in range(S - 1)]

    def local(params, head_params, x_mbd, aux_mb, targets_mb):
        stage = jax.lax.axis_index("stage")
        is_first, is_last = stage == 0, stage == S - 1
        params = jax.tree.map(lambda a: a[0], params)
        varying = lambda a: jax.lax.pcast(a, "stage", to="varying")
        x_mbd, aux_mb, targets_mb = varying(x_mbd), jax.tree.map(varying, aux_mb), jax.tree.map(varying, targets_mb)
        head_params = jax.tree.map(varying, head_params)
        zero_x = jnp.zeros_like(x_mbd[0])
        zero_p = jax.tree.map(jnp.zeros_like, params)
        zero_h = jax.tree.map(jnp.zeros_like, head_params)
        zero_loss = varying(jnp.zeros((), jnp.float32))

        def tick(carry, row):
            act_buf, grad_buf, grads, head_grads, loss, x_grads = carry
            kind, mb, slot, recv_act, recv_grad = (r[stage] for r in row)
            mb_, slot_ = jnp.maximum(mb, 0), jnp.maximum(slot, 0)
            # Stage 0 loads a microbatch's input into its slot when it runs the forward.
            load = is_first & (kind == FWD)
            act_buf = act_buf.at[slot_].set(jnp.where(load, x_mbd[mb_], act_buf[slot_]))
            x, cot = act_buf[slot_], grad_buf[slot_]
            target, aux = (jax.tree.map(lambda a: a[mb_], tree) for tree in (targets_mb, aux_mb))

            def idle():
                return zero_x, zero_x, zero_p, zero_h, zero_loss

            def forward():
                return stage_fn(params, x, aux), zero_x, zero_p, zero_h, zero_loss

            def pull_back():  # recompute the forward from the saved input, then pull the cotangent through it
                y, pull = jax.vjp(lambda p, x: stage_fn(p, x, aux), params, x)
                # The loss and its gradients are used on the last stage only (lax.cond would skip the head's work
                # elsewhere, but a branch on a stage-varying predicate must not hold the collectives of auto axes).
                mb_loss, (dhead, dloss_dy) = jax.value_and_grad(loss_fn, argnums=(0, 1))(head_params, y, target)
                dparams, dx = pull(jnp.where(is_last, dloss_dy.astype(y.dtype), cot))
                dhead = jax.tree.map(lambda g: jnp.where(is_last, g, 0), dhead)
                return dparams, dhead, dx, jnp.where(is_last, mb_loss, 0.0).astype(jnp.float32)

            def backward():  # split (ZB-H1): the input gradient only; XLA drops the unused weight gradient
                dparams, dhead, dx, mb_loss = pull_back()
                return zero_x, dx, zero_p if split else dparams, dhead, mb_loss

            def weight_grad():  # ZB-H1's deferred W unit: the weight gradient only
                dparams, _, _, _ = pull_back()
                return zero_x, zero_x, dparams, zero_h, zero_loss

            branches = [idle, forward, backward] + ([weight_grad] if split else [])
            act_out, cot_out, dparams, dhead, mb_loss = jax.lax.switch(kind, branches)
            grads = jax.tree.map(jnp.add, grads, dparams)
            head_grads = jax.tree.map(jnp.add, head_grads, dhead)
            loss = loss + mb_loss
            x_grads = x_grads.at[mb_].add(jnp.where(is_first & (kind == BWD), cot_out, 0).astype(jnp.float32))
            act_in = jax.lax.ppermute(act_out, "stage", fwd_perm)
            cot_in = jax.lax.ppermute(cot_out, "stage", bwd_perm)
            ra, rg = jnp.maximum(recv_act, 0), jnp.maximum(recv_grad, 0)
            act_buf = act_buf.at[ra].set(jnp.where(recv_act >= 0, act_in, act_buf[ra]))
            grad_buf = grad_buf.at[rg].set(jnp.where(recv_grad >= 0, cot_in, grad_buf[rg]))
            return (act_buf, grad_buf, grads, head_grads, loss, x_grads), None

        buf = varying(jnp.zeros((tabs.slots, *x_mbd.shape[1:]), x_mbd.dtype))
        # x's gradient is summed over stages in float32: XLA's CPU backend cannot compile a bfloat16 all-reduce here.
        carry = (buf, buf, zero_p, zero_h, zero_loss, varying(jnp.zeros(x_mbd.shape, jnp.float32)))
        (_, _, grads, head_grads, loss, x_grads), _ = jax.lax.scan(tick, carry, rows)
        grads = jax.tree.map(lambda a: a[None], grads)
        total = lambda tree: jax.tree.map(lambda a: jax.lax.psum(a, "stage"), tree)
        return total(loss), grads, total(head_grads), total(x_grads)

    return jax.shard_map(
        local, in_specs=(P("stage"), P(), P(), P(), P()), out_specs=(P(), P("stage"), P(), P()),
        axis_names=frozenset({"stage"}),
    )(stage_params, head_params, x_mbd, aux_mb, targets_mb)
