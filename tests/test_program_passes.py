"""The program passes (einsumgrad/program/passes.py, fuse.py): each exact.

Hypothesis draws einsum chains and element-wise chains; the optimized program,
the program left as traced and the function itself agree. Each pass is also
seen doing its work on a case made for it.
"""
import contextlib
import pickle
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from einsumgrad.program import compile as compile_module
from einsumgrad.program import fuse, make_program
from einsumgrad.program.jit import trace_program

from backends import NAME, npy, xb

TOL = dict(rtol=1e-12, atol=1e-12)


def programs(f, *args):
    """(optimized, as traced) programs of f at args."""
    return (trace_program(f, args, {}, ())[0], trace_program(f, args, {}, (), optimize=False)[0])


def check(f, *args, tol=TOL, other=None):
    """The optimized and the traced program of ``f`` at ``args`` give ``f``'s values;
    ``other``: arguments of the same signature for a later call, which must leave
    what the earlier one returned as it was."""
    opt, raw = programs(f, *args)
    before = [npy(a).copy() for a in args]
    want = npy(f(*args))
    for _ in range(2):  # twice: a buffer written over in place must not be a constant
        np.testing.assert_allclose(npy(opt(*args)), want, **tol)
    np.testing.assert_allclose(npy(raw(*args)), want, **tol)
    for a, b in zip(args, before):  # the caller's arrays are never written into
        np.testing.assert_array_equal(npy(a), b)
    if other is not None:
        first = opt(*args)
        np.testing.assert_allclose(npy(opt(*other)), npy(f(*other)), **tol)
        np.testing.assert_allclose(npy(first), want, **tol)
    return opt, raw


def ops(p) -> list:
    return [eq.op[1] if eq.op[0] == "prim" else eq.op[2] if eq.op[0] == "backend" else eq.op[0]
            for eq in p.eqs]


# -- einsum chains ---------------------------------------------------------------------------

LETTERS = "abcde"


@st.composite
def einsum_chains(draw):
    """Sizes, a first term, and steps (term of the new operand, output, a tanh between?)."""
    sizes = {l: draw(st.integers(1, 4)) for l in LETTERS}
    terms = lambda: st.lists(st.sampled_from(LETTERS), min_size=0, max_size=3, unique=True)
    first = tuple(draw(terms()))
    steps, cur = [], first
    for _ in range(draw(st.integers(1, 4))):
        other = tuple(draw(terms()))
        seen = sorted(set(cur) | set(other))
        out = tuple(draw(st.permutations(seen)))[:draw(st.integers(0, min(3, len(seen))))]
        steps.append((other, out, draw(st.booleans()) and draw(st.booleans())))
        cur = out
    return sizes, first, steps


@settings(max_examples=40, deadline=None)
@given(einsum_chains(), st.integers(0, 2 ** 31 - 1))
def test_einsum_chains_merge_exactly(chain, seed):
    sizes, first, steps = chain
    rng = np.random.default_rng(seed)
    shape = lambda t: tuple(sizes[l] for l in t)
    x = xb(rng.standard_normal(shape(first)))
    ws = [xb(rng.standard_normal(shape(other))) for other, _, _ in steps]

    def f(x, *ws):
        y, cur = x, first
        for w, (other, out, bend) in zip(ws, steps):
            y = eg.einsum(f"{''.join(cur)},{''.join(other)}->{''.join(out)}", y, w)
            y = eg.tanh(y) if bend else y
            cur = out
        return y
    with small_buffers_reused():
        opt, raw = check(f, x, *ws, other=[half(x), *ws])
    assert ops(opt).count("einsum") <= ops(raw).count("einsum")


def test_a_chain_is_merged_where_it_costs_less():
    rng = np.random.default_rng(0)
    a, b, c = (xb(rng.standard_normal(s)) for s in ((64, 2), (2, 64), (64, 2)))
    f = lambda a, b, c: eg.einsum("ij,jk->ik", eg.einsum("ij,jk->ik", a, b), c)
    opt, raw = check(f, a, b, c)
    assert ops(raw).count("einsum") == 2 and ops(opt).count("einsum") == 1
    (eq,) = opt.eqs
    assert len(eq.args) == 3
    # where merging costs more (a bend between, or a larger merged product) it stays
    g = lambda a, b, c: eg.einsum("ij,jk->ik", eg.tanh(eg.einsum("ij,jk->ik", a, b)), c)
    assert ops(check(g, a, b, c)[0]).count("einsum") == 2


