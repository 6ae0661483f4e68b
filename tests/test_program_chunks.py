"""Chunked replay (program/chunk.py): ``eg.jit`` runs a row-independent program block
by block along the batch axis.

The analysis accepts the seeds' and an MLP's programs, the steps their primitives'
batch rules keep apart (nn layers, reductions and indexing along other axes, a
NaN check guarded block by block), and rejects every program that mixes rows
(a sum over the batch broadcast back, a batch-norm-like mean, a reversal, a
cumsum or a pad along the batch, an einsum contracting the batch, a guard on
the batch's values, a batch axis meeting another axis of the same length);
the blocks' results equal the
whole-batch replay for random batch sizes and block lengths, tail blocks,
batches shorter than a block, float32, batched and unbatched constants and
outputs. On backends other than NumPy's the replay stays whole, and correct.
"""
import pickle
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import einsumgrad as eg
import einsumgrad.nn as nn
from einsumgrad.program import chunk, fuse, jit, make_program
from einsumgrad.pytree import flatten

from backends import NAME, npy, xb

CHUNKS = NAME == "numpy"  # other backends replay whole
TOL64 = dict(rtol=1e-12, atol=1e-12)
TOL32 = dict(rtol=2e-5, atol=2e-5)


def mlp(sizes, rng, act=eg.tanh, dtype=np.float64):
    params = [((rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype),
               (0.1 * rng.standard_normal(o)).astype(dtype))
              for i, o in zip(sizes[:-1], sizes[1:])]

    def f(x):
        for n, (w, b) in enumerate(params):
            x = eg.einsum("...i,oi->...o", x, xb(w)) + xb(b)
            x = act(x) if n < len(params) - 1 else x
        return x
    return f


def seed002(rng, dtype=np.float64):
    return eg.batch_jacobian(mlp([3, 16, 16, 3], rng, dtype=dtype))


def hessian(rng, dtype=np.float64):
    # its tangents reshaped to a new axis of length 1 before the last product
    f = mlp([3, 16, 1], rng, dtype=dtype)
    return eg.batch_hessian(lambda x: f(x).sum(-1))


def seed000(rng, dtype=np.float64):
    f = mlp([16, 32, 8], rng, dtype=dtype)
    return lambda x: eg.directional(f, 2)(x, x)


def leaves(out) -> list:
    return [npy(leaf) for leaf in flatten(out)[0]]


def assert_same(got, want, tol=TOL64, types=True) -> None:
    got_leaves, got_tree = flatten(got)
    want_leaves, want_tree = flatten(want)
    assert got_tree == want_tree
    for a, b in zip(got_leaves, want_leaves):
        assert type(a) is type(b) or not types
        a, b = npy(a), npy(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, **tol)


def replayed(p, rows, monkeypatch):
    """``p``'s replay as jit runs it with ``rows`` rows per block, and whether it is chunked."""
    monkeypatch.setenv("EINSUMGRAD_CHUNK", str(rows))
    run = chunk.plan_replay(p)
    return run or p.run, isinstance(run, chunk.Chunked)


def check_blocks(f, x, rows, monkeypatch, tol=TOL64, chunked=None) -> None:
    """``f``'s program replayed in blocks of ``rows`` equals its whole replay and ``f``."""
    p = make_program(f)(x)
    run, is_chunked = replayed(p, rows, monkeypatch)
    if chunked is not None:
        assert is_chunked == (chunked and CHUNKS)
    got = p.outputs_of(run([x]))
    assert_same(got, p.outputs_of(p.run([x])), tol)
    # f itself: the same values (a program gives Tensors where f's Tensors were)
    assert_same(got, f(x), dict(rtol=1e-9, atol=1e-9) if tol is TOL64 else tol, types=False)


# -- the analysis --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["seed000", "seed001", "seed002", "mlp", "relu_jacobian",
                                  "hessian"])
def test_the_seeds_and_an_mlp_are_row_independent(name, rng):
    f = {"seed000": seed000(rng), "seed002": seed002(rng),
         "mlp": mlp([5, 16, 16, 2], rng), "hessian": hessian(rng),
         # reverse mode: the basis eye(4) reshaped and broadcast along the batch
         "seed001": eg.batch_jacobian(mlp([12, 16, 4], rng, act=eg.relu)),
         "relu_jacobian": eg.batch_jacobian(mlp([3, 16, 8], rng, act=eg.relu))}[name]
    x = xb(rng.standard_normal((40, {"seed000": 16, "mlp": 5, "seed001": 12}.get(name, 3))))
    p = make_program(f)(x)
    found = chunk.batching(p)
    assert found is not None
    size, axes, _ = found
    assert size == 40 and axes[p.inputs[0]] == 0
    assert axes[p.outputs[0].slot] == 0


def test_the_seed002_program_has_a_batched_constant_uniform_along_the_batch(rng, monkeypatch):
    # the Jacobian's basis, folded with the first layer's weight: [3, B, 16] (unfused: a
    # fused kernel reads it as [3, 1, 16], unbatched)
    monkeypatch.setattr(fuse, "available", lambda: False)
    p = make_program(seed002(rng))(xb(rng.standard_normal((40, 3))))
    _, _, consts = chunk.batching(p)
    assert consts and all(uniform for _, uniform in consts.values())


MIXING = {
    "sum over the batch, broadcast back": lambda x: eg.tanh(x) * x.sum(0),
    "batch-norm-like mean": lambda x: (x - x.mean(0)) * eg.tanh(x),
    "reversed along the batch": lambda x: eg.tanh(x)[::-1],
    "einsum contracting the batch": lambda x: eg.einsum("bi,bj,ck->ck", x, x, x),
    "gram of the rows": lambda x: eg.einsum("bi,ci->bc", x, x),
    "batch meets an axis of its length": lambda x: eg.einsum("ij,jk->ik", x, x),
    "transpose, same length": lambda x: x * eg.einsum("ij->ji", x),
    "softmax over the batch": lambda x: eg.softmax(x, axis=0),
    "reshape of the batch": lambda x: eg.tanh(x).reshape(4, 16),
    "reshape of the batch into an axis of its length": lambda x: eg.tanh(x).reshape(2, 4, 8),
    "cumsum along the batch": lambda x: eg.cumsum(eg.tanh(x), axis=0),
    "variance over the batch": lambda x: eg.var(x, axis=0) * x,
    "a row picked for every row": lambda x: eg.tanh(x)[:1] * x,
    "rows rolled": lambda x: eg.concatenate([x[1:], x[:1]], axis=0),
    "padded along the batch": lambda x: eg.pad(x, ((1, 0), (0, 0)))[:8],
    "max over the batch": lambda x: eg.max(x, axis=0) + x,
    "logsumexp over the batch": lambda x: eg.logsumexp(x, axis=0, keepdims=True) + x,
}


