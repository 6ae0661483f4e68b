"""Fused element-wise kernels (einsumgrad/program/fuse.py) and their vector math
(einsumgrad/program/vecmath.py).

vecmath's exp, log, tanh and sigmoid are held to NumPy's within a few ulp on
dense grids and on hypothesis' floats, special values exactly, and seen to
compile to SIMD code. The fused kernels are held to the unfused program:
arithmetic bit for bit, on every broadcast layout, written into a new buffer,
into a dead input (``out=``) and into a non-contiguous one; chains with tanh
and exp within the programs' 1e-12.
"""
import contextlib
import math
import pickle
import re
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from einsumgrad.program import compile as compile_module
from einsumgrad.backends import compiled, threads
from einsumgrad.program import fuse, vecmath
from einsumgrad.program.jit import trace_program

from backends import NAME, npy, xb
from test_program_passes import elementwise_chains

# The kernels take NumPy arrays: the tests build them so, on any EINSUMGRAD_BACKEND; the
# chains drawn by hypothesis run on the backend under test (fused on NumPy's only).
pytestmark = pytest.mark.skipif(not fuse.available(), reason="numba is not installed")

TOL = dict(rtol=1e-12, atol=1e-12)
# max ulp against NumPy (the sigmoid: against its stable form in NumPy, itself ~2 ulp off)
ULPS = {"exp": 2, "log": 2, "tanh": 3, "sigmoid": 4}


def _sigmoid(x):
    with np.errstate(all="ignore"):
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


FUNCTIONS = {"exp": np.exp, "log": np.log, "tanh": np.tanh, "sigmoid": _sigmoid}


def reference(prim: str, x: np.ndarray) -> np.ndarray:
    """NumPy's ``prim`` at ``x``; for float32, NumPy's float64 result rounded (NumPy's
    own float32 loops are themselves a few ulp off)."""
    with np.errstate(all="ignore"):
        return FUNCTIONS[prim](x.astype(np.float64)).astype(x.dtype)
_unary: dict = {}


def unary(prim: str, dtype) -> callable:
    """vecmath's ``prim`` over a 1-D array: a generated kernel of that one step."""
    key = (prim, np.dtype(dtype).name)
    if key not in _unary:
        src = fuse.kernel_source(key[1], (7,), [(7,)], [f"t0 = {fuse.SCALAR[prim].format('i0')}"],
                                 {}, [prim])
        loop = fuse.compile_kernel(src).__globals__["_loop"]  # any length, one loop

        def run(x, loop=loop):
            out = np.empty_like(x)
            loop(out, x)
            return out
        _unary[key] = run
    return _unary[key]


def ulps(got: np.ndarray, want: np.ndarray) -> float:
    """The largest distance in units of the last place of ``want`` (NaN at NaN: 0)."""
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    spacing = np.spacing(np.abs(want)).astype(np.float64)
    with np.errstate(all="ignore"):
        d = np.abs(got.astype(np.float64) - want.astype(np.float64)) / spacing
    d = np.where(same, 0.0, d)
    return float(np.max(np.where(np.isnan(d), np.inf, d), initial=0.0))


def every_magnitude(dtype, n: int, rng) -> np.ndarray:
    """Floats of every exponent, subnormals included, both signs (random bit patterns)."""
    if dtype == np.float64:
        bits = rng.integers(0, 0x7FF0000000000000, n, dtype=np.int64).view(np.float64)
    else:
        bits = rng.integers(0, 0x7F800000, n, dtype=np.int32).view(np.float32)
    return np.where(rng.random(n) < 0.5, -bits, bits)