# -- element-wise chains ----------------------------------------------------------------------

UNARY = {"exp": lambda x: eg.exp(-x * x), "tanh": eg.tanh, "sin": eg.sin, "cos": eg.cos,
         "abs": eg.abs, "relu": eg.relu, "sigmoid": eg.sigmoid, "neg": lambda x: -x,
         "sqrt": lambda x: eg.sqrt(eg.abs(x) + 1.0), "log": lambda x: eg.log(x * x + 1.0)}
BINARY = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
          "div": lambda x, y: x / (y * y + 1.0), "max": eg.maximum, "min": eg.minimum,
          "pow": lambda x, y: eg.abs(x) ** 1.5}


@st.composite
def elementwise_chains(draw, unary=UNARY, binary=BINARY):
    """2 to 8 steps, each a unary or binary op's name and the earlier values it reads
    (0 and 1 the inputs); test_program_fuse draws its chains here too."""
    n = draw(st.integers(2, 8))
    steps = []
    for k in range(n):
        if draw(st.booleans()):
            steps.append((draw(st.sampled_from(sorted(unary))), draw(st.integers(0, k + 2))))
        else:
            steps.append((draw(st.sampled_from(sorted(binary))), draw(st.integers(0, k + 2)),
                          draw(st.integers(0, k + 2))))
    return steps


@settings(max_examples=25, deadline=None)
@given(elementwise_chains(), st.sampled_from([np.float64, np.float32]),
       st.integers(0, 2 ** 31 - 1))
def test_elementwise_chains_fuse_exactly(steps, dtype, seed):
    rng = np.random.default_rng(seed)
    # three inputs broadcasting against each other, large enough to be fused
    ins = [xb(rng.standard_normal(s).astype(dtype)) for s in ((32, 40), (40,), (32, 1))]

    def f(a, b, c):
        vals = [a, b, c]
        for step in steps:
            fn = UNARY.get(step[0]) or BINARY[step[0]]
            vals.append(fn(*[vals[i] for i in step[1:]]))
        return vals[-1] + 0.0 * a  # the output's shape: the whole broadcast
    tol = TOL if dtype == np.float64 else dict(rtol=2e-5, atol=1e-6)
    with small_buffers_reused():
        check(f, *ins, tol=tol, other=[half(a) for a in ins])


class _NumPyAsCuPy:
    """NumPy in the place of CuPy's module for the GPU fusion: ``fuse`` runs the chain's
    function as written, so the fused step must equal the unfused ufuncs bit for bit."""

    def __init__(self):
        self.fused = []

    def fuse(self):
        def wrap(fn):
            self.fused.append(fn)
            return fn
        return wrap

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.skipif(NAME != "numpy", reason="NumPy's arrays stand in for CuPy's")
@settings(max_examples=25, deadline=None)
@given(elementwise_chains(), st.sampled_from([np.float64, np.float32]),
       st.integers(0, 2 ** 31 - 1))
def test_on_cupy_a_chain_is_one_cupy_fuse_of_the_same_ufuncs(steps, dtype, seed):
    rng = np.random.default_rng(seed)
    ins = [rng.standard_normal(s).astype(dtype) for s in ((32, 40), (40,), (32, 1))]

    def f(a, b, c):
        vals = [a, b, c]
        for step in steps:
            fn = UNARY.get(step[0]) or BINARY[step[0]]
            vals.append(fn(*[vals[i] for i in step[1:]]))
        return vals[-1] + 0.0 * a
    xp = _NumPyAsCuPy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fuse, "_target", lambda p: xp)
        opt = trace_program(f, tuple(ins), {}, ())[0]
        mp.setattr(eg.backends, "cupy_backend", lambda: type("B", (), {"module": xp})())
        again = pickle.loads(pickle.dumps(opt))  # the kernel made again from its source
    raw = trace_program(f, tuple(ins), {}, (), optimize=False)[0]
    fused = [eq for eq in opt.eqs if eq.op[0] == "fused"]
    assert all(eq.op[1].startswith(fuse.GPU_MARK) for eq in fused)
    assert all(step(eq) in fuse.GPU for eq in fused for step in [fuse.step] for eq in eq.inner)
    assert len(xp.fused) == len(fused)
    want = npy(raw(*ins))
    for q in (opt, again):
        np.testing.assert_array_equal(npy(q(*ins)), want)


