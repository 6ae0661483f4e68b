"""Wide products written transposed, with the element-wise steps around them
(einsumgrad/program/layouts.py; the choice: einsumgrad/backends/mkl.py, writes_transposed)."""
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from einsumgrad.backends import NUMPY, mkl
from einsumgrad.program.jit import trace_program

from backends import NAME, npy, xb

needs_mkl = pytest.mark.skipif(mkl.matmul is None, reason="the mkl wheel is not installed")
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture
def wide(monkeypatch):
    """Every wide product measured faster transposed (the pass's choice forced on)."""
    if mkl.chosen_matmul is None:
        pytest.skip("the choice is measured with MKL's matmul beside NumPy's")
    monkeypatch.setattr(mkl, "writes_transposed", lambda dtype, m, n, k: m < n)


def as_traced(monkeypatch):
    monkeypatch.setattr(mkl, "writes_transposed", lambda dtype, m, n, k: False)


def transposed(p) -> list:
    return [eq for eq in p.eqs if eq.kwargs.get("order") == (1, 0)]


def mlp(dtype=np.float64, batch=32, width=64, seed=0):
    rng = np.random.default_rng(seed)
    x = xb(rng.standard_normal((batch, 16)).astype(dtype))
    params = [xb((rng.standard_normal(s) / np.sqrt(s[-1])).astype(dtype))
              for s in ((width, 16), (width,), (width, width), (width,), (3, width))]

    def loss(params, x):
        w1, b1, w2, b2, w3 = params
        h = eg.tanh(eg.einsum("bi,oi->bo", x, w1) + b1)
        h = eg.tanh(eg.einsum("bi,oi->bo", h, w2) + b2) * h
        return (eg.einsum("bi,oi->bo", h, w3) ** 2).sum()
    return eg.value_and_grad(loss), (params, x)


def leaves(t) -> list:
    return [v for x in t for v in leaves(x)] if isinstance(t, (list, tuple)) else [npy(t)]


def test_a_layer_its_activation_and_their_backward_are_written_transposed(wide, monkeypatch):
    f, args = mlp()
    p, _ = trace_program(f, args, {}, ())
    if NAME != "numpy":  # NumPy's BLAS and layouts only
        assert not transposed(p) and not p.layouts
        return
    # the two hidden layers' products and the products bringing their cotangents;
    # not the head's (3 columns: not wide), not the weight gradients (outputs)
    assert len(transposed(p)) == 4 and len(p.layouts) > 4
    made = {eq.outs[0]: eq for eq in p.eqs}
    assert {made[s].op[0] for s in p.layouts} >= {"prim", "fused"}  # the chains go along
    assert not set(p.layouts) & {o.slot for o in p.outputs}
    got = p(*args)
    as_traced(monkeypatch)
    plain, _ = trace_program(f, args, {}, ())
    assert not transposed(plain)
    want = f(*args)
    for a, b, c in zip(leaves(got), leaves(plain(*args)), leaves(want)):
        np.testing.assert_allclose(a, c, **TOL)
        np.testing.assert_allclose(b, c, **TOL)
        assert a.flags.c_contiguous  # what the caller gets is laid out as always
    again = pickle.loads(pickle.dumps(p))
    assert len(transposed(again)) == 4
    for a, c in zip(leaves(again(*args)), leaves(want)):
        np.testing.assert_allclose(a, c, **TOL)


@pytest.mark.parametrize("reader", ["output", "reshape", "input"])
def test_a_component_read_otherwise_stays_as_traced(wide, reader):
    rng = np.random.default_rng(1)
    x, w, other = (xb(rng.standard_normal(s)) for s in ((32, 16), (64, 16), (32, 64)))

    def f(x, w, other):
        h = eg.tanh(eg.einsum("bi,oi->bo", x, w) + 1.0)
        if reader == "output":
            return h, (h * h).sum()
        if reader == "reshape":
            return eg.sin(h.reshape(-1)).sum()
        return (eg.sin(h + other) ** 2).sum()  # an input of h's shape, laid out as given
    p, _ = trace_program(f, (x, w, other), {}, ())
    assert not transposed(p) and not p.layouts
    for a, b in zip(leaves(p(x, w, other)), leaves(f(x, w, other))):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.skipif(NAME != "numpy", reason="the workspace is the NumPy backend's")