@pytest.mark.parametrize("name", list(MIXING))
def test_programs_mixing_rows_are_rejected(name, rng, monkeypatch):
    x = xb(rng.standard_normal((8, 8)))  # the batch has the length of the other axis
    f = MIXING[name]
    p = make_program(f)(x)
    assert chunk.batching(p) is None
    run, chunked = replayed(p, 3, monkeypatch)
    assert not chunked
    assert_same(p.outputs_of(run([x])), f(x), dict(rtol=1e-9, atol=1e-9))


def test_a_guard_on_a_value_of_the_batch_disqualifies(rng):
    # max's rule checks its maximum for NaN: a flag over the batch, checked block by block
    g = lambda x: eg.grad(lambda a: eg.max(a, axis=1).sum())(x)
    p = make_program(g)(xb(rng.standard_normal((6, 4))))
    guards = [eq for eq in p.eqs if eq.op[0] == "guard"]
    assert guards
    assert chunk.batching(p) is not None
    # the same guard on a batched value itself (not a flag over it): rows would meet
    axes = {s: 0 for s in p.inputs}
    on_value = [eq for eq in p.eqs if eq.op == ("backend", NAME, "isnan")][0].args[0].slot
    axes[on_value] = 0
    from einsumgrad.program.trace import Eq, Ref
    guard = Eq(guards[0].op, None, (Ref(on_value),), guards[0].kwargs, ())
    assert chunk._step_axis(guard, axes, p.avals, 6) is False


def _flag_program(use: str, expected: bool = False, name: str = "any"):
    """x -> y = tanh(x) with ``flag = x.any()`` (or ``all``) read by a guard expecting
    ``expected``, or by an element-wise product (``use="data"``), or returned."""
    from types import SimpleNamespace
    from einsumgrad.program.trace import Eq, Ref
    eqs = [Eq(("prim", "tanh"), np.tanh, (Ref(0),), {}, (1,)),
           Eq(("method", name), None, (Ref(0),), {}, (2,), scalar=True)]
    outputs = [Ref(1)]
    if use == "guard":
        eqs.append(Eq(("guard", "bool"), None, (Ref(2),), {"args": (), "expected": expected,
                                                          "where": "here"}, ()))
    elif use == "data":
        eqs.append(Eq(("ufunc", np.multiply, "__call__"), np.multiply, (Ref(1), Ref(2)), {}, (3,)))
        outputs = [Ref(3)]
    else:
        outputs.append(Ref(2))
    avals = {0: ((6, 4), np.float64), 1: ((6, 4), np.float64), 2: ((), np.bool_),
             3: ((6, 4), np.float64)}
    return SimpleNamespace(inputs=[0], consts={}, eqs=eqs, avals=avals, outputs=outputs)


def test_a_flag_over_the_batch_is_read_by_a_guard_expecting_none_or_disqualifies():
    # any() over the batch is False where every block's is; all() True likewise
    axes = chunk.batch_axes(_flag_program("guard", False), 6, {0: 0})
    assert axes is not None and axes[1] == 0 and 2 not in axes
    assert chunk.batch_axes(_flag_program("guard", True, "all"), 6, {0: 0}) is not None
    # one block's True is not every block's; the flag as data or as a result mixes rows
    assert chunk.batch_axes(_flag_program("guard", True), 6, {0: 0}) is None
    assert chunk.batch_axes(_flag_program("guard", False, "all"), 6, {0: 0}) is None
    assert chunk.batch_axes(_flag_program("data"), 6, {0: 0}) is None
    assert chunk.batch_axes(_flag_program("output"), 6, {0: 0}) is None
    # of an unbatched value: the same in every block
    assert chunk.batch_axes(_flag_program("data"), 6, {}) is not None


def test_broadcast_to_follows_the_batch_axis_or_stays_whole():
    from einsumgrad.program.trace import Eq, Ref

    def axis(x_shape, x_axis, shape):
        eq = Eq(("backend", "numpy", "broadcast_to"), np.broadcast_to, (Ref(0), shape), {}, (1,))
        return chunk._step_axis(eq, {0: x_axis}, {0: (x_shape, "f8"), 1: (shape, "f8")}, 8)
    assert axis((1, 8), None, (8, 8)) == 0  # one new axis of the batch's length
    assert axis((8,), None, (3, 8, 8)) == 1
    assert axis((1, 1), None, (8, 8)) is None  # two: unbatched, whole in every block
    assert axis((3,), None, (8, 3)) == 0
    assert axis((8, 1), 0, (8, 8)) == 0  # a batched value keeps its axis
    assert axis((8,), 0, (3, 8)) == 1
    assert axis((8,), 0, (8, 8)) == 1
    assert axis((1,), 0, (8, 8)) is False  # a batch axis that is not the batch's length


def test_a_reshape_keeps_the_batch_axis_an_axis_of_its_own_or_disqualifies():
    from einsumgrad.program.trace import Eq, Ref

    def axis(x_shape, x_axis, shape):
        eq = Eq(("prim", "reshape"), None, (Ref(0),), {"shape": shape}, (1,))
        return chunk._step_axis(eq, {0: x_axis}, {0: (x_shape, "f8"), 1: (shape, "f8")}, 8)
    assert axis((3, 8, 4), 1, (3, 1, 8, 2, 2)) == 2  # before and after it, apart
    assert axis((8, 4, 2), 0, (8, 8)) == 0
    assert axis((3, 4), None, (12,)) is None  # unbatched
    assert axis((8, 8), 0, (2, 4, 8)) is False  # the batch split, the 8 left is a feature
    assert axis((2, 8, 4), 1, (16, 4)) is False  # merged with the axis before it
    assert axis((8, 2, 4), 0, (4, 16)) is False