def test_on_cupy_a_chains_kernel_calls_the_unfused_programs_ufuncs():
    x = np.random.default_rng(0).standard_normal((64, 64))
    f = eg.grad(lambda a: eg.tanh(eg.relu(a) * 2.0 + 1.0).sum())
    xp = _NumPyAsCuPy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fuse, "_target", lambda p: xp)
        p = make_program(f)(x)
    (eq,) = p.eqs  # the whole gradient: one kernel
    assert eq.op[0] == "fused" and "fused[" in str(p)
    head, signature, *body, ret = eq.op[1].splitlines()
    assert head + "\n" == fuse.GPU_MARK and signature.startswith("def kernel(i0")
    assert ret == f"    return t{len(body) - 1}"
    calls = [re.fullmatch(r"    t(\d+) = xp\.(\w+)\((.*)\)", line) for line in body]
    assert all(calls) and [int(c[1]) for c in calls] == list(range(len(body)))
    assert {"maximum", "multiply", "add", "tanh", "subtract"} <= {c[2] for c in calls}
    assert "i0, 0" in {c[3] for c in calls}  # relu as the unfused program calls it
    raw = trace_program(f, (x,), {}, (), optimize=False)[0]
    np.testing.assert_array_equal(p(x), raw(x))
    # off NumPy's and CuPy's backends (the strict stand-in) the chain stays as it is
    assert fuse._target(type("P", (), {"device": "strict", "devices": {"strict": "strict"}})) \
        is None


def half(a):
    """Another argument of ``a``'s signature (0-d stays an array)."""
    return xb(np.asarray(npy(a) * 0.5))


@contextlib.contextmanager
def small_buffers_reused():
    """Buffers of any size written over once dead, and kept in the workspace between
    calls (the hypothesis cases are small)."""
    saved = compile_module.REUSE_MIN, compile_module.WORKSPACE_MIN
    compile_module.REUSE_MIN = compile_module.WORKSPACE_MIN = 0
    try:
        yield
    finally:
        compile_module.REUSE_MIN, compile_module.WORKSPACE_MIN = saved


@pytest.mark.skipif(NAME != "numpy" or not fuse.available(), reason="numba fuses on NumPy")
def test_a_chain_is_one_kernel_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    x = np.random.default_rng(0).standard_normal((64, 64))
    f = lambda x: eg.grad(lambda a: (eg.tanh(a) * eg.sin(a)).sum())(x)
    p, raw = check(f, x)
    assert "fused" in ops(p) and len(p.eqs) < len(raw.eqs)
    assert list((tmp_path / "fused").glob("einsumgrad_fused_*.py"))
    assert "fused[" in str(p)
    q = pickle.loads(pickle.dumps(p))  # the kernel made again from its source (on disk)
    np.testing.assert_allclose(npy(q(x)), npy(p(x)), **TOL)
    monkeypatch.setattr(fuse, "available", lambda: False)  # without numba: the steps stay
    q = trace_program(f, (x,), {}, ())[0]
    assert "fused" not in ops(q)
    np.testing.assert_allclose(npy(q(x)), npy(p(x)), **TOL)


def test_a_value_read_twice_inside_stays_inside_one_kernel():
    if not fuse.available() or NAME != "numpy":
        pytest.skip("numba kernels run on the NumPy backend")
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((64, 64)), rng.standard_normal(64)
    # directional(f, 2) of a tanh layer: the tangent is read by two products, t by three
    f = lambda x, v: eg.directional(lambda y: eg.tanh(y * v), 2)(x, x)
    p, raw = check(f, x, v)
    kernels = [eq for eq in p.eqs if eq.op[0] == "fused"]
    assert len(kernels) == 1 and len(kernels[0].op[2]) >= 6, str(p)
    # a value also read outside the kernel is its result, not an inside step
    g = lambda a, b: (a * b) * (a * b + 1.0) + 0.0 * (a * b).sum()
    p, _ = check(g, x, v)
    assert sum(eq.op[0] == "fused" for eq in p.eqs) == 1


# -- dead code, common subexpressions, constants, buffers ----------------------------------------

def test_dead_code_and_common_subexpressions_go():
    x = xb(np.random.default_rng(0).standard_normal((3, 4)))

    def f(x):
        unused = eg.exp(x).sum()  # noqa: F841 (nothing reads it)
        return eg.sin(x) * eg.sin(x) + eg.sin(x)
    opt, raw = check(f, x)
    assert "exp" in ops(raw) and "exp" not in ops(opt)
    assert ops(raw).count("sin") == 3 and ops(opt).count("sin") == 1


