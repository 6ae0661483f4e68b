"""numba's fused row kernels (einsumgrad/backends/kernels.py) against the NumPy path and the
engine-op rules they stand in for, on values that make each pass matter."""
import importlib.util
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from einsumgrad.backends import kernels as jit
from einsumgrad.nn import functional as F
from einsumgrad.rules import norm

needs_jit = pytest.mark.skipif(not jit.available(), reason="numba is not installed")
TOLS = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=5e-4, atol=5e-4)}


def test_jit_is_used_when_installed():
    # make test installs numba: the kernels must run there (unless EINSUMGRAD_JIT=0).
    installed = importlib.util.find_spec("numba") is not None
    assert jit.available() == (installed and os.environ.get("EINSUMGRAD_JIT") != "0")


def numpy_path(fn, *args):
    """``fn(*args)`` with the kernels switched off: the NumPy path."""
    saved, jit._compiled = jit._compiled, False
    try:
        with np.errstate(invalid="ignore"):  # inf - inf: the NaN both paths give
            return fn(*args)
    finally:
        jit._compiled = saved


@st.composite
def rows(draw):
    """An array of 1-3 leading axes and a normalized row of 1-70 entries, with
    rows that are constant, far from zero, or hold inf or NaN."""
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    n = draw(st.integers(1, 70))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = rng.standard_normal(lead + (n,))
    flat = x.reshape(-1, n)
    for r in range(flat.shape[0]):
        kind = draw(st.sampled_from(["plain"] * 4 + ["constant", "offset", "inf", "nan"]))
        if kind == "constant":
            flat[r] = flat[r, 0]
        elif kind == "offset":  # the mean 100 standard deviations out: two passes keep it
            flat[r] = flat[r] + 100.0
        elif kind in ("inf", "nan"):
            flat[r, draw(st.integers(0, n - 1))] = np.inf if kind == "inf" else np.nan
    return x.astype(dtype)


@needs_jit
@settings(max_examples=60, deadline=None)
@given(rows(), st.booleans())
def test_layer_norm_is_the_numpy_path(x, affine):
    n, dtype = x.shape[-1], x.dtype.type
    rng = np.random.default_rng(0)
    w, b = (rng.standard_normal(n).astype(dtype) for _ in range(2)) if affine else (None, None)
    got = jit.layer_norm(x, n, 1e-5, w, b)
    xhat, s = numpy_path(norm._normalized, x, (-1,), 1e-5)
    want = (xhat * w + b, xhat, s) if affine else (xhat, s)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a.reshape(e.shape), e, **TOLS[dtype])
        assert a.dtype == x.dtype


@needs_jit
@settings(max_examples=60, deadline=None)
@given(rows(), st.booleans())
def test_layer_norm_vjp_is_the_rule(x, affine):
    # The backward that records nothing takes the kernel; one that records
    # (create_graph) runs the engine-op rules. Both give the same gradients.
    n, dtype = x.shape[-1], x.dtype.type
    x = np.nan_to_num(x, nan=0.5, posinf=2.0)  # a NaN row's gradients are all NaN either way
    rng = np.random.default_rng(1)
    g = rng.standard_normal(x.shape).astype(dtype)
    wb = [eg.tensor(rng.standard_normal(n).astype(dtype), requires_grad=True)
          for _ in range(2 if affine else 0)]
    grads = []
    for record in (False, True):
        xt = eg.tensor(x, requires_grad=True)
        for p in wb:
            p.grad = None
        F.layer_norm(xt, n, *wb).backward(g, create_graph=record)
        grads.append([t.grad.numpy() for t in [xt] + wb])
    for fused, rule in zip(*grads):
        np.testing.assert_allclose(fused, rule, **TOLS[dtype])


@needs_jit
def test_kernels_decline_what_they_cannot_take():
    x = np.random.default_rng(0).standard_normal((6, 8))
    assert jit.layer_norm(x.astype(np.int64), 8, 1e-5) is None          # not float32/64
    assert jit.layer_norm(x.astype(np.float16), 8, 1e-5) is None
    assert jit.layer_norm(x[:, ::2], 4, 1e-5) is None                   # rows not contiguous
    assert jit.layer_norm(x, 8, 1e-5, np.ones(8, np.float32), np.ones(8)) is None  # dtypes differ
    assert jit.layer_norm(x, 8, 1e-5, np.ones(4), np.ones(4)) is None   # weight of another size
    assert jit.layer_norm(x[:0], 8, 1e-5) is None                       # nothing to do
    xhat, s = jit.layer_norm(x, 8, 1e-5)
    assert jit.layer_norm_vjp(x.astype(np.float32), xhat, s, 8) is None  # dtypes differ
    assert jit.layer_norm_vjp(x[:3], xhat, s, 8) is None                 # shapes differ
    # A strided cotangent is copied once, then taken.
    g = np.asfortranarray(x)
    np.testing.assert_allclose(jit.layer_norm_vjp(g, xhat, s, 8), jit.layer_norm_vjp(x, xhat, s, 8))