def test_an_unbatched_operand_may_broadcast_but_not_carry_the_batch(rng, monkeypatch):
    x = xb(rng.standard_normal((8, 8)))
    c = xb(rng.standard_normal((1, 8)))
    assert chunk.batching(make_program(lambda x: x * c + 1.0)(x)) is not None
    w = xb(rng.standard_normal(8))  # its one axis aligns with x's last, not the batch
    assert chunk.batching(make_program(lambda x, w: eg.tanh(x) * w)(x, w)) is not None
    v = xb(rng.standard_normal((8, 1)))  # an input of the batch's length: batched itself
    p = make_program(lambda x, v: x * v)(x, v)
    assert chunk.batching(p) is not None
    # v's rows meet x's columns: v is taken whole in every block, x in blocks of rows
    f = lambda x, v: x * eg.einsum("ij->ji", v)
    p = make_program(f)(x, v)
    size, axes, _ = chunk.batching(p)
    assert axes[p.inputs[0]] == 0 and axes[p.inputs[1]] is None
    run, chunked = replayed(p, 3, monkeypatch)
    assert chunked == CHUNKS
    assert_same(p.outputs_of(run([x, v])), f(x, v), types=False)
    # both batched and meeting as an outer product: no choice keeps rows apart
    u = xb(rng.standard_normal(8))
    assert chunk.batching(make_program(lambda u: eg.einsum("i,j->ij", u, u))(u)) is None


# -- the replay: equal to the whole replay -------------------------------------------------

@settings(max_examples=25)
@given(batch=st.integers(1, 200), rows=st.integers(1, 90), which=st.sampled_from(
    ["seed000", "seed001", "seed002", "mlp", "relu_jacobian", "hessian"]), f32=st.booleans(),
    seed=st.integers(0, 2**16))
def test_blocks_equal_the_whole_replay(batch, rows, which, f32, seed):
    rng = np.random.default_rng(seed)
    dtype = np.float32 if f32 else np.float64
    f = {"seed000": seed000, "seed002": seed002, "hessian": hessian,
         "mlp": lambda rng, dtype: mlp([4, 8, 3], rng, dtype=dtype),
         # relu's derivative: NumPy ufuncs the rule calls, one writing in place
         "relu_jacobian": lambda rng, dtype: eg.batch_jacobian(
             mlp([3, 8, 5], rng, act=eg.relu, dtype=dtype)),
         "seed001": lambda rng, dtype: eg.batch_jacobian(
             mlp([9, 8, 3], rng, act=eg.relu, dtype=dtype))}[which](rng, dtype)
    x = xb(rng.standard_normal((batch, {"seed000": 16, "mlp": 4, "seed001": 9}.get(which, 3)))
           .astype(dtype))
    # a batch of a feature's length meets that axis (the basis has both): maybe whole
    sizes = {"seed000": (16, 32, 8), "seed002": (3, 16), "hessian": (3, 16), "mlp": (4, 8, 3),
             "relu_jacobian": (3, 8, 5), "seed001": (9, 8, 3)}[which]
    with pytest.MonkeyPatch.context() as mp:
        check_blocks(f, x, rows, mp, tol=TOL32 if f32 else TOL64,
                     chunked=rows < batch if batch not in sizes else None)


def test_tail_blocks_and_even_splits():
    assert chunk.split(1001, 300) == [251, 250, 250, 250]
    assert chunk.split(900, 300) == [300, 300, 300]
    assert chunk.split(5, 2) == [2, 2, 1]
    for size in range(1, 60):
        for rows in range(1, size + 1):
            parts = chunk.split(size, rows)
            assert sum(parts) == size and max(parts) <= rows and max(parts) - min(parts) <= 1


def test_tail_block_and_a_batch_shorter_than_a_block(rng, monkeypatch):
    f = seed002(rng)
    check_blocks(f, xb(rng.standard_normal((103, 3))), 25, monkeypatch, chunked=True)
    check_blocks(f, xb(rng.standard_normal((20, 3))), 25, monkeypatch, chunked=False)


def test_float32(rng, monkeypatch):
    x = xb(rng.standard_normal((300, 16)).astype(np.float32))
    f = seed000(rng, np.float32)
    p = make_program(f)(x)
    run, _ = replayed(p, 64, monkeypatch)
    (got,) = run([x])
    assert got.dtype == np.float32
    check_blocks(f, x, 64, monkeypatch, tol=TOL32, chunked=True)


def test_batched_constants_uniform_or_not_and_unbatched_outputs(rng, monkeypatch):
    B = 50
    rows_c = xb(rng.standard_normal((B, 4)))  # a constant with a row per batch row
    flat_c = xb(np.broadcast_to(rng.standard_normal(4), (B, 4)).copy())  # uniform along it
    w = xb(rng.standard_normal((4, 4)))

    def f(x, v):
        h = eg.tanh(eg.einsum("bi,ij->bj", x, w) * rows_c + flat_c)
        return {"h": h, "v2": v * 2.0, "w": w, "n": 3, "both": (h, eg.exp(v))}
    x, v = xb(rng.standard_normal((B, 4))), xb(rng.standard_normal(7))
    p = make_program(f)(x, v)
    found = chunk.batching(p)
    assert found is not None
    size, axes, consts = found
    assert sorted(u for _, u in consts.values()) == [False, True]
    run, chunked = replayed(p, 16, monkeypatch)
    assert chunked == CHUNKS
    got = p.outputs_of(run([x, v]))
    assert_same(got, p.outputs_of(p.run([x, v])))
    assert got["n"] == 3


def test_an_output_that_is_the_input_and_one_read_twice(rng, monkeypatch):
    f = lambda x: (x, eg.tanh(x), eg.tanh(x))
    check_blocks(f, xb(rng.standard_normal((30, 3))), 7, monkeypatch, chunked=True)


# -- through eg.jit ------------------------------------------------------------------------