def test_constants_fold_and_ones_drop():
    x = xb(np.random.default_rng(0).standard_normal((3, 4)))
    w = xb(np.random.default_rng(1).standard_normal((4, 2)))
    f = lambda x: eg.grad(lambda a: eg.tanh(eg.einsum("ij,jk->ik", a, w)).sum())(x)
    opt, raw = check(f, x)
    made = {"ones", "ones_like", "zeros", "eye"}
    assert made & set(ops(raw)) and not made & set(ops(opt))
    # the cotangent of sum() is ones: gone from the products it multiplied
    assert ops(opt).count("einsum") == 2 and len(opt.eqs) <= 5
    # x ** 2's derivative 2 x ** 1: the power of one is x itself
    sq = lambda x: eg.grad(lambda a: (eg.einsum("ii->i", a) ** 2).sum())(x)
    opt, raw = check(sq, xb(np.random.default_rng(2).standard_normal((3, 3))))
    assert "pow" in ops(raw) and "pow" not in ops(opt)
    # a Jacobian's basis is a constant of the program, not made on each run
    J = lambda x: eg.jacrev(lambda a: eg.sin(a) * 2.0)(x)
    opt, _ = check(J, x)
    assert "eye" not in ops(opt)


def test_writes_into_a_buffer_keep_it_fresh():
    x = xb(np.random.default_rng(0).standard_normal((3, 4)))

    def f(x):
        y = x * 1.0
        y[1] = 5.0  # the step writes into y: y is not folded, shared or dropped
        return y + eg.sin(x)
    check(f, x)


def test_each_buffer_is_freed_after_its_last_use():
    x = xb(np.random.default_rng(0).standard_normal((3, 4)))
    f = lambda x: eg.grad(lambda a: (eg.tanh(a) ** 2 * eg.exp(a)).sum())(x)
    p = make_program(f)(x)
    p(x)
    code = p._run.source.splitlines()
    for k, line in enumerate(code):
        m = re.match(r"\s+(a\d+)(, a\d+)*,? = ", line)
        if m and m.group(1) not in code[-1]:  # made here, not returned: deleted later
            assert any(re.match(rf"\s+del .*\b{m.group(1)}\b", rest) for rest in code[k:])


def test_a_dead_buffer_takes_the_next_result():
    rng = np.random.default_rng(0)
    x, w = xb(rng.standard_normal((200, 30))), xb(rng.standard_normal((30, 200)))
    # sin is not fused (tanh would join the bias and the product into one kernel)
    f = lambda x, w: eg.sin(eg.einsum("ij,jk->ik", x, w) + 1.0) * 2.0
    opt, _ = check(f, x, w)
    opt(x, w)
    code = opt._run.source
    # the bias lands in the product's buffer and sin writes over its input
    assert len(re.findall(r"out=a\d+", code)) >= 2, code


def test_a_buffer_seen_through_a_view_is_not_written_over():
    from einsumgrad.program.compile import last_uses, reuse_plan
    x = xb(np.random.default_rng(1).standard_normal((30, 40)))
    compile_module.REUSE_MIN, saved = 0, compile_module.REUSE_MIN

    def f(x):
        y = x * 2.0
        t = eg.einsum("ij->ji", y)  # a view of y's buffer (a transpose)
        r = y.reshape(40, 30)       # another
        u = eg.exp(y)               # y's last read, but t and r are read after it
        return u.T + t + r.reshape(30, 40).T
    try:
        opt, _ = check(f, x)
        into = reuse_plan(opt, last_uses(opt))
    finally:
        compile_module.REUSE_MIN = saved
    (k,) = [i for i, eq in enumerate(opt.eqs) if eq.op == ("prim", "exp")]
    assert k not in into


def test_large_results_live_in_a_workspace_kept_between_calls():
    rng = np.random.default_rng(2)
    # weights scaled to keep the products' entries near 1: sin of entries of 4e4
    # would magnify the 1e-16 by which two BLAS layouts' sums may differ past 1e-12
    x, *w = (xb(rng.standard_normal((200, 200)) * (1 if i == 0 else 200 ** -0.5))
             for i in range(5))
    # four products of 320 KB; the first is dead when the third is made
    f = lambda x, w1, w2, w3, w4: eg.sin((((x @ w1) @ w2) @ w3) @ w4).reshape(-1)
    opt, _ = check(f, x, *w, other=[half(x), *w])
    if NAME != "numpy":  # the workspace is the NumPy backend's
        assert "_workspace" not in opt._run.source
        return
    code = opt._run.source
    assert "_w = _workspace.take()" in code and "_workspace.give(_w)" in code
    ws = opt._run.__globals__["_workspace"]
    # the output (a view of sin's result, written over the last product) is never
    # workspace memory; the other three products are, two of them sharing a buffer
    assert len(ws.views) == 3 and len(ws.buffers) == 2, code