def test_an_elementwise_result_gets_a_workspace_buffer_of_its_layout(wide):
    # 128 x 512 float64 results: 512 KB, workspace-sized
    rng = np.random.default_rng(2)
    x, w, v = (rng.standard_normal(s) / 8 for s in ((128, 64), (512, 64), (4, 512)))

    def f(x, w, v):
        h = eg.einsum("bi,oi->bo", x, w)
        return eg.einsum("bo,vo->bv", eg.sin(h) * eg.cos(h) + h, v)
    p, _ = trace_program(f, (x, w, v), {}, ())
    assert len(transposed(p)) == 1
    np.testing.assert_allclose(p(x, w, v), f(x, w, v).numpy(), **TOL)
    ws = p._run.__globals__.get("_workspace")
    if ws is not None:
        taken = ws.take()
        for (_, shape, order), buf in zip(ws.views, taken):
            assert buf.shape == shape
            assert buf.flags.f_contiguous if order == (1, 0) else buf.flags.c_contiguous


@st.composite
def layer_stacks(draw):
    """2 to 6 steps on a (32, 64) value (large enough for fused kernels): a layer
    (x @ w.T, w one of two 64 x 64 weights), an activation, a bias, a product or
    sum with an earlier value."""
    steps = []
    for k in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(["layer", "tanh", "sin", "bias", "mul", "add"]))
        steps.append((kind, draw(st.integers(0, 1)), draw(st.integers(0, k))))
    return steps


@settings(max_examples=20, deadline=None)
@given(layer_stacks(), st.integers(0, 2 ** 31 - 1))
def test_written_transposed_or_not_a_program_gives_the_same_values(steps, seed):
    if mkl.chosen_matmul is None:
        pytest.skip("the choice is measured with MKL's matmul beside NumPy's")
    rng = np.random.default_rng(seed)
    x = xb(rng.standard_normal((32, 48)))
    ws = [xb(rng.standard_normal((64, s)) / np.sqrt(s)) for s in (48, 64, 64)]
    b = xb(rng.standard_normal(64))

    def f(x, w0, w1, w2, b):
        vals = [eg.einsum("bi,oi->bo", x, w0)]
        for kind, which, earlier in steps:
            h = vals[-1]
            h = (eg.einsum("bi,oi->bo", h, (w1, w2)[which]) if kind == "layer" else
                 eg.tanh(h) if kind == "tanh" else eg.sin(h) if kind == "sin" else
                 h + b if kind == "bias" else h * vals[earlier] if kind == "mul" else
                 h + vals[earlier])
            vals.append(h)
        return (vals[-1] ** 2).sum()
    g = eg.grad(f, argnums=(0, 1, 2, 3))
    args = (x, *ws, b)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mkl, "writes_transposed", lambda dtype, m_, n, k: m_ < n)
        p, _ = trace_program(g, args, {}, ())
    q, _ = trace_program(g, args, {}, ())
    assert bool(transposed(p)) == (NAME == "numpy")  # x @ w0.T at least, read by einsums
    want = g(*args)
    for a, c, d in zip(leaves(p(*args)), leaves(q(*args)), leaves(want)):
        np.testing.assert_allclose(a, d, **TOL)
        np.testing.assert_allclose(c, d, **TOL)


# -- the choice ---------------------------------------------------------------------------

@needs_mkl
def test_a_product_into_a_transposed_array_gives_numpys_values():
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        x, w = (rng.standard_normal(s).astype(dtype) for s in ((256, 512), (1024, 512)))
        out = np.empty((1024, 256), dtype).T
        assert NUMPY.matmul(x, w.T, out=out) is out
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        bound = 16 * 512 * np.finfo(dtype).eps * (np.abs(x) @ np.abs(w.T))
        assert np.all(np.abs(out - want) <= bound)


@needs_mkl
def test_the_choice_is_measured_once_then_read_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    monkeypatch.delenv("EINSUMGRAD_BLAS", raising=False)
    timed = []

    def in_turns(sides, budget, most):  # the transposed write the faster at 2^26 only
        timed.append(len(sides))
        return (2.0, 1.0) if len(timed) == 2 else (1.0, 1.0)
    monkeypatch.setattr(mkl, "_in_turns", in_turns)
    monkeypatch.setattr(mkl, "blas_choices", lambda dtype=None: {
        k: {b: "numpy" for b in mkl._BUCKETS} for k in mkl.CHOICE_KINDS})
    mkl.forget_choices()
    try:
        assert mkl.transposed_choices(np.float32) == {24: "as-is", 26: "transposed"}
        mkl.forget_choices()
        assert mkl.writes_transposed(np.float32, 256, 1024, 1024)
        assert not mkl.writes_transposed(np.float32, 256, 512, 256)    # 2^25: as it is
        assert not mkl.writes_transposed(np.float32, 1024, 1024, 256)  # not wide
        assert not mkl.writes_transposed(np.float32, 16, 48, 48)       # small
        assert timed == [2, 2]  # measured once: the second process read it
        monkeypatch.setenv("EINSUMGRAD_BLAS", "numpy")  # a fixed rule measures nothing
        mkl.forget_choices()
        assert not mkl.writes_transposed(np.float32, 256, 1024, 1024)
        assert timed == [2, 2]
    finally:
        mkl.forget_choices()