def test_jit_replays_in_blocks_equal_to_the_whole_replay(rng, monkeypatch):
    f = seed002(rng)
    x = xb(rng.standard_normal((257, 3)))
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "0")
    whole = jit(f)
    whole(x)
    want = whole(x)
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "40")
    j = jit(f)
    j(x)  # the trace
    got = j(x)  # a replay, in blocks
    assert j.traces == 1
    assert_same(got, want)
    p = j.program(x)
    (run,) = [r for q, r in j.programs.values() if q is p]  # the replay jit keeps beside it
    assert isinstance(run, chunk.Chunked) == CHUNKS
    (run,) = [r for _, r in whole.programs.values()]
    assert not isinstance(run, (chunk.Chunked, chunk.Raced))
    # the program itself is unchanged: it prints, emits and pickles as before
    q = pickle.loads(pickle.dumps(p))
    assert str(q) == str(p) and q.source() == p.source()
    assert_same(q(x), want)


def test_the_switch_turns_chunking_off(rng, monkeypatch):
    p = make_program(seed002(rng))(xb(rng.standard_normal((100, 3))))
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "0")
    assert chunk.plan_replay(p) is None
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "10")
    assert isinstance(chunk.plan_replay(p), chunk.Chunked) == CHUNKS


def test_small_programs_run_whole_and_large_ones_in_blocks(rng, monkeypatch):
    monkeypatch.delenv("EINSUMGRAD_CHUNK", raising=False)
    f = seed002(rng)
    small = make_program(f)(xb(rng.standard_normal((64, 3))))
    assert chunk.plan_replay(small) is None
    big = make_program(f)(xb(rng.standard_normal((20000, 3))))
    size, axes, _ = chunk.batching(big)
    live, total = chunk.row_bytes(big, axes, size)
    assert 0 < live <= total
    rows = chunk.block_rows(big, axes, size)
    assert rows is not None and rows * live <= max(chunk.BLOCK_BYTES, chunk.MIN_ROWS * live)
    assert isinstance(chunk.plan_replay(big), chunk.Raced) == CHUNKS


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
def test_blocks_in_turn_fit_a_cores_cache_and_one_core_races_smaller_programs(rng, monkeypatch):
    """The blocks in turn hold SERIAL_BLOCK_BYTES of live intermediates, those shared
    among a thread per core BLOCK_BYTES; a program of between SERIAL_MIN_BYTES and
    MIN_BYTES in all races its blocks on one core only."""
    monkeypatch.delenv("EINSUMGRAD_CHUNK", raising=False)
    f = seed002(rng)
    mid = make_program(f)(rng.standard_normal((5000, 3)))
    size, axes, _ = chunk.batching(mid)
    live, total = chunk.row_bytes(mid, axes, size)
    assert chunk.SERIAL_MIN_BYTES <= total * size < chunk.MIN_BYTES
    monkeypatch.setattr(chunk, "cores", lambda: 2)
    assert chunk.plan_replay(mid) is None
    monkeypatch.setattr(chunk, "cores", lambda: 1)
    race = chunk.plan_replay(mid)
    assert isinstance(race, chunk.Raced) and race.parallel is None
    rows = race.chunked.lengths[0]
    assert chunk.MIN_ROWS <= rows and rows * live <= chunk.SERIAL_BLOCK_BYTES
    monkeypatch.setattr(chunk, "cores", lambda: 2)
    big = make_program(f)(rng.standard_normal((40000, 3)))
    race = chunk.plan_replay(big)
    serial, shared = race.chunked.lengths[0], race.parallel.lengths[0]
    assert serial * live <= chunk.SERIAL_BLOCK_BYTES < shared * live <= chunk.BLOCK_BYTES
    x = rng.standard_normal((40000, 3))
    for a, b in zip(race.chunked([x]), race.parallel([x])):  # blocks of two sizes, one answer
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
@pytest.mark.parametrize("chunked_faster", [True, False])
def test_the_race_keeps_the_faster_replay(chunked_faster, rng, monkeypatch):
    monkeypatch.delenv("EINSUMGRAD_CHUNK", raising=False)
    x = rng.standard_normal((20000, 3))
    p = make_program(seed002(rng))(x)
    race = chunk.plan_replay(p)
    assert isinstance(race, chunk.Raced)
    assert (race.parallel is not None) == (chunk.cores() > 1)
    race = chunk.Raced(race.whole, race.chunked)  # two sides here; three below
    calls = []
    whole, blocks = race.whole, race.chunked
    race.whole = lambda *values: calls.append("whole") or whole(*values)
    race.chunked = lambda values: calls.append("chunked") or blocks(values)
    slow, fast = 10.0, 1.0
    ticks = []  # a fake clock: odd reads start a call, even ones end it, fast on one side

    def fake():
        ticks.append(None)
        k = len(ticks)
        if k % 2:  # a call starts
            return 100.0 * k
        took = fast if (calls[-1] == "chunked") == chunked_faster else slow
        return 100.0 * (k - 1) + took
    monkeypatch.setattr(chunk.time, "perf_counter", fake)
    want = p.run([x])
    for _ in range(2 * chunk.Raced.TRIES):
        assert_same(p.outputs_of(race([x])), p.outputs_of(want))
    assert calls == ["whole", "chunked"] * chunk.Raced.TRIES
    monkeypatch.undo()
    race([x])
    assert calls[-1] == ("chunked" if chunked_faster else "whole")


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
def test_the_race_tries_the_slower_side_now_and_then_and_follows_a_change(rng, monkeypatch):
    monkeypatch.delenv("EINSUMGRAD_CHUNK", raising=False)
    x = rng.standard_normal((20000, 3))
    p = make_program(seed002(rng))(x)
    race = chunk.plan_replay(p)
    race = chunk.Raced(race.whole, race.chunked)
    calls = []
    whole, blocks = race.whole, race.chunked
    race.whole = lambda *values: calls.append("whole") or whole(*values)
    race.chunked = lambda values: calls.append("chunked") or blocks(values)
    took = {"whole": 1.0, "chunked": 5.0}
    clock = [0.0]

    def fake():  # each read after a call has started adds that call's time
        clock[0] += took[calls[-1]] if len(calls) > fake.seen else 0.0
        fake.seen = len(calls)
        return clock[0]
    fake.seen = 0
    monkeypatch.setattr(chunk.time, "perf_counter", fake)
    n = 4 * chunk.Raced.EVERY
    for _ in range(n):
        race([x])
    assert calls.count("whole") > calls.count("chunked") >= chunk.Raced.TRIES + 2
    took.update(whole=9.0, chunked=1.0)  # the other side became the faster
    calls.clear()
    for _ in range(n):
        race([x])
    # the slower side's turn: TRIES calls in a row, once in EVERY calls at most
    assert calls[-chunk.Raced.EVERY:].count("chunked") >= chunk.Raced.EVERY - chunk.Raced.TRIES - 1


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
def test_blocks_on_a_thread_per_core_equal_blocks_in_turn_and_can_win_the_race(rng, monkeypatch):
    monkeypatch.delenv("EINSUMGRAD_CHUNK", raising=False)
    x = rng.standard_normal((20000, 3))
    p = make_program(seed002(rng))(x)
    size, axes, consts = chunk.batching(p)
    rows = chunk.block_rows(p, axes, size)
    seq = chunk.Chunked(p, size, axes, consts, rows)
    par = seq.on_threads(3)  # more threads than blocks too
    assert len(seq.lengths) > 3
    for a, b in zip(par([x]), seq([x])):  # the same blocks: the same bits
        np.testing.assert_array_equal(a, b)
    race = chunk.Raced(p._compile(), seq, par)
    calls = []
    race.whole = lambda *v, w=race.whole: calls.append("whole") or w(*v)
    race.chunked = lambda v, c=seq: calls.append("chunked") or c(v)
    race.parallel = lambda v, c=par: calls.append("parallel") or c(v)
    took = {"whole": 5.0, "chunked": 3.0, "parallel": 1.0}
    ticks = []  # a fake clock: odd reads start a call, even ones end it

    def fake():
        ticks.append(None)
        k = len(ticks)
        return 100.0 * k if k % 2 else 100.0 * (k - 1) + took[calls[-1]]
    monkeypatch.setattr(chunk.time, "perf_counter", fake)
    for _ in range(3 * chunk.Raced.TRIES):
        race([x])
    monkeypatch.undo()
    assert calls == ["whole", "chunked", "parallel"] * chunk.Raced.TRIES
    race([x])
    assert calls[-1] == "parallel"


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
def test_a_worker_error_reaches_the_caller(rng):
    p = make_program(seed002(rng))(rng.standard_normal((2000, 3)))
    size, axes, consts = chunk.batching(p)
    par = chunk.Chunked(p, size, axes, consts, 100, workers=2)
    boom = RuntimeError("a block failed")

    def failing(*args):
        raise boom
    par.runs = {n: failing for n in par.runs}
    with pytest.raises(RuntimeError, match="a block failed"):
        par([rng.standard_normal((2000, 3))])


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
def test_blas_thread_counts_are_restored(rng, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    p = make_program(seed002(rng))(rng.standard_normal((100, 3)))
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "10")
    run = chunk.plan_replay(p)
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
    seen = []
    blocks = run.runs  # the block programs, by length
    for n, block in list(blocks.items()):
        def spy(*args, block=block):
            seen.append([c.get_num_threads() for c in chunk.one_thread.libs])
            return block(*args)
        blocks[n] = spy
    run([rng.standard_normal((100, 3))])
    assert seen and all(set(s) == {1} for s in seen)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == before