@needs_jit
def test_layer_norm_matches_torch_in_float32_through_the_kernels():
    import torch
    rng = np.random.default_rng(3)
    x, g = (rng.standard_normal((64, 32, 64)).astype(np.float32) for _ in range(2))
    w, b = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    ours = [eg.tensor(a, requires_grad=True) for a in (x, w, b)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    y = F.layer_norm(ours[0], 64, ours[1], ours[2])
    ty = torch.nn.functional.layer_norm(theirs[0], (64,), theirs[1], theirs[2])
    y.backward(g)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    for a, t in zip(ours, theirs):
        np.testing.assert_allclose(a.grad.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-4)


@needs_jit
def test_zero_variance_and_zero_sums_give_numpys_inf_and_nan():
    # Division by zero is NumPy's (inf, NaN), not an exception.
    x = np.ones((3, 4))
    with np.errstate(divide="ignore", invalid="ignore"):
        got, want = jit.layer_norm(x, 4, 0.0), numpy_path(norm._normalized, x, (-1,), 0.0)
    for a, e in zip(got, want):
        np.testing.assert_array_equal(a.reshape(e.shape), e)
    e = np.array([[1.0, 3.0], [0.0, 0.0], [np.nan, 1.0], [1e-200, 1e-200]])
    assert jit.divide_by_row_sums(e[:1].copy(), 1e-150) is True
    for row in e[1:]:
        r = row[None].copy()
        assert jit.divide_by_row_sums(r, 1e-150) is False  # zero, NaN, tiny: the caller redoes
    r = e[:1].copy()
    jit.divide_by_row_sums(r, 0.0)
    np.testing.assert_array_equal(r, [[0.25, 0.75]])
    assert jit.divide_by_row_sums(np.ones((2, 4))[:, ::2], 0.0) is None       # rows not contiguous
    assert jit.divide_by_row_sums(np.ones((2, 2), np.int32), 0.0) is None


@needs_jit
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.float64, np.float32]), st.lists(st.integers(1, 6), min_size=1, max_size=3),
       st.integers(1, 40), st.integers(0, 2 ** 16), st.booleans())
def test_softmax_vjp_is_the_rule(dtype, lead, n, seed, masked):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(tuple(lead) + (n,)).astype(dtype)
    if masked and n > 1:  # entries at -inf: their probabilities are exactly 0
        x[..., rng.integers(0, n)] = -np.inf
    g = rng.standard_normal(x.shape).astype(dtype)
    grads = []
    for record in (False, True):
        xt = eg.tensor(x, requires_grad=True)
        eg.softmax(xt, -1).backward(g, create_graph=record)
        grads.append(xt.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1], **TOLS[dtype])
    out = eg.softmax(x, -1).numpy()
    np.testing.assert_allclose(jit.softmax_vjp(g, out), out * (g - (g * out).sum(-1, keepdims=True)),
                               **TOLS[dtype])
    assert jit.softmax_vjp(g.astype(np.float16), out) is None


@st.composite
def pool_views(draw):
    """A 4-D image in NCHW or channels-last memory, as max_pool2d's tiling view
    (B, C, H/kh, kh, W/kw, kw), with ties (a ReLU's zeros, repeated integers)."""
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    b, c, ho, wo = (draw(st.integers(1, 4)) for _ in range(4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    x = rng.integers(-3, 4, (b, c, ho * kh, wo * kw)).astype(dtype)
    if draw(st.booleans()):
        x = x + rng.standard_normal(x.shape).astype(dtype)
    if draw(st.booleans()):  # channels-last in memory, as the conv layers write it
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return x, (kh, kw)


@needs_jit
@settings(max_examples=60, deadline=None)
@given(pool_views(), st.booleans())
def test_window_max_and_its_vjp_are_the_numpy_path_and_the_rule(view, nan):
    x, (kh, kw) = view
    b, c, h, w = x.shape
    x6 = x.reshape(b, c, h // kh, kh, w // kw, kw)
    want = x6.max(axis=(3, 5))
    if nan:  # NaN wins its window, as numpy.maximum
        x6 = x6.copy()
        x6[0, 0, 0, -1, 0, -1] = np.nan  # last in its window: it must still win
        want = x6.max(axis=(3, 5))
    got = jit.window_max(x6)
    np.testing.assert_array_equal(got, want)
    if nan:
        return
    # The VJP, fused and by the rule (ties split evenly), through max_pool2d.
    g = np.random.default_rng(1).standard_normal(want.shape).astype(x.dtype)
    grads = []
    for record in (False, True):
        xt = eg.tensor(x, requires_grad=True)
        F.max_pool2d(xt, (kh, kw)).backward(g, create_graph=record)
        grads.append(xt.grad.numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=0)
    np.testing.assert_allclose(grads[0].sum(axis=(-2, -1)), g.sum(axis=(-2, -1)), rtol=1e-5)


@needs_jit
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.float64, np.float32]), st.integers(1, 3), st.integers(1, 9),
       st.tuples(st.integers(1, 3), st.integers(1, 3)), st.tuples(st.integers(1, 2), st.integers(1, 2)),
       st.tuples(st.integers(1, 2), st.integers(1, 2)), st.integers(0, 2 ** 16))