# -- vecmath ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("prim", sorted(ULPS))
def test_vecmath_within_a_few_ulp_on_dense_grids(prim, dtype):
    rng = np.random.default_rng(0)
    lo, hi = {"exp": (-760, 720), "log": (1e-6, 1e6), "tanh": (-25, 25),
              "sigmoid": (-760, 760)}[prim]
    if dtype == np.float32:
        lo, hi = {"exp": (-110, 95), "tanh": (-12, 12), "sigmoid": (-110, 110)}.get(prim, (lo, hi))
    grids = [np.linspace(lo, hi, 400_001), every_magnitude(dtype, 400_000, rng),
             np.linspace(-1, 1, 100_001)]
    if prim == "log":
        grids += [np.exp(np.linspace(-745, 709, 200_001)), 1 + np.linspace(-1e-3, 1e-3, 10_001)]
    f = unary(prim, dtype)
    for x in grids:
        with np.errstate(over="ignore"):
            x = x.astype(dtype)
        want = reference(prim, x)
        got = f(x)
        assert got.dtype == dtype
        assert ulps(got, want) <= ULPS[prim], prim


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ULPS)), st.sampled_from([np.float64, np.float32]), st.data())
def test_vecmath_within_a_few_ulp_anywhere(prim, dtype, data):
    width = 64 if dtype == np.float64 else 32
    x = np.array(data.draw(st.lists(st.floats(width=width), min_size=1, max_size=16)), dtype)
    assert ulps(unary(prim, dtype)(x), reference(prim, x)) <= ULPS[prim]


SPECIAL = {  # x -> the exact result, sign included
    "exp": [(0.0, 1.0), (-0.0, 1.0), (np.inf, np.inf), (-np.inf, 0.0), (np.nan, np.nan),
            (1e-310, 1.0), (-1e-310, 1.0), (710.0, np.inf), (1e300, np.inf), (-746.0, 0.0),
            (-1e300, 0.0)],
    "tanh": [(0.0, 0.0), (-0.0, -0.0), (np.inf, 1.0), (-np.inf, -1.0), (np.nan, np.nan),
             (1e300, 1.0), (-1e300, -1.0), (20.0, 1.0), (-20.0, -1.0), (5e-324, 5e-324),
             (-5e-324, -5e-324), (1e-310, 1e-310), (-2.5e-308, -2.5e-308), (1e-200, 1e-200)],
    "log": [(0.0, -np.inf), (-0.0, -np.inf), (np.inf, np.inf), (-np.inf, np.nan),
            (np.nan, np.nan), (-1.0, np.nan), (-1e-310, np.nan), (1.0, 0.0)],
    "sigmoid": [(0.0, 0.5), (-0.0, 0.5), (np.inf, 1.0), (-np.inf, 0.0), (np.nan, np.nan),
                (800.0, 1.0), (-800.0, 0.0), (1e-310, 0.5)],
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("prim", sorted(SPECIAL))
def test_vecmath_special_values_exact(prim, dtype):
    cases = [(x, y) for x, y in SPECIAL[prim]
             if dtype == np.float64 or x == 0 or not np.isfinite(x) or 1e-30 < abs(x) < 1e30]
    x = np.array([c[0] for c in cases], dtype)
    want = np.array([c[1] for c in cases], dtype)
    got = unary(prim, dtype)(x)
    np.testing.assert_array_equal(got, want)
    signed = ~np.isnan(want)  # a NaN's sign means nothing
    np.testing.assert_array_equal(np.signbit(got[signed]), np.signbit(want[signed]))
    # results in the subnormal range: within a few of its ulps
    if prim == "exp":
        tiny = np.linspace(-745.1, -708.5, 10_001) if dtype == np.float64 else \
            np.linspace(-103.9, -87.4, 10_001)
        tiny = tiny.astype(dtype)
        assert ulps(unary("exp", dtype)(tiny), reference("exp", tiny)) <= 2
    if prim == "log":
        sub = np.abs(np.random.default_rng(1).random(10_000) * np.finfo(dtype).tiny).astype(dtype)
        assert ulps(unary("log", dtype)(sub[sub > 0]), reference("log", sub[sub > 0])) <= 2


@pytest.mark.parametrize("prim", sorted(vecmath.FUNCTIONS))
def test_vecmath_loops_compile_to_simd(prim, tmp_path, monkeypatch):
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))  # compiled here, its IR at hand
    monkeypatch.setattr(threads, "SHARE", False)  # the serial loop, not its prange twin
    src = fuse.kernel_source("float64", (64, 64), [(64, 64), (64,)],
                             ["t0 = i0 + i1", f"t1 = {fuse.SCALAR[prim].format('t0')}"], {},
                             [prim])
    compiled._kernels.pop(src, None)
    kernel = fuse.compile_kernel(src)
    kernel(np.ones((64, 64)), np.ones(64))
    (ir,) = kernel.__globals__["_loop"].inspect_llvm().values()
    assert re.search(r"<\d+ x double>", ir), "the loop did not vectorize"
    assert not re.search(r"call [^\n]*@(exp|log|tanh)\b", ir), "libm called in the loop"