def test_the_pool_threads_run_mkl_on_themselves_alone():
    # MKL's thread count is per thread (OpenMP's): the limit one_thread sets in the
    # calling thread does not reach a pool thread, which sets its own at start.
    from einsumgrad.backends import mkl, threads
    if mkl.matmul is None:
        pytest.skip("the mkl wheel is not installed")
    with threads.one_thread:
        assert threads.pool(2).submit(mkl.gemm_threads).result() == 1
    assert threads.pool(2).submit(mkl.gemm_threads).result() == 1  # and after it


def test_a_replay_does_not_keep_its_program_alive(rng, monkeypatch):
    import gc
    import weakref
    for rows, batch in (("0", 60), ("20", 60), (None, 20000)):  # whole, blocks, a race
        if rows is None:
            monkeypatch.delenv("EINSUMGRAD_CHUNK")
        else:
            monkeypatch.setenv("EINSUMGRAD_CHUNK", rows)
        x = xb(rng.standard_normal((batch, 3)))
        p = make_program(seed002(rng))(x)
        run = chunk.replayer(p)
        assert_same(run([x]), p.run([x]))
        ref = weakref.ref(p)
        del p
        gc.collect()
        assert ref() is None
        run([x])  # it runs on what it holds


@pytest.mark.skipif(not CHUNKS, reason="chunked replay runs on NumPy's backend only")
def test_a_whole_replay_past_its_memory_bound_is_not_raced(rng, monkeypatch):
    monkeypatch.delenv("EINSUMGRAD_CHUNK", raising=False)
    x = rng.standard_normal((20000, 3))
    p = make_program(seed002(rng))(x)
    assert "whole" in chunk.plan_replay(p).sides
    monkeypatch.setattr(chunk, "WHOLE_BYTES", 1 << 20)  # below the program's live intermediates
    run = chunk.plan_replay(p)
    assert isinstance(run, chunk.Chunked) or "whole" not in run.sides
    want, calls = p.run([x]), []
    monkeypatch.setattr(p, "_run", lambda *v: calls.append(v))
    for _ in range(4 * chunk.Raced.TRIES):
        assert_same(run([x]), want)
    assert not calls  # never the whole replay


# -- a long batch traced on a block of its rows ---------------------------------------------

TRACED = sys.modules["einsumgrad.program.jit"]