def test_window_copy_is_numpys_strided_copy(dtype, b, channels, kernel, stride, dilation, seed):
    # im2col of channels-last images: cols[b, y, x, i, j] = pad[b, y*sh + i*dh, x*sw + j*dw]
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = 3, 4
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    pad = np.random.default_rng(seed).standard_normal((b, hp, wp, channels)).astype(dtype)
    s = pad.strides
    view = np.lib.stride_tricks.as_strided(
        pad, (b, oh, ow, kh, kw, channels), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
    cols = np.full(view.shape, np.nan, dtype)
    taken = jit.window_copy(pad, cols, stride, dilation)
    assert taken == (channels * pad.itemsize <= jit._COPY_BYTES)  # wide pixels: NumPy's copy
    if taken:
        np.testing.assert_array_equal(cols, view)
    assert not jit.window_copy(pad.astype(np.int32), np.zeros(cols.shape, np.int32), stride, dilation)


@needs_jit
@pytest.mark.parametrize("share", [False, True])
def test_pooling_kernels_give_the_same_bits_with_their_rows_on_threads(monkeypatch, share):
    from einsumgrad.backends import mkl, threads
    monkeypatch.setattr(threads, "SHARE", share)
    monkeypatch.setattr(threads, "SPLIT_WORK", 1)
    monkeypatch.setattr(threads, "cores", lambda: 3)
    monkeypatch.setattr(mkl, "gemm_threads", lambda: 3)
    x = np.random.default_rng(0).integers(-3, 4, (5, 8, 6, 4)).astype(np.float32)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels-last
    x6 = x.reshape(5, 8, 3, 2, 2, 2)
    out = jit.window_max(x6)
    np.testing.assert_array_equal(out, x6.max(axis=(3, 5)))
    g = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    monkeypatch.setattr(threads, "SHARE", False)
    want = jit.window_max_vjp(x6, out, g)
    monkeypatch.setattr(threads, "SHARE", share)
    np.testing.assert_array_equal(jit.window_max_vjp(x6, out, g), want)


def _special(rng, shape, dtype):
    """Normal values with GELU's and ReLU's edges mixed in: +-0, +-40 and past
    it, +-inf, NaN."""
    x = rng.standard_normal(shape) * 3
    edges = np.array([0.0, -0.0, 40.0, -40.0, 41.0, -41.0, 1e30, -1e30, np.inf, -np.inf, np.nan])
    mask = rng.random(shape) < 0.3
    x[mask] = rng.choice(edges, mask.sum())
    return x.astype(dtype)


@needs_jit
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([np.float64, np.float32]), st.lists(st.integers(1, 9), min_size=1, max_size=3),
       st.integers(0, 2 ** 16))
def test_gelu_and_relu_kernels_are_the_numpy_path(dtype, shape, seed):
    from einsumgrad.rules import elementwise as E
    rng = np.random.default_rng(seed)
    x, g = _special(rng, shape, dtype), _special(rng, shape, dtype)
    with np.errstate(all="ignore"):
        cdf = E._normal_cdf_impl(x)
        got = jit.gelu(x, cdf)
        np.testing.assert_array_equal(got, numpy_path(E._gelu_impl, x, cdf))
        want = numpy_path(lambda: g * E._gelu_d_impl(x, cdf))
        got = jit.gelu_vjp(g, x, cdf)
        # Phi + x phi cancels for negative x: the error is a few ulps of its terms
        # (at most 1.25), times g, not of the result.
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = np.isnan(want) | (got == want) | (np.abs(got - want) <= 8 * np.finfo(dtype).eps * np.abs(g))
        assert ok.all(), (x[~ok], g[~ok], got[~ok], want[~ok])
        y = np.maximum(x, 0)
        np.testing.assert_array_equal(jit.relu_vjp(g, y),
                                      g * E._relu_plain(np, x, y))  # -0.0 and NaN included
    assert jit.gelu(x, cdf.astype(np.float16)) is None
    assert g.size == 1 or jit.relu_vjp(np.broadcast_to(g.reshape(-1)[:1], g.shape), y) is None