def test_the_team_twins_rows_compile_to_512_bit_vectors(tmp_path, monkeypatch):
    # numba compiles a prange's body as a function of its own: unless the twin asks
    # for 512-bit vectors there, LLVM's tuning keeps it to 256 (where the serial
    # loop has 512), and a vecmath chain ran no faster on two threads than on one
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))  # compiled here, its IR at hand
    src = fuse.kernel_source("float64", (64, 64), [(64, 64), (64,)],
                             ["t0 = i0 + i1", f"t1 = {fuse.SCALAR['tanh'].format('t0')}"], {},
                             ["tanh"])
    compiled._kernels.pop(src, None)
    team = fuse.compile_kernel(src).__globals__["_loop_team"]
    out, x, b = np.empty((64, 64)), np.ones((64, 64)), np.ones(64)
    team(out, x, b)
    np.testing.assert_allclose(out, np.tanh(x + b), rtol=1e-15)
    (ir,) = team.inspect_llvm().values()
    assert re.search(r"<8 x double>", ir) and not re.search(r"<4 x double>", ir)


# -- layouts -----------------------------------------------------------------------------------

def test_layout_merges_axes_each_input_spans_alike():
    assert fuse.layout((256, 64), [(256, 64), (64,), ()]) == ([(0,), (1,)], [(0, 1), (1,), ()])
    assert fuse.layout((256, 64), [(256, 64), ()]) == ([(0, 1)], [(0,), ()])
    assert fuse.layout((3, 1000, 64), [(1000, 64), (64,), (3, 1000, 64), (3, 1, 1)]) == (
        [(0,), (1,), (2,)], [(1, 2), (2,), (0, 1, 2), (0,)])
    assert fuse.layout((32, 1, 40), [(32, 1, 1), (40,)]) == ([(0,), (2,)], [(0,), (1,)])
    assert fuse.layout((1, 1), [(1, 1), ()]) == ([], [(), ()])


def test_lengths_are_read_on_each_call():
    # a chunked replay runs the kernel traced at the batch's length on blocks of it
    src = fuse.kernel_source("float64", (3, 100, 64), [(100, 64), (64,), (3, 100, 64)],
                             ["t0 = i0 + i1", "t1 = _tanh(t0)", "t2 = t1 * i2"], {}, ["tanh"])
    kernel = fuse.compile_kernel(src)
    rng = np.random.default_rng(0)
    for rows, split in [(100, False), (37, False), (1, False), (100, True), (2, True)]:
        a, b, c = rng.standard_normal((rows, 64)), rng.standard_normal(64), \
            rng.standard_normal((3, rows, 64))
        with rows_on_threads(split):
            np.testing.assert_allclose(kernel(a, b, c), np.tanh(a + b) * c, rtol=1e-15, atol=0)
            cut = c[:, :rows]  # a block of a batched constant: a strided view
            np.testing.assert_allclose(kernel(a, b, cut), np.tanh(a + b) * cut, rtol=1e-15,
                                       atol=0)


def _recorder(calls, fail_in_workers=False):
    def loop(out, *args):
        calls.append((out, args))
        if fail_in_workers and threading.current_thread() is not threading.main_thread():
            raise ValueError("a worker failed")
        out[...] = 1.0
    return loop