@pytest.fixture
def short_rows(monkeypatch):
    """Batches from 64 rows traced on blocks of 7; the traces that ran so far: ``"rows"``
    for one on a block, ``"whole"``, ``"unproved"`` for one on a block given up."""
    monkeypatch.setattr(chunk, "TRACE_MIN_ROWS", 64)
    monkeypatch.setattr(chunk, "TRACE_ROWS", 7)
    runs, trace = [], TRACED._trace

    def spy(*args):
        rows = args[7] if len(args) > 7 else None
        try:
            got = trace(*args)
        except eg.TraceError:
            raise
        except BaseException:
            runs.append("unproved")
            raise
        runs.append("whole" if rows is None else "rows")
        return got
    monkeypatch.setattr(TRACED, "_trace", spy)
    return runs


def whole_program(f, *args, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(chunk, "TRACE_MIN_ROWS", 10**12)
        return make_program(f)(*args)


ROW_WISE = {
    "seed000": (seed000, 16), "seed002": (seed002, 3),
    "seed001": (lambda rng: eg.batch_jacobian(mlp([12, 16, 4], rng, act=eg.relu)), 12),
    "mlp": (lambda rng: mlp([5, 16, 16, 2], rng), 5),
    "vmap of jacrev": (lambda rng: eg.vmap(eg.jacrev(mlp([3, 8, 2], rng))), 3),
    "batch_hessian": (hessian, 3),
    "softmax classifier's Jacobian": (lambda rng: log_softmax_jacobian(mlp([4, 8, 3], rng)), 4),
    # the loss, a sum over the batch, is recorded uncomputed: the gradient never reads it
    "a sum's gradient": (lambda rng: eg.grad(lambda x: (eg.tanh(x) ** 2).sum()), 3),
    "element-wise derivatives (seed 004)": (
        lambda rng: eg.elementwise_grad(lambda k: 3.0 * k + 6.0 * k ** 2), 2),
    # pad's VJP takes the batch axis, not padded, whole
    "a padded value's gradient": (lambda rng: eg.grad(
        lambda x: (eg.pad(eg.tanh(x), ((0, 0), (1, 2))) ** 2).sum()), 3),
}


def log_softmax_jacobian(f):
    return eg.batch_jacobian(lambda x: eg.log_softmax(f(x)))


@pytest.mark.parametrize("name", list(ROW_WISE))
def test_a_long_batch_is_traced_on_a_block_into_the_batchs_own_program(name, rng, short_rows,
                                                                      monkeypatch):
    make, width = ROW_WISE[name]
    f = make(rng)
    x = xb(rng.standard_normal((150, width)))
    p = make_program(f)(x)
    assert short_rows == (["rows"] if CHUNKS else ["whole"])
    q = whole_program(f, x, monkeypatch=monkeypatch)
    assert str(p) == str(q) and p.source() == q.source()
    assert_same(p(x), q(x))
    j = jit(f)
    assert_same(j(x), f(x), dict(rtol=1e-12, atol=1e-12), types=False)  # the first call
    assert_same(j(x), f(x), dict(rtol=1e-12, atol=1e-12), types=False)
    assert j.traces == 1


LONG_MIXING = {
    **{k: v for k, v in MIXING.items() if not k.startswith("reshape")},
    "reshape of the batch": lambda x: eg.tanh(x).reshape(-1),
    "reshape of the batch into an axis of its length": lambda x: eg.tanh(x).reshape(2, 48, 96),
    "a summed loss returned with its gradient": eg.value_and_grad(
        lambda x: (eg.tanh(x) ** 2).sum()),
    # the mean's count of kept labels, float() of a sum over the batch: a guard on it
    "a guard in a rule": lambda x: eg.grad(lambda a: eg.nn.functional.cross_entropy(
        a, xb(np.arange(96) % 7)))(x),
    "caught by except Exception": lambda x: _swallow(x),
}


def _swallow(x):
    try:
        y = eg.tanh(x) * x.sum(0)
    except Exception:  # must not catch the trace's own signal to start again
        y = x
    return y


@pytest.mark.parametrize("name", list(LONG_MIXING))
def test_a_trace_on_a_block_starts_again_whole_where_rows_meet(name, rng, short_rows,
                                                               monkeypatch):
    f = LONG_MIXING[name]
    x = xb(rng.standard_normal((96, 96)))  # the batch has the length of the other axis
    p = make_program(f)(x)
    assert short_rows == (["unproved", "whole"] if CHUNKS else ["whole"])
    assert str(p) == str(whole_program(f, x, monkeypatch=monkeypatch))
    assert_same(jit(f)(x), f(x), dict(rtol=1e-9, atol=1e-9), types=False)


def test_a_whole_value_of_the_batchs_length_is_cut_where_rows_meet_it_else_kept_whole(
        rng, short_rows, monkeypatch):
    x = xb(rng.standard_normal((96, 96)))  # the batch has the length of the other axis
    down = xb(rng.standard_normal((96, 1)))  # along the batch: cut to the block
    across = xb(rng.standard_normal(96))     # along x's columns: whole in the block
    f = lambda x: eg.tanh(x) * down + across
    p = make_program(f)(x)
    assert short_rows == (["rows"] if CHUNKS else ["whole"])
    assert str(p) == str(whole_program(f, x, monkeypatch=monkeypatch))
    assert_same(jit(f)(x), f(x), dict(rtol=1e-12, atol=1e-12), types=False)


def test_the_function_sees_the_batchs_shapes_on_a_block(rng, short_rows):
    def f(x):
        assert len(x) == 150 and x.shape == (150, 3) and x.size == 450
        return eg.tanh(x) * (2.0 if x.shape[0] > 100 else 3.0)
    x = xb(rng.standard_normal((150, 3)))
    assert_same(jit(f)(x), 2.0 * np.tanh(npy(x)), types=False)
    assert short_rows == (["rows"] if CHUNKS else ["whole"])


def test_a_value_leaving_for_python_is_still_an_error_on_a_block(rng, short_rows):
    x = xb(rng.standard_normal((150, 3)))
    with pytest.raises(eg.TraceError, match="branch"):
        make_program(lambda x: x * 2 if (x.sum() > 0) else x)(x)


@pytest.mark.skipif(not CHUNKS, reason="a trace on a block runs on NumPy's backend only")
def test_a_trace_on_a_block_computes_a_block_and_its_first_call_a_replay(rng):
    import tracemalloc
    f = seed002(rng)
    x = rng.standard_normal((50000, 3))  # a batched intermediate: 50000 * 3 * 16 * 8 = 19 MB
    tracemalloc.start()
    try:
        make_program(f)(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert_same(jit(f)(x), f(x), dict(rtol=1e-12, atol=1e-12), types=False)


def per_sample_grads(rng):
    w2 = xb(rng.standard_normal((3, 8)) / 3)

    def loss(w, x, y):
        return ((eg.einsum("i,oi->o", eg.tanh(eg.einsum("i,oi->o", x, w)), w2) - y) ** 2).sum()
    return eg.vmap(eg.grad(loss), in_axes=(None, 0, 0))


def test_per_sample_gradients_keep_rows_apart_the_weights_broadcast_along_the_batch(
        rng, short_rows, monkeypatch):
    f = per_sample_grads(rng)
    w = xb(rng.standard_normal((8, 5)) / 3)
    x, y = xb(rng.standard_normal((150, 5))), xb(rng.standard_normal((150, 3)))
    p = make_program(f)(w, x, y)  # vmap broadcasts w to every example: a primitive's broadcast
    assert short_rows == (["rows"] if CHUNKS else ["whole"])
    assert str(p) == str(whole_program(f, w, x, y, monkeypatch=monkeypatch))
    size, axes, _ = chunk.batching(p)
    assert size == 150 and axes[p.inputs[0]] is None and axes[p.outputs[0].slot] == 0
    run, chunked = replayed(p, 40, monkeypatch)
    assert chunked == CHUNKS
    assert_same(p.outputs_of(run([w, x, y])), p.outputs_of(p.run([w, x, y])))
    assert_same(p(w, x, y), f(w, x, y), dict(rtol=1e-12, atol=1e-12), types=False)


# -- steps proved by their primitives' batch rules -------------------------------------------

def on_backend(module):
    return module.to(eg.backends.backend_of(xb(np.zeros(1))))


def linear_gelu_norm(rng):
    nn.manual_seed(0)
    lin, norm = on_backend(nn.Linear(6, 6)), on_backend(nn.LayerNorm(6))
    return lambda x: norm(eg.gelu(lin(x)))


def attention(rng):
    nn.manual_seed(0)
    return on_backend(nn.MultiheadAttention(6, 2))


def conv_relu_pool(rng):
    nn.manual_seed(0)
    return on_backend(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))


BY_RULES = {  # (f, an example's shape): each keeps rows apart along axis 0
    "nn.Linear, GELU, LayerNorm": (linear_gelu_norm, (6,)),
    "where and clip": (lambda rng: lambda x: eg.clip(eg.where(x > 0, x, 0.1 * x), -0.5, 0.5),
                       (6,)),
    "reductions along the features": (lambda rng: lambda x: (
        eg.std(x, axis=1, keepdims=True) * x + eg.var(x, axis=1)[:, None]
        + eg.logsumexp(x, axis=1, keepdims=True) * eg.prod(x, axis=1, keepdims=True)), (6,)),
    "max along the features": (lambda rng: lambda x: eg.max(x, axis=1, keepdims=True) * x,
                               (6,)),
    "cumsum, flip and a slice of the features": (
        lambda rng: lambda x: eg.cumsum(eg.tanh(x), axis=1)[:, ::-1][:, 1:5], (6,)),
    "features joined and padded": (lambda rng: lambda x: eg.pad(
        eg.concatenate([x, eg.tanh(x)], axis=1), ((0, 0), (1, 2))), (6,)),
    "float32 and back": (lambda rng: lambda x: eg.tanh(x.astype(np.float32)).astype(np.float64),
                         (6,)),
    "attention over each example's tokens": (attention, (5, 6)),
    # the patches: a buffer of the batch's rows, written and viewed strided
    "convolution, ReLU, max pooling": (conv_relu_pool, (2, 6, 6)),
}


@pytest.mark.parametrize("jacobian", [False, True])
@pytest.mark.parametrize("name", list(BY_RULES))
def test_steps_keep_rows_apart_by_their_primitives_batch_rules(name, jacobian, rng, monkeypatch):
    make, shape = BY_RULES[name]
    f = make(rng)
    f = eg.batch_jacobian(f) if jacobian else f
    x = xb(rng.standard_normal((40, *shape)))
    p = make_program(f)(x)
    found = chunk.batching(p)
    assert found is not None and found[1][p.outputs[0].slot] == 0
    tol = dict(rtol=2e-5, atol=2e-5) if "float32" in name else TOL64
    check_blocks(f, x, 16, monkeypatch, tol, chunked=True)


@pytest.mark.parametrize("name", list(BY_RULES))
def test_a_trace_on_a_block_follows_the_batch_rules(name, rng, short_rows, monkeypatch):
    make, shape = BY_RULES[name]
    f = make(rng)
    x = xb(rng.standard_normal((150, *shape)))
    p = make_program(f)(x)
    assert short_rows == (["rows"] if CHUNKS else ["whole"])
    assert str(p) == str(whole_program(f, x, monkeypatch=monkeypatch))
    tol = dict(rtol=2e-5, atol=2e-5) if "float32" in name else dict(rtol=1e-12, atol=1e-12)
    assert_same(jit(f)(x), f(x), tol, types=False)


@pytest.mark.parametrize("where", [3, 100])  # in the traced block, or past it
def test_a_guard_the_block_guessed_is_checked_on_the_batch(where, rng, short_rows, monkeypatch):
    # clip's rule branches on x having a NaN: the block's answer (none) is the batch's
    # only where the batch has none, which the program's replay checks
    f = eg.batch_jacobian(lambda x: eg.clip(x, -0.5, 0.5))
    x = rng.standard_normal((150, 4))
    x[where, 2] = np.nan
    x = xb(x)
    p = make_program(f)(x)
    nan = dict(rtol=1e-12, atol=1e-12, equal_nan=True)
    assert_same(p(x), f(x), nan, types=False)  # no TraceError: its guards hold for x
    assert short_rows == ((["rows"] if where < 7 else ["rows", "whole"]) if CHUNKS else ["whole"])
    j = jit(f)
    assert_same(j(x), f(x), nan, types=False)
    clean = xb(rng.standard_normal((150, 4)))
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "16")  # the clean program, in blocks
    assert_same(j(clean), f(clean), nan, types=False)
    assert_same(j(clean), f(clean), nan, types=False)
    assert_same(j(x), f(x), nan, types=False)  # a block's NaN: the guard fails, traced again