@needs_jit
def test_the_float32_normal_cdf_is_one_pass_within_an_epsilon(monkeypatch):
    # GELU's Phi in float32: the rational erf in float64 arithmetic, one kernel pass
    # (MKL's vector CDF, 3x slower on the bench's AMD CPU, is not called); within
    # one epsilon of the exact value, never outside [0, 1], NaN kept
    special = pytest.importorskip("scipy.special")
    from einsumgrad.backends import NUMPY, mkl
    monkeypatch.setattr(mkl, "normal_cdf", lambda x: pytest.fail("MKL's CDF called"))
    x = np.concatenate([np.linspace(-40, 40, 200001),
                        [0.0, -0.0, 1e-30, np.inf, -np.inf, np.nan]]).astype(np.float32)
    got = NUMPY.normal_cdf(x)
    want = special.ndtr(x.astype(np.float64))
    assert got.dtype == np.float32 and np.isnan(got[-1]) and list(got[-3:-1]) == [1.0, 0.0]
    assert np.max(np.abs(got[:-1] - want[:-1])) <= np.finfo(np.float32).eps
    assert got[:-1].min() >= 0.0 and got[:-1].max() <= 1.0
    square = x[:200000].reshape(400, 500)  # another dense layout: over memory as it lies
    got = NUMPY.normal_cdf(np.asfortranarray(square))
    assert got.flags.f_contiguous
    np.testing.assert_allclose(got, NUMPY.normal_cdf(square), rtol=1e-6, atol=1e-7)


@needs_jit
def test_gelu_and_relu_kernels_take_any_dense_layout():
    # a channels-last image (NCHW axes over NHWC memory): the kernels run over the
    # memory as it lies, and the results keep the layout; mixed layouts decline
    from einsumgrad.rules import elementwise as E
    rng = np.random.default_rng(0)
    last = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    x, g = (last(_special(rng, (2, 3, 4, 5), np.float32)) for _ in range(2))
    y = np.maximum(x, 0)
    with np.errstate(all="ignore"):
        cdf = E._normal_cdf_impl(x)
        for got, want in ((jit.relu_vjp(g, y), g * E._relu_plain(np, x, y)),
                          (jit.gelu(x, cdf), numpy_path(E._gelu_impl, x, cdf)),
                          (jit.gelu_vjp(g, x, cdf), numpy_path(lambda: g * E._gelu_d_impl(x, cdf)))):
            assert got.strides == x.strides
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert jit.relu_vjp(np.ascontiguousarray(g), y) is None


@needs_jit
def test_gelu_and_relu_backward_take_the_kernels(monkeypatch):
    # The backward that records nothing runs the kernels; recording it runs the rules.
    calls = []
    for name in ("gelu_vjp", "relu_vjp"):
        real = getattr(eg.backends.NUMPY, name)
        monkeypatch.setattr(eg.backends.NUMPY, name, lambda *a, real=real, name=name:
                            calls.append(name) or real(*a))
    x = np.random.default_rng(0).standard_normal((4, 6))
    grads = []
    for record in (False, True):
        xt = eg.tensor(x, requires_grad=True)
        (F.gelu(xt) * F.relu(xt)).sum().backward(create_graph=record)
        grads.append(xt.grad.numpy())
    assert calls == ["relu_vjp", "gelu_vjp"] or calls == ["gelu_vjp", "relu_vjp"]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-14, atol=1e-15)


@needs_jit
def test_window_kernels_decline_other_layouts():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6))
    odd = np.ascontiguousarray(x.transpose(2, 0, 1, 3)).transpose(1, 2, 0, 3)  # H outermost
    assert jit.window_max(odd.reshape(2, 3, 2, 2, 3, 2)) is None
    assert jit.window_max(x.astype(np.int32).reshape(2, 3, 2, 2, 3, 2)) is None
    x6 = x.reshape(2, 3, 2, 2, 3, 2)
    out = jit.window_max(x6)
    assert jit.window_max_vjp(x6, out, out.astype(np.float32)) is None  # dtypes differ


@needs_jit
def test_kernels_compile_in_memory_where_numba_cannot_cache(monkeypatch):
    # numba raises RuntimeError at decoration when no directory takes its cache
    # (a read-only install, no user cache): the kernels then compile in memory.
    import numba
    real = numba.njit

    def njit(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function: no locator available for file")
        return real(*args, **kw)
    monkeypatch.setattr(numba, "njit", njit)
    monkeypatch.setattr(jit, "_compiled", None)
    assert jit.available()
    x = np.random.default_rng(0).standard_normal((3, 5))
    want = numpy_path(norm._normalized, x, (-1,), 1e-5)[0]
    np.testing.assert_allclose(jit.layer_norm(x, 5, 1e-5)[0], want, **TOLS[np.float64])