def test_rows_are_shared_among_threads_only_where_the_work_pays():
    calls = []
    out, x, b = np.zeros((10, 4)), np.ones((10, 4)), np.ones(4)
    threads.rows(_recorder(calls), out, (x, b), (True, False), threads.SPLIT_WORK - 1)
    assert len(calls) == 1 and calls[0][0] is out  # below the work that pays: as it is
    calls.clear()
    with rows_on_threads():
        threads.rows(_recorder(calls), out, (x, b), (True, False), 10 ** 9)
        shares = sorted((o.__array_interface__["data"][0], o.shape[0]) for o, _ in calls)
        assert [n for _, n in shares] == [3, 3, 4] and (out == 1).all()
        for o, (xs, bs) in calls:  # each thread's rows of x, all of b
            assert np.shares_memory(o, out) and xs.shape == o.shape and bs is b
        calls.clear()
        with threads.one_thread:  # a block loop holds the cores: the kernel stays on its own
            threads.rows(_recorder(calls), out, (x, b), (True, False), 10 ** 9)
        assert len(calls) == 1
        calls.clear()  # so does one run on a pool thread (it must not wait on its own pool)
        threads.pool(1).submit(threads.rows, _recorder(calls), out, (x, b), (True, False),
                               10 ** 9).result(timeout=60)
        assert len(calls) == 1
        calls.clear()
        with pytest.raises(ValueError, match="a worker failed"):  # raised in the caller
            threads.rows(_recorder(calls, True), out, (x, b), (True, False), 10 ** 9)