def cnn_per_sample_grads(rng):
    w2 = xb(rng.standard_normal((3, 16)) / 4)
    b = xb(np.zeros(4))

    def loss(w, x, y):  # ReLU's zeros tie in the pooling windows
        h = eg.nn.functional.max_pool2d(eg.relu(eg.nn.functional.conv2d(x[None], w, b,
                                                                        padding=1)), 2)
        return eg.nn.functional.cross_entropy(eg.reshape(h, (1, -1)) @ w2.T, y[None])
    return eg.vmap(eg.grad(loss), in_axes=(None, 0, 0))


def test_per_sample_gradients_of_a_cnn_run_in_blocks_and_trace_on_one(rng, short_rows,
                                                                       monkeypatch):
    f = cnn_per_sample_grads(rng)
    w = xb(rng.standard_normal((4, 1, 3, 3)) / 3)
    x, y = xb(rng.standard_normal((150, 1, 4, 4))), xb(rng.integers(0, 3, 150))
    p = make_program(f)(w, x, y)
    assert short_rows == (["rows"] if CHUNKS else ["whole"])
    assert str(p) == str(whole_program(f, w, x, y, monkeypatch=monkeypatch))
    size, axes, _ = chunk.batching(p)
    assert size == 150 and axes[p.outputs[0].slot] == 0
    run, chunked = replayed(p, 40, monkeypatch)
    assert chunked == CHUNKS
    assert_same(p.outputs_of(run([w, x, y])), p.outputs_of(p.run([w, x, y])))
    assert_same(jit(f)(w, x, y), f(w, x, y), dict(rtol=1e-12, atol=1e-12), types=False)