def test_a_workspace_serves_calls_on_several_threads():
    import concurrent.futures
    rng = np.random.default_rng(3)
    w = xb(rng.standard_normal((300, 300)))
    f = eg.jit(lambda x: eg.tanh(eg.sin(x @ w) @ w).sum(axis=1))
    xs = [xb(rng.standard_normal((300, 300))) for _ in range(8)]
    f(xs[0])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: [npy(f(x)) for _ in range(5)], xs))
    for x, g in zip(xs, got):
        want = np.tanh(np.sin(npy(x) @ npy(w)) @ npy(w)).sum(axis=1)
        for r in g:
            np.testing.assert_allclose(r, want, rtol=1e-12, atol=1e-12)


# -- constant layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("spec,shape,relaid", [
    ("bi,oi->bo", (5, 3), True),     # a linear layer's weight: x @ w.T, w stored as w.T
    ("...i,oi->...o", (5, 3), True),
    ("io,ib->ob", (5, 3), True),     # the left factor, read transposed
    ("oi,ib->ob", (3, 5), False),
    ("bi,io->bo", (3, 5), False),    # already in the product's order
    ("io,bi->bo", (3, 5), False),
    ("bi,bi->b", (7, 3), False),     # element-wise along b: not a product's factor
    ("abi,oi->boa", (3, 5), True),   # kept inside the output: the right factor, by place
    ("io,abi->boa", (5, 3), True),   # ... the left one
    ("oi,abi->boa", (3, 5), False),
])
def test_a_constant_read_transposed_is_stored_in_the_products_order(spec, shape, relaid):
    rng = np.random.default_rng(3)
    w = xb(rng.standard_normal(shape))
    xs = {"bi,oi->bo": (7, 3), "...i,oi->...o": (2, 7, 3), "io,ib->ob": (5, 7), "oi,ib->ob": (5, 7),
          "bi,io->bo": (7, 3), "io,bi->bo": (7, 3), "bi,bi->b": (7, 3),
          "abi,oi->boa": (2, 7, 5), "io,abi->boa": (2, 7, 5), "oi,abi->boa": (2, 7, 5)}[spec]
    x = xb(rng.standard_normal(xs))
    w_first = "o" in spec.split(",")[0]
    f = (lambda x: eg.einsum(spec, w, x)) if w_first else (lambda x: eg.einsum(spec, x, w))
    opt, raw = check(f, x, tol=dict(rtol=1e-13, atol=1e-13))
    consts = [c for c in opt.consts.values() if getattr(c, "ndim", 0) == 2]
    if NAME == "numpy":
        assert [c.shape for c in consts] == [shape[::-1] if relaid else shape], str(opt)
    assert str(raw).count("einsum") == 1
    p = pickle.loads(pickle.dumps(opt))
    np.testing.assert_allclose(npy(p(x)), npy(f(x)), rtol=1e-13, atol=1e-13)


def test_a_constant_read_transposed_by_large_products_is_stored_once_in_their_order():
    # seed 002's forward-mode Jacobian: the weight read as the layer's x @ w.T by the
    # primal (1000 rows) and by its three tangents (3000 rows), products of any size
    rng = np.random.default_rng(4)
    w, x, t = (xb(rng.standard_normal(s)) for s in ((64, 64), (1000, 64), (3, 1000, 64)))
    f = lambda x, t: eg.einsum("...i,oi->...o", x, w) + eg.einsum("a...i,oi->a...o", t, w)
    opt, raw = check(f, x, t, tol=dict(rtol=1e-13, atol=1e-13))
    if NAME == "numpy":
        (c,) = [c for c in opt.consts.values() if getattr(c, "ndim", 0) == 2]
        np.testing.assert_array_equal(c, npy(w).T)
        assert c.flags.c_contiguous
        assert re.findall(r"einsum '([^']*)'", str(opt)) == ["...i,io->...o", "a...i,io->a...o"]