@pytest.mark.parametrize("shared_faster", [True, False])
def test_a_kernel_runs_the_way_timed_faster_and_tries_the_other_now_and_then(
        shared_faster, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(threads, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(threads, "cores", lambda: 2)
    ways = []

    def loop(out, x):  # a fake kernel: each run advances the fake clock by its cost
        whole = out.shape[0] == 10
        if whole or out.base is None or out.__array_interface__["data"][0] == base:
            ways.append("alone" if whole else "shared")
            clock[0] += 10.0 if whole == shared_faster else 1.0
    out = np.zeros((10, 4))
    base = out.__array_interface__["data"][0]
    for _ in range(40):
        threads.rows(loop, out, (np.ones((10, 4)),), (True,), 10 ** 9)
    faster, slower = ("shared", "alone") if shared_faster else ("alone", "shared")
    tries = threads.Timed.TRIES
    assert ways[:2 * tries] == ["alone", "shared"] * tries  # each way timed in turns
    rest = ways[2 * tries:]
    assert rest.count(faster) >= len(rest) - 6 and 2 <= rest.count(slower) <= 6


def _turns(ran: list, way: int) -> list:
    """Where each run of ``way``'s calls in a row begins in ``ran``."""
    return [i for i, w in enumerate(ran) if w == way and (i == 0 or ran[i - 1] != way)]


def _race(pace, took, calls: int, ran: list) -> None:
    for _ in range(calls):
        way = pace.pick()
        ran.append(way)
        pace.record(way, took(way) if callable(took) else took[way])


def test_a_way_that_stays_slower_is_tried_ever_less_often_until_it_wins():
    tries = threads.Timed.TRIES
    pace, every = threads.Timed(2, every=4), 4
    took = [1.0, 3.0]  # seconds per run of way 0 and way 1
    ran: list = []
    _race(pace, took, 2 * tries + 400, ran)
    turns = _turns(ran[2 * tries:], 1)  # each a turn of TRIES calls in a row
    assert all(ran[2 * tries + t:2 * tries + t + tries] == [1] * tries for t in turns)
    gaps = [b - a for a, b in zip(turns, turns[1:])]
    cap = threads.Timed.BACKOFF * every
    assert gaps[:4] == [g * every + tries - 1 for g in (2, 4, 8, 16)]
    assert set(gaps[4:]) == {cap + tries - 1}
    took.reverse()  # way 1 became the faster: found at its turn, then kept
    ran.clear()
    _race(pace, took, cap + 6 * every, ran)
    found = ran.index(1)
    assert found <= cap and ran[found:found + tries] == [1] * tries
    after = [t - found for t in _turns(ran, 0) if t > found]
    assert after[:2] == [tries + every - 1, 2 * tries + 3 * every - 2]  # way 0 now the slower


def test_a_turn_is_timed_past_its_first_call_and_a_slow_spell_brings_turns_back():
    tries = threads.Timed.TRIES
    pace, every = threads.Timed(2, every=4), 4
    ran: list = []
    # way 0's first calls paid once (a cold start), later ones 1.0; each turn of it
    # after way 1 has run starts cold (3.0) and then runs warm: way 0 is found
    cold = {"first": 3, "after": False}

    def took(way):
        if way == 1:
            cold["after"] = True
            return 2.0
        if cold["first"]:
            cold["first"] -= 1
            return 5.0
        slow, cold["after"] = cold["after"], False
        return 3.0 if slow else 1.0
    _race(pace, took, 2 * tries + 2 * every, ran)
    start = 2 * tries + every - 1  # way 0's first turn
    assert ran[2 * tries:start] == [1] * (every - 1) and ran[start:start + tries] == [0] * tries
    assert set(ran[start + tries:]) == {0}  # its warm time won: kept from then on
    # the leader's times grow (a busy core): the other way leads, and the first
    # leader's turn comes after `every` calls, not after the backoff grown so far
    ran.clear()
    _race(pace, [1.0, 2.0], 400, ran)  # way 1 loses turn after turn: a long backoff
    assert pace.gap == threads.Timed.BACKOFF * every
    ran.clear()
    _race(pace, [9.0, 2.0], 4 * every, ran)  # way 0's slow spell: way 1 leads
    lead = ran.index(1)
    assert ran[lead:lead + every - 1] == [1] * (every - 1)
    assert ran[lead + every - 1:lead + every - 1 + tries] == [0] * tries  # way 0's turn, soon



@contextlib.contextmanager
def rows_on_threads(on: bool = True):
    """Every kernel's rows shared among three threads (whatever this machine's cores)."""
    saved = threads.SHARE, threads.cores
    if on:
        threads.SHARE, threads.cores = True, lambda: 3
    try:
        yield
    finally:
        threads.SHARE, threads.cores = saved


SHAPES = [(), (40,), (32, 1), (32, 40), (1, 40), (3, 32, 40), (3, 1, 40), (3, 32, 1)]
ARITH = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
         "maximum": "np.maximum({0}, {1})", "minimum": "np.minimum({0}, {1})"}
UNARY_ARITH = {"neg": "-{0}", "abs": "np.abs({0})", "relu": "np.maximum({0}, 0)",
               "sqrt": "np.sqrt({0})"}


@st.composite
def arithmetic_chains(draw):
    """Input shapes (broadcasting together) and steps over them, NumPy expressions."""
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
    n = len(shapes)
    lines = []
    for k in range(draw(st.integers(2, 6))):
        names = [f"i{j}" for j in range(n)] + [f"t{j}" for j in range(k)]
        if draw(st.booleans()):
            fmt = UNARY_ARITH[draw(st.sampled_from(sorted(UNARY_ARITH)))]
            lines.append(f"t{k} = " + fmt.format(draw(st.sampled_from(names))))
        else:
            fmt = ARITH[draw(st.sampled_from(sorted(ARITH)))]
            lines.append(f"t{k} = " + fmt.format(draw(st.sampled_from(names)),
                                                 draw(st.sampled_from(names))))
    return shapes, lines


def numpy_chain(lines, ins, dtype):
    env = {"np": np, **{f"i{k}": a for k, a in enumerate(ins)}}
    with np.errstate(all="ignore"):
        for line in lines:
            exec(line, env)
    last = lines[-1].split("=")[0].strip()
    shape = np.broadcast_shapes(*[np.shape(a) for a in ins])
    return np.broadcast_to(np.asarray(env[last], dtype), shape)


@settings(max_examples=20, deadline=None)  # each draw compiles its kernel (~1 s)
@given(arithmetic_chains(), st.sampled_from([np.float64, np.float32]),
       st.integers(0, 2 ** 31 - 1))
def test_arithmetic_kernels_equal_numpy_bit_for_bit_on_every_layout(chain, dtype, seed):
    shapes, lines = chain
    rng = np.random.default_rng(seed)
    ins = [np.asarray(rng.standard_normal(s), dtype) for s in shapes]
    if rng.random() < 0.3:  # specials flow through as NumPy's do
        ins[0] = np.where(rng.random(shapes[0]) < 0.2, np.nan, ins[0]).astype(dtype)
    shape = np.broadcast_shapes(*shapes)
    want = numpy_chain(lines, [a if a.ndim else dtype(a) for a in ins], dtype)
    kernel = fuse.compile_kernel(fuse.kernel_source(
        np.dtype(dtype).name, shape, shapes, [l.replace(", 0)", ", T(0))") for l in lines], {},
        []))
    args = [a if a.ndim else a[()] for a in ins]
    for split in (False, True):  # on the calling thread, and its rows among three threads
        with rows_on_threads(split):
            got = kernel(*args)
            assert got.shape == shape and got.dtype == dtype
            np.testing.assert_array_equal(got, want)
            # into a dead input of the result's shape, as compile.reuse_plan passes it
            for k, a in enumerate(ins):
                if a.shape == shape:
                    buf = args[:k] + [a.copy()] + args[k + 1:]
                    assert kernel(*buf, out=buf[k]) is buf[k]
                    np.testing.assert_array_equal(buf[k], want)
            # into a buffer laid out otherwise, and from inputs that are strided views
            if len(shape) >= 2:
                out = np.empty(shape[::-1], dtype).T
                assert kernel(*args, out=out) is out
                np.testing.assert_array_equal(out, want)
                strided = [np.asfortranarray(a) if a.ndim > 1 else a for a in args]
                got = kernel(*strided)
                np.testing.assert_array_equal(got, want)
                full = [k for k, a in enumerate(ins) if a.shape == shape]
                if full and sum(n > 1 for n in shape) > 1:  # the reversed loops ran
                    assert got.flags.f_contiguous and not got.flags.c_contiguous
                for k in full:  # into a dead input laid out so (the reversed alias loop)
                    buf = strided[:k] + [strided[k].copy(order="F")] + strided[k + 1:]
                    assert kernel(*buf, out=buf[k]) is buf[k]
                    np.testing.assert_array_equal(buf[k], want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_constant_is_written_into_the_kernel_exactly(dtype):
    x = np.linspace(-2, 2, 64 * 64, dtype=dtype).reshape(64, 64)
    for c in map(dtype, (0.1, -0.0, np.finfo(dtype).smallest_subnormal, np.finfo(dtype).max,
                         np.inf, -np.inf, np.nan)):
        src = fuse.kernel_source(np.dtype(dtype).name, (64, 64), [(64, 64), ()],
                                 ["t0 = i0 * i1", "t1 = t0 + i1"], {1: fuse._literal(c)}, [])
        got = fuse.compile_kernel(src)(x, None)  # the constant's argument is not read
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(got, x * c + c)


# -- programs ----------------------------------------------------------------------------------

def programs(f, *args):
    return (trace_program(f, args, {}, ())[0], trace_program(f, args, {}, (), optimize=False)[0])


def kernels(p) -> list:
    return [eq for eq in p.eqs if eq.op[0] == "fused"]


def mlp(rng, sizes, act=eg.tanh):
    params = [(rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
              for i, o in zip(sizes[:-1], sizes[1:])]

    def f(x):
        for n, (w, b) in enumerate(params):
            x = eg.einsum("...i,oi->...o", x, w) + b
            x = act(x) if n < len(params) - 1 else x
        return x
    return f


def test_relus_derivative_fuses_with_its_bias_and_the_basis():
    # seed 001's Jacobian: relu's derivative (the sign of its output, a ufunc the rule
    # calls on arrays) joins the bias, the relu and the product with the basis: between
    # the two products, one kernel
    rng = np.random.default_rng(0)
    f = mlp(rng, [20, 32, 5], eg.relu)
    x = rng.standard_normal((64, 20))
    x[0, :] = 0.0  # relu's derivative at 0 (and -0.0): 0
    p, raw = programs(eg.batch_jacobian(f), x)
    assert [eq.op[0] == "fused" or eq.op[1] for eq in p.eqs] == ["einsum", True, "einsum"], str(p)
    (k,) = kernels(p)
    assert k.op[2] == ("add", "relu", "sign", "mul") and "fused[add, relu, sign, mul]" in str(p)
    want = npy(eg.batch_jacobian(f)(x))
    np.testing.assert_allclose(npy(p(x)), want, **TOL)
    np.testing.assert_allclose(npy(raw(x)), want, **TOL)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sign_in_a_kernel_is_numpys_zeros_and_nans_included(dtype):
    x = np.array([-0.0, 0.0, np.nan, -np.nan, np.inf, -np.inf, 2.5, -3.0, 1e-300, -1e-300],
                 dtype)
    kernel = fuse.compile_kernel(fuse.kernel_source(
        np.dtype(dtype).name, x.shape, [x.shape], ["t0 = " + fuse.SCALAR["sign"].format("i0")],
        {}, []))
    got, want = kernel(x), np.sign(x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # +0.0 at -0.0, as NumPy


def test_a_layers_bias_tanh_and_tangents_are_one_kernel():
    rng = np.random.default_rng(0)
    f = mlp(rng, [16, 64, 8])
    g = lambda x: eg.directional(f, 2)(x, x)
    x = rng.standard_normal((256, 16))
    p, raw = programs(g, x)
    assert [eq.op[0] == "fused" or eq.op[1] for eq in p.eqs] == ["einsum", True, "einsum"], str(p)
    (k,) = kernels(p)
    assert k.op[2][:2] == ("add", "tanh")
    want = npy(g(x))
    for _ in range(2):
        np.testing.assert_allclose(npy(p(x)), want, **TOL)
    np.testing.assert_allclose(npy(raw(x)), want, **TOL)
    # the jitted function, pickled and unpickled programs give the same numbers
    np.testing.assert_allclose(npy(eg.jit(g)(x)), want, **TOL)
    q = pickle.loads(pickle.dumps(p))
    np.testing.assert_array_equal(npy(q(x)), npy(p(x)))


def test_tanh_stays_out_where_its_result_broadcasts_and_in_float32():
    rng = np.random.default_rng(0)
    f = mlp(rng, [3, 64, 64, 3])
    x = rng.standard_normal((500, 3))
    p, _ = programs(eg.batch_jacobian(f), x)
    for k in kernels(p):  # a tanh of (500, 64) is not computed again for each of 3 tangents
        assert "tanh" not in k.op[2] or p.avals[k.outs[0]][0] == (500, 64), str(p)
    assert any("tanh" in k.op[2] for k in kernels(p))
    np.testing.assert_allclose(npy(p(x)), npy(eg.batch_jacobian(f)(x)), **TOL)
    x32 = x.astype(np.float32)
    g = lambda x: eg.tanh(x * 2.0 + 1.0) * x
    p, _ = programs(g, np.tile(x32, (1, 400)))
    assert all("tanh" not in k.op[2] for k in kernels(p)) and "tanh" in str(p)


def test_a_constant_broadcast_along_the_batch_is_read_broadcast(monkeypatch):
    # batch_jacobian's basis times the first weight is the same for every sample: a kernel
    # reads it with length 1 along the batch, not as a full array it would copy
    rng = np.random.default_rng(0)
    f = mlp(rng, [3, 64, 64, 3])
    x = rng.standard_normal((300, 3))
    p, raw = programs(eg.batch_jacobian(f), x)
    read = [p.consts[a.slot] for k in kernels(p) for a in k.args if a.slot in p.consts]
    assert any(np.ndim(c) == 3 and np.shape(c)[1] == 1 for c in read), str(p)
    assert all(st or n == 1 for c in read for st, n in zip(np.asarray(c).strides, np.shape(c)))
    want = npy(eg.batch_jacobian(f)(x))
    np.testing.assert_allclose(npy(p(x)), want, **TOL)
    np.testing.assert_allclose(npy(raw(x)), want, **TOL)
    np.testing.assert_array_equal(npy(pickle.loads(pickle.dumps(p))(x)), npy(p(x)))
    ns: dict = {}
    exec(compile(p.source(), "<emitted>", "exec"), ns)  # the inner steps read it too
    (run,) = [v for k, v in ns.items() if callable(v) and not k.startswith("_")
              and getattr(v, "__module__", None) is None]
    np.testing.assert_allclose(npy(run(x)), want, **TOL)
    monkeypatch.setenv("EINSUMGRAD_CHUNK", "64")  # in blocks of rows, too
    np.testing.assert_allclose(npy(eg.jit(eg.batch_jacobian(f))(x)), want, **TOL)


UNARY = {"exp": lambda x: eg.exp(x * 0.5), "tanh": eg.tanh, "sigmoid": eg.sigmoid,
         "log": lambda x: eg.log(x * x + 0.5), "abs": eg.abs, "relu": eg.relu,
         "neg": lambda x: -x, "sqrt": lambda x: eg.sqrt(x * x + 1.0)}
BINARY = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
          "div": lambda x, y: x / (y * y + 1.0), "max": eg.maximum, "min": eg.minimum}


@settings(max_examples=30, deadline=None)
@given(elementwise_chains(UNARY, BINARY), st.integers(0, 2 ** 31 - 1))
def test_chains_agree_with_the_unfused_program(steps, seed):
    rng = np.random.default_rng(seed)
    ins = [xb(rng.standard_normal(s)) for s in ((32, 40), (40,), (32, 1))]

    def f(a, b, c):
        vals = [a, b, c]
        for step in steps:
            fn = UNARY.get(step[0]) or BINARY[step[0]]
            vals.append(fn(*[vals[i] for i in step[1:]]))
        return vals[-1] * vals[-1] + 0.0 * a  # one more step: the chain's result is inside
    saved, compile_module.REUSE_MIN = compile_module.REUSE_MIN, 0  # dead buffers reused
    try:
        p, raw = programs(f, *ins)
        want = npy(raw(*ins))
        for _ in range(2):
            got = npy(p(*ins))
            np.testing.assert_allclose(got, want, **TOL)
            if not {s[0] for s in steps} & set(vecmath.FUNCTIONS):  # arithmetic: as NumPy's
                np.testing.assert_array_equal(got, want)
        assert bool(kernels(p)) == (NAME == "numpy"), str(p)
    finally:
        compile_module.REUSE_MIN = saved


def test_the_emitted_source_runs_the_steps_in_numpy():
    rng = np.random.default_rng(0)
    f = mlp(rng, [16, 64, 8])
    g = lambda x: eg.directional(f, 2)(x, x)
    x = rng.standard_normal((64, 16))
    p = trace_program(g, (x,), {}, ())[0]
    assert kernels(p)
    src = p.source()
    assert "numba" not in src and "np.tanh(" in src
    ns: dict = {}
    exec(compile(src, "<emitted>", "exec"), ns)
    (run,) = [v for k, v in ns.items() if callable(v) and not k.startswith("_")
              and getattr(v, "__module__", None) is None]
    out = run(x)
    np.testing.assert_allclose(npy(out[0] if isinstance(out, (list, tuple)) else out),
                               npy(g(x)), **TOL)


def test_kernels_are_compiled_once_and_found_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    src = fuse.kernel_source("float64", (64, 64), [(64, 64), (64,)],
                             ["t0 = i0 + i1", "t1 = _tanh(t0)"], {}, ["tanh"])
    compiled._kernels.pop(src, None)
    kernel = fuse.compile_kernel(src)
    x, b = np.linspace(-3, 3, 64 * 64).reshape(64, 64), np.linspace(-1, 1, 64)
    np.testing.assert_allclose(kernel(x, b), np.tanh(x + b), rtol=4e-16, atol=0)
    (path,) = (tmp_path / "fused").glob("einsumgrad_fused_*.py")
    assert path.read_text() == src.replace("cache=CACHE", "cache=True")
    assert any(p.suffix in (".nbi", ".nbc") for p in (tmp_path / "fused").rglob("*"))
    assert fuse.compile_kernel(src) is kernel
    assert math.isclose(float(kernel(x, b)[0, 0]), math.tanh(-3 - 1), rel_tol=4e-16)