def test_an_array_made_of_the_batchs_shape_is_made_on_the_block_and_folded_whole(
        rng, short_rows, monkeypatch):
    from einsumgrad.backends import backend_of

    def f(x):
        t = eg.tanh(x)
        return t * backend_of(t.data).full(t.shape, 2.0)  # read, never written: a constant
    x = xb(rng.standard_normal((150, 3)))
    p = make_program(f)(x)
    assert short_rows == (["rows"] if CHUNKS else ["whole"])
    assert str(p) == str(whole_program(f, x, monkeypatch=monkeypatch))
    assert any(np.shape(c) == (150, 3) for c in p.consts.values())
    assert_same(jit(f)(x), 2.0 * np.tanh(npy(x)), types=False)


# -- random chains: whatever the proof decides, jit equals f --------------------------------

def _chain_ops(rng, n, width):
    w = xb(rng.standard_normal((width, width)))
    col = xb(rng.standard_normal((n, 1)))
    return {  # row-wise steps and steps that mix rows, on x of shape (n, width)
        "tanh": eg.tanh, "product": lambda x: x @ w, "transposed product": lambda x: x @ w.T,
        "column": lambda x: x * col, "gelu": eg.gelu, "relu": eg.relu,
        "where": lambda x: eg.where(x > 0, x, 0.1 * x), "clip": lambda x: eg.clip(x, -.5, .5),
        "sum of a row": lambda x: x.sum(1, keepdims=True) * x,
        "sum over the batch": lambda x: x.sum(0) * x,
        "softmax of a row": lambda x: eg.softmax(x, axis=1),
        "softmax over the batch": lambda x: eg.softmax(x, axis=0),
        "logsumexp of a row": lambda x: eg.logsumexp(x, axis=1, keepdims=True) + x,
        "max of a row": lambda x: eg.max(x, axis=1, keepdims=True) * x,
        "max over the batch": lambda x: eg.max(x, axis=0, keepdims=True) * x,
        "std of a row": lambda x: eg.std(x, axis=1, keepdims=True) * x,
        "var over the batch": lambda x: eg.var(x, axis=0) * x,
        "cumsum of a row": lambda x: eg.cumsum(x, axis=1),
        "cumsum over the batch": lambda x: eg.cumsum(x, axis=0),
        "first column": lambda x: x[:, :1] * x, "first row": lambda x: x[:1] * x,
        "rows reversed": lambda x: eg.flip(x, axis=0), "columns reversed": lambda x: x[:, ::-1],
        "joined along a row": lambda x: eg.concatenate([x, x], axis=1)[:, 1:width + 1],
        "padded rows": lambda x: eg.pad(x, ((0, 0), (1, 0)))[:, :width],
        "float32": lambda x: x.astype(np.float32).astype(np.float64),
        "layer norm": lambda x: eg.nn.functional.layer_norm(x, (width,)),
    }


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.sampled_from([70, 96, 5]), jacobian=st.booleans(),
       rows=st.sampled_from([16, 33]), seed=st.integers(0, 2**16))
def test_random_chains_jit_equals_f_on_a_block_trace_and_in_blocks(data, n, jacobian, rows,
                                                                   seed):
    rng = np.random.default_rng(seed)
    width = 5  # n = 5: the batch has the length of the feature axis
    ops = _chain_ops(rng, n, width)
    names = data.draw(st.lists(st.sampled_from(sorted(ops)), min_size=1, max_size=4))

    def f(x):
        for name in names:
            x = ops[name](x)
        return x
    f = eg.batch_jacobian(f) if jacobian else f
    x = xb(rng.standard_normal((n, width)))
    try:
        want = f(x)
    except eg.BatchMixingError:
        return  # a batch Jacobian through rows that mix: refused, as it should be
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk, "TRACE_MIN_ROWS", 64)
        mp.setattr(chunk, "TRACE_ROWS", 7)
        mp.setenv("EINSUMGRAD_CHUNK", str(rows))
        j = jit(f)
        for _ in range(2):  # the first call (a block trace's replay), then a replay
            assert_same(j(x), want, dict(rtol=1e-9, atol=1e-9), types=False)
