"""MKL kernels behind the NumPy backend (einsumgrad/backends/mkl.py): matmul must be
``numpy.matmul`` on every layout, shape and dtype, taking or declining each;
erf and the normal CDF must be SciPy's to about an ulp."""
import importlib.metadata
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from einsumgrad import backends as backend
from einsumgrad.backends import mkl


def _mkl_installed() -> bool:
    try:
        importlib.metadata.version("mkl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return sys.platform.startswith("linux") and os.environ.get("EINSUMGRAD_MKL") != "0"


needs_mkl = pytest.mark.skipif(mkl.matmul is None, reason="the mkl wheel is not installed")


@pytest.fixture(autouse=True)
def vml_on(monkeypatch):
    """VML wherever it takes the arrays, whatever this machine measured (the tests
    here check VML's results; test_vml_or_numpy_by_measurement checks the choice)."""
    monkeypatch.setenv("EINSUMGRAD_VML", "mkl")
    mkl._vml.clear()
    yield
    mkl._vml.clear()


def assert_product_close(got, a, b, c=None):
    """``got`` is ``c + a @ b`` (``c`` optional) up to rounding: two correct GEMMs
    (MKL's, NumPy's BLAS) may sum their K terms in any order, so each entry
    may differ by about ``K * eps * (|a| @ |b|)[entry]`` (the classic bound),
    never by a fixed fraction of the entry: one near zero from cancellation
    may differ by much more than it, relatively."""
    a, b = np.asarray(a), np.asarray(b)
    want = np.matmul(a, b) if c is None else c + np.matmul(a, b)
    k = a.shape[-1]
    eps = np.finfo(np.result_type(a, b)).eps
    scale = np.matmul(np.abs(a.astype(np.float64)), np.abs(b.astype(np.float64)))
    if c is not None:
        scale = scale + np.abs(c)
    bound = 4 * (k + 2) * eps * scale + np.finfo(np.result_type(a, b)).tiny
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(np.asarray(got, np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound), (f"entry {worst}: |{got[worst]} - {want[worst]}| = "
                                  f"{err[worst]:.3g} > {bound[worst]:.3g} ({k}-term products)")


def test_mkl_loads_when_installed_and_the_backend_chooses_by_measurement():
    # make test installs the mkl wheel on Linux x86: the kernels must load there
    # (unless EINSUMGRAD_MKL=0), so the tests below run rather than skip; the
    # backend's matmul then picks MKL's or NumPy's per size (test_blas_choice.py).
    if _mkl_installed():
        assert None not in (mkl.matmul, mkl.erf, mkl.normal_cdf)
        assert backend.NUMPY.matmul is mkl.chosen_matmul
    else:
        assert backend.NUMPY.matmul is np.matmul


def _layout(draw, shape, dtype):
    """An array of ``shape`` laid out as drawn: C order, transposed last axes,
    strided, or broadcast (stride 0) along a batch axis."""
    kind = draw(st.sampled_from(["c", "f", "strided", "batch-broadcast", "permuted-batch"]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    base = lambda s: rng.standard_normal(s).astype(dtype)
    if kind == "f" and len(shape) >= 2:
        return np.swapaxes(base(shape[:-2] + shape[-2:][::-1]), -1, -2)
    if kind == "strided":
        return base(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if kind == "batch-broadcast" and len(shape) >= 3:
        return np.broadcast_to(base((1,) + shape[1:]), shape)
    if kind == "permuted-batch" and len(shape) >= 3:  # rows outside the batch: strides do not nest
        return np.moveaxis(base((shape[-2], shape[0]) + shape[1:-2] + shape[-1:]), 0, -2)
    return base(shape)


@st.composite
def problems(draw):
    m, k, n = (draw(st.integers(1, 24)) for _ in range(3))
    batch = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    a_shape, b_shape = batch + (m, k), batch + (k, n)
    if batch and draw(st.booleans()):  # broadcast one batch axis of b
        b_shape = (1,) + b_shape[1:]
    if draw(st.booleans()):
        a_shape = (k,)
    elif draw(st.booleans()):
        b_shape = (k,)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    return _layout(draw, a_shape, dtype), _layout(draw, b_shape, dtype)


@needs_mkl
@settings(max_examples=300, deadline=None)
@given(problems())
def test_matmul_as_numpy(ab):
    a, b = ab
    # Every product goes through MKL, however small (the size cut-off is
    # tested below), so these small random problems exercise the kernel.
    with pytest.MonkeyPatch.context() as mp:
        for cut in ("_MIN_WORK", "_MIN_BATCHED", "_MIN_THREADED"):
            mp.setattr(mkl, cut, 0)
        got = mkl.matmul(a, b)
    assert got.dtype == np.matmul(a, b).dtype
    assert_product_close(got, a, b)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_batches_walked_by_stride(dtype, monkeypatch):
    # Heads inside tokens, (batch, tokens, heads, dim) read as (batch, heads)
    # matrices: no single stride walks the batch, so MKL's strided batch runs
    # once per head along the batch axis. Also a broadcast operand, three
    # batch axes, and too many calls (the pointer batch then).
    for cut in ("_MIN_WORK", "_MIN_BATCHED", "_MIN_THREADED"):  # every batch to MKL
        monkeypatch.setattr(mkl, cut, 0)
    calls = []
    real = mkl._by_stride
    monkeypatch.setattr(mkl, "_by_stride",
                        lambda vs, lead, c_size: calls.append(real(vs, lead, c_size)) or calls[-1])
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    q, kt = r(6, 32, 4, 16).transpose(0, 2, 1, 3), r(6, 32, 4, 16).transpose(0, 2, 3, 1)
    cases = [  # (a, b, strided calls: None for the pointer batch)
        (r(6, 4, 32, 16), r(6, 4, 16, 32), 1),                    # one stride walks all
        (q, kt, 4),                                                # one call per head
        (q, r(1, 4, 16, 8), 4),                                    # b broadcast over the batch
        (r(3, 2, 5, 16, 24).transpose(1, 0, 2, 3, 4), r(24, 12), 6),
        (r(9, 64, 10, 32).transpose(0, 2, 1, 3), r(32, 40), None),  # 9 calls: too many
        # Into (batch, tokens, heads, dim), walked along the 4 heads (batch 3):
        # C matrices interleave, below MKL's stride floor: the pointer batch.
        (r(3, 4, 32, 8), r(3, 4, 8, 16), None, np.empty((3, 32, 4, 16), dtype).transpose(0, 2, 1, 3)),
    ]
    for a, b, n_calls, *out in cases:
        calls.clear()
        got = mkl.matmul(a, b, *out)
        assert_product_close(got, a, b)
        walk = calls[-1]  # for (a, b, out); None: the pointer batch ran
        assert (walk and len(walk[2])) == n_calls


def test_which_products_numpy_keeps():
    one, two, walks, no_walk = 1, 2, True, False
    assert mkl._small(40 ** 3, 1, walks, two) and not mkl._small(41 ** 3, 1, walks, two)
    # a batch on one MKL thread: NumPy's loop up to ~80^3 a matrix
    assert mkl._small(64 ** 3, 16, walks, one) and not mkl._small(96 ** 3, 16, walks, one)
    # on two: MKL from 8x8x8, small ones only where strided calls walk the batch
    assert not mkl._small(8 ** 3, 10_000, walks, two) and mkl._small(4 ** 3, 10_000, walks, two)
    assert mkl._small(32 * 32 * 16, 256, no_walk, two)
    assert not mkl._small(64 ** 3, 16, no_walk, two)


@needs_mkl
def test_matmul_declines_what_blas_cannot_take(monkeypatch):
    calls = []
    monkeypatch.setattr(np, "matmul", lambda a, b: calls.append(1) or a.__matmul__(b))
    a32, b64 = np.ones((64, 64), np.float32), np.ones((64, 64))
    mkl.matmul(a32, b64)                          # mixed dtypes
    mkl.matmul(np.ones((64, 64), int), np.ones((64, 64), int))
    mkl.matmul(np.ones((4, 4)), np.ones((4, 4)))  # too small to pay for a ctypes call
    assert len(calls) == 3
    calls.clear()
    big = np.ones((64, 64))
    assert np.array_equal(mkl.matmul(big, big), np.full((64, 64), 64.0))
    assert not calls


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matmul_writes_into_out_of_any_row_major_layout(dtype):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 4, 40, 30)).astype(dtype)
    b = rng.standard_normal((6, 4, 30, 20)).astype(dtype)
    # Heads inside rows: buffer (6, 40, 4, 20) seen as (6, 4, 40, 20).
    buf = np.empty((6, 40, 4, 20), dtype)
    r = mkl.matmul(a, b, out=buf.transpose(0, 2, 1, 3))
    assert np.shares_memory(r, buf)
    assert_product_close(buf.transpose(0, 2, 1, 3), a, b)
    # The same with the heads the longest batch axis: walked by stride, the C
    # matrices would interleave, which MKL refuses (computing nothing).
    buf = np.empty((3, 40, 4, 20), dtype)
    mkl.matmul(a[:3], b[:3], out=buf.transpose(0, 2, 1, 3))
    assert_product_close(buf.transpose(0, 2, 1, 3), a[:3], b[:3])
    # A column-major out goes to NumPy, which writes it all the same.
    col = np.empty((6, 4, 20, 40), dtype).transpose(0, 1, 3, 2)
    mkl.matmul(a, b, out=col)
    assert_product_close(col, a, b)
    m = np.empty((40, 20), dtype)  # one product
    mkl.matmul(a[0, 0], b[0, 0], out=m)
    assert_product_close(m, a[0, 0], b[0, 0])
    # One product into a column-major out: MKL's, as the product of the transposes
    # (NumPy's BLAS threads would spin beside MKL's), written in place.
    calls = []
    real = mkl.numpy.matmul
    mkl.numpy.matmul = lambda *args, **kw: calls.append(1) or real(*args, **kw)
    try:
        x = rng.standard_normal((200, 300)).astype(dtype)
        y = rng.standard_normal((300, 100)).astype(dtype)
        f = np.empty((100, 200), dtype).T
        assert mkl.matmul(x, y, out=f) is f
    finally:
        mkl.numpy.matmul = real
    assert not calls
    assert_product_close(f, x, y)
    with pytest.raises(ValueError):
        mkl.matmul(a, b, out=np.empty((6, 4, 40, 21), dtype))


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matmul_add_accumulates_in_place_or_declines(dtype):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 7)).astype(dtype), rng.standard_normal((7, 9)).astype(dtype)
    c = rng.standard_normal((50, 9)).astype(dtype)
    before = c.copy()
    # Row ranges of one array, as a convolution's offsets use them; a transposed operand.
    assert mkl.matmul_add(a, b, c[3:43]) and mkl.matmul_add(a[:30], b.T.copy().T, c[:30])
    # Rows 3-29 took both products: each bounded against the sum of both.
    both = np.concatenate([a[3:30], a[:27]], axis=1), np.concatenate([b, b])
    assert_product_close(c[3:30], *both, before[3:30])
    assert_product_close(c[:3], a[:3], b, before[:3])
    assert_product_close(c[30:43], a[27:], b, before[30:43])
    np.testing.assert_array_equal(c[43:], before[43:])
    # What BLAS cannot take is declined and left untouched.
    other = np.float16 if dtype == np.float32 else np.float32
    for args in ((a, b, np.ones((9, 40), dtype).T),                  # c column-major
                 (a, b.astype(other), c[:40]),                       # mixed dtypes
                 (a.astype(int), b.astype(int), c[:40].astype(int)),  # integers
                 (a, b, c[:20]),                                     # c's shape clashes
                 (a[:, :6], b, c[:40])):                             # a's and b's clash
        kept = args[2].copy()
        assert not mkl.matmul_add(*args)
        np.testing.assert_array_equal(args[2], kept)


@needs_mkl
def test_matmul_large_products_and_errors():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 200, 300)), rng.standard_normal((300, 100))
    assert_product_close(mkl.matmul(a, b), a, b)
    empty = rng.standard_normal((0, 200, 300))  # an empty batch of big matrices
    assert mkl.matmul(empty, b).shape == (0, 200, 100)
    with pytest.raises(ValueError, match="matmul"):
        mkl.matmul(rng.standard_normal((200, 300)), rng.standard_normal((299, 100)))
    with pytest.raises(ValueError):
        mkl.matmul(rng.standard_normal((2, 200, 300)), rng.standard_normal((3, 300, 100)))


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_and_normal_cdf(dtype):
    special = pytest.importorskip("scipy.special")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000) * 3, np.linspace(-40, 10, 1001),
                        [0.0, -0.0, 1e-30, np.inf, -np.inf]]).astype(dtype)
    for ours, exact in ((mkl.erf, special.erf), (mkl.normal_cdf, special.ndtr)):
        want = exact(x.astype(np.float64))
        got = ours(x[::-1])[::-1]  # a strided view goes in too
        assert got.dtype == dtype and got.shape == x.shape
        # Within one epsilon (two ulps of 1/2) everywhere, the tails included:
        # the composed 0.5 * (1 + erf(x / sqrt 2)) that MKL replaces is no closer.
        assert np.max(np.abs(got - want)) <= np.finfo(dtype).eps
    assert mkl.erf(np.array(0.5, dtype)) == pytest.approx(special.erf(0.5), rel=1e-6)
    assert np.isnan(mkl.normal_cdf(np.array([np.nan], dtype))).all()
    assert mkl.erf(np.ones(3, int)) is None  # other dtypes: the caller's own route
    assert mkl.normal_cdf(np.zeros((0, 3), dtype)).shape == (0, 3)


@st.composite
def ufunc_operands(draw):
    """Operands for a binary ufunc, big enough for VML: two arrays of one layout
    (C, transposed, strided, different layouts), or an array and a number."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(st.sampled_from([(40, 1000), (8, 64, 70), (mkl._VML_MIN,), (3, 5)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, 3e38], dtype)

    def array(kind):
        a = rng.standard_normal(shape).astype(dtype)
        a.reshape(-1)[:special.size] = special[:a.size]
        if kind == "transposed":
            return np.ascontiguousarray(a.T).T
        if kind == "strided":
            return np.repeat(a, 2, axis=-1)[..., ::2]
        return a
    kinds = ["c", "transposed", "strided"]
    a = array(draw(st.sampled_from(kinds)))
    form = draw(st.sampled_from(["same", "other", "number", "number-first"]))
    if form == "number":
        return a, draw(st.sampled_from([0.5, -2.0, 0.0, -0.0, 3, 1e300]))
    if form == "number-first":
        return draw(st.sampled_from([0.5, -2.0, 0.0, 3])), a
    b = array(draw(st.sampled_from(kinds)))
    if form == "same" and a.strides != b.strides:
        b = np.empty_like(a)
        b[...] = array("c")
    return a, b


@needs_mkl
@settings(max_examples=200, deadline=None)
@given(ufunc_operands(), st.sampled_from(["add", "subtract", "multiply"]), st.booleans())
def test_ufuncs_are_numpys_bit_for_bit(ab, name, into):
    a, b = ab
    with np.errstate(all="ignore"):
        want = getattr(np, name)(a, b)
        out = np.empty_like(want) if into else None
        got = mkl.ufuncs[name](a, b, out=out)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert out is None or got is out
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))  # signed zeros too


@st.composite
def in_place_broadcasts(draw):
    """``a += b`` / ``a -= b`` with ``a`` dense in a random axis order and ``b``
    varying along a random set of its axes (the innermost or outermost in memory:
    one rank-1 update; any other set: NumPy), special values on both sides."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(st.sampled_from([(64, 32, 16), (40, 1000), (8, 16, 16, 32)]))
    order = draw(st.permutations(range(len(shape))))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, 3e38], dtype)
    a = rng.standard_normal(tuple(shape[i] for i in order)).astype(dtype)
    a.reshape(-1)[:special.size] = special
    a = a.transpose(np.argsort(order))
    vary = draw(st.sets(st.sampled_from(range(len(shape))), min_size=1, max_size=len(shape) - 1))
    b = rng.standard_normal(tuple(n if i in vary else 1 for i, n in enumerate(shape))).astype(dtype)
    # Zeros in b send it to NumPy (BLAS skips them); without, the rank-1 path.
    picks = [3, 4, 0] if draw(st.booleans()) else [0, 2, 6]
    b.reshape(-1)[:3] = special[picks][:b.size]
    if draw(st.booleans()):  # b without its leading size-1 axes
        b = b.reshape(b.shape[next((i for i, n in enumerate(b.shape) if n > 1), 0):])
    return a, b


@needs_mkl
@settings(max_examples=200, deadline=None)
@given(in_place_broadcasts(), st.sampled_from(["add", "subtract"]))
def test_in_place_broadcast_add_is_numpys_bit_for_bit(ab, name):
    a, b = ab
    with np.errstate(all="ignore"):
        want = getattr(np, name)(a, b)
        got = mkl.ufuncs[name](a, b, out=a)
    assert got is a
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))


@needs_mkl
def test_in_place_broadcast_takes_one_rank_one_update(monkeypatch):
    # A bias over the channels of channels-last data, a shift per row: MKL;
    # a bias along a middle axis in memory: NumPy.
    calls = []
    monkeypatch.setattr(np, "add", lambda *a, real=np.add, **k: calls.append(1) or real(*a, **k))
    fresh = mkl._ufuncs(mkl._LIB)
    y = np.zeros((64, 16, 14, 14), np.float32).transpose(0, 2, 3, 1)  # memory (b, c, h, w)
    fresh["add"](y, np.ones((14, 14, 1), np.float32), out=y)        # inner (h, w)
    fresh["add"](y, np.ones((64, 1, 1, 1), np.float32), out=y)      # outer b
    assert not calls and np.all(y == 2)
    fresh["add"](y, np.ones((1, 1, 1, 16), np.float32), out=y)      # c: between b and (h, w)
    assert len(calls) == 1 and np.all(y == 3)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["exp", "log", "tanh"])
def test_unary_ufuncs_within_two_ulps(dtype, name):
    # of the float64 result rounded (float32), or of NumPy's (float64)
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((64, 1024)) * 4).astype(dtype) + np.finfo(dtype).tiny
    x[0, :4] = [np.inf, 0.0, 80.0, np.nan]
    x = x.T  # a transposed layout goes to VML as one run too
    with np.errstate(all="ignore"):
        want = getattr(np, name)(x.astype(np.float64)).astype(dtype)
        got = mkl.ufuncs[name](x)
        into = np.empty_like(x)
        assert mkl.ufuncs[name](x, out=into) is into
    assert got.strides == x.strides and np.array_equal(into, got, equal_nan=True)
    finite = np.isfinite(want) & (want != 0)
    np.testing.assert_array_max_ulp(got[finite], want[finite], maxulp=2)
    assert np.array_equal(got[~finite], want[~finite], equal_nan=True)


@needs_mkl
def test_ufuncs_leave_the_rest_to_numpy(monkeypatch):
    calls = []
    for name in ("add", "multiply"):
        real = getattr(np, name)
        monkeypatch.setattr(np, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    fresh = mkl._ufuncs(mkl._LIB)  # built now: it holds the patched ufuncs
    big = np.ones(mkl._VML_MIN, np.float32)
    fresh["add"](big, big)                                   # VML
    assert not calls
    fresh["add"](big[:10], big[:10])                         # small
    fresh["add"](big, big.astype(np.float64))                # mixed dtypes
    fresh["add"](big.reshape(-1, 8), big.reshape(-1, 8)[:1])  # broadcast
    fresh["multiply"](big, np.float64(2.0))                  # a NumPy scalar: its own dtype rules
    fresh["multiply"](big.astype(int), 2)                    # integers
    fresh["add"](big, True)
    assert len(calls) == 6
    assert fresh["multiply"](big, np.float64(2.0)).dtype == np.float64



def _aliases(x):
    """``(input, out)`` pairs holding ``x``'s values: ``out`` the input itself
    (None), then ``out`` a view of the input's buffer shifted one row (or
    entry) either way: behind the input's reads, and ahead of them."""
    yield x.copy(), None
    # zeros, not empty: the row outside the input is part of ``out``, and garbage
    # there (a NaN) would make the expected values NaN too
    buf = np.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype)
    for inp, out in ((buf[:-1], buf[1:]), (buf[1:], buf[:-1])):
        inp[...] = x
        yield inp, out


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_matmul_into_out_overlapping_an_input_is_numpys(dtype, batch):
    # NumPy copies an operand that ``out`` overlaps; GEMM would read what it
    # already wrote. Square matrices, so ``out`` may be either operand.
    rng = np.random.default_rng(4)
    ab = [rng.standard_normal(batch + (96, 96)).astype(dtype) for _ in range(2)]
    for which in (0, 1):
        for x, out in _aliases(ab[which]):
            a, b = (x, ab[1]) if which == 0 else (ab[0], x)
            out = x if out is None else out
            want = a.copy(), b.copy()  # NumPy's answer: the operands as they were
            assert mkl.matmul(a, b, out=out) is out
            assert_product_close(out, *want)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matmul_add_into_c_overlapping_an_input_is_numpys(dtype):
    rng = np.random.default_rng(5)
    ab = [rng.standard_normal((96, 96)).astype(dtype) for _ in range(2)]
    for which in (0, 1):
        for x, c in _aliases(ab[which]):
            a, b = (x, ab[1]) if which == 0 else (ab[0], x)
            c = x if c is None else c
            c[...] += 1  # c's own values (the operand's too where they share memory)
            want = a.copy(), b.copy(), c.copy()
            # The backend's matmul_add: MKL's kernel, or (declined) a product and an add.
            backend.NUMPY.matmul_add(a, b, c)
            assert_product_close(c, *want[:2], want[2])


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["add", "subtract", "multiply"])
def test_binary_ufuncs_into_out_overlapping_an_input_are_numpys(dtype, name):
    rng = np.random.default_rng(6)
    ab = [rng.standard_normal(2 * mkl._VML_MIN).astype(dtype) for _ in range(2)]
    ufunc = getattr(np, name)
    for which in (0, 1):
        for x, out in _aliases(ab[which]):
            # two arrays; an array and a number (VML's affine form), either side
            for args in ([x, ab[1]] if which == 0 else [ab[0], x],
                         [x, 0.5] if which == 0 else [0.5, x]):
                o = x if out is None else out
                x[...] = ab[which]
                want = ufunc(*(v.copy() if isinstance(v, np.ndarray) else v for v in args))
                assert mkl.ufuncs[name](*args, out=o) is o
                assert np.array_equal(o, want)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["add", "subtract"])
def test_in_place_broadcast_of_an_overlapping_row_is_numpys(dtype, name):
    # ``a += a[0]``: NumPy adds the row as it was; a rank-1 update would read
    # row 0 after it changed.
    rng = np.random.default_rng(7)
    a0 = rng.standard_normal((256, 256)).astype(dtype)
    for row in (0, 255):
        a = a0.copy()
        assert mkl.ufuncs[name](a, a[row], out=a) is a
        assert np.array_equal(a, getattr(np, name)(a0, a0[row]))


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["exp", "log", "tanh"])
def test_unary_ufuncs_into_out_overlapping_the_input_are_numpys(dtype, name):
    rng = np.random.default_rng(8)
    x0 = np.abs(rng.standard_normal(2 * mkl._VML_MIN)).astype(dtype) + 0.5
    fn = getattr(np, name)
    for (x, out), (x2, out2) in zip(_aliases(x0), _aliases(x0)):
        # In place: VML's own values (each entry read before it is written).
        # Out shifted against the input: what NumPy gives for that same layout
        # (its loop for overlapping memory may round an ulp apart from its
        # SIMD one).
        want = mkl.ufuncs[name](x0) if out is None else fn(x2, out=out2)
        out = x if out is None else out
        assert mkl.ufuncs[name](x, out=out) is out
        assert np.array_equal(out, want)


@pytest.mark.skipif(not _mkl_installed(), reason="the mkl wheel is not installed")
@pytest.mark.parametrize("user", [None, "7"])
def test_intels_openmp_threads_stop_spinning_after_a_millisecond(user):
    """Loading MKL sets KMP_BLOCKTIME to 1 ms unless the user set it, and the
    runtime MKL runs on takes it (its default, 200 ms of spinning after each
    product, keeps einsumgrad's other threads off the cores)."""
    import subprocess
    code = ("import ctypes, os, numpy as np\n"
            "from einsumgrad.backends import mkl\n"
            "a = np.ones((256, 256)); mkl.matmul(a, a)\n"
            "libs = [l.split()[-1] for l in open('/proc/self/maps') if 'libiomp5' in l]\n"
            "rt = ctypes.CDLL(libs[0]).kmp_get_blocktime() if libs else None\n"
            "print(os.environ['KMP_BLOCKTIME'], rt)\n")
    # Intel's OpenMP, asked for: with numba installed MKL runs on GNU's (threads.openmp)
    env = {k: v for k, v in os.environ.items() if k != "KMP_BLOCKTIME"}
    env["MKL_THREADING_LAYER"] = "INTEL"
    if user is not None:
        env["KMP_BLOCKTIME"] = user
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    want = user or mkl.BLOCKTIME_MS
    assert out == [want, want]


@needs_mkl
def test_vml_or_numpy_by_measurement(monkeypatch, tmp_path):
    # tanh measured faster in NumPy, exp in VML (from 2^18 entries): each op then
    # takes its own, with NumPy's values either way; measured once, then read
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    monkeypatch.delenv("EINSUMGRAD_VML")
    measured = []
    monkeypatch.setattr(mkl, "measure_vml", lambda dtype: measured.append(dtype) or {
        name: {b: "mkl" if name == "exp" and b >= 18 else "numpy" for b in mkl._VML_BUCKETS}
        for name in mkl.ufuncs})
    calls = []
    for name in ("tanh", "exp"):
        real = getattr(np, name)
        monkeypatch.setattr(np, name, lambda *a, real=real, name=name, **k:
                            calls.append(name) or real(*a, **k))
    fresh = mkl._ufuncs(mkl._LIB)  # built now: it holds the patched ufuncs
    mkl.forget_choices()
    try:
        x = np.linspace(-3, 3, 1 << 19)
        np.testing.assert_array_equal(fresh["tanh"](x), np.tanh(x))
        assert calls == ["tanh", "tanh"]  # NumPy's took it (then the want)
        calls.clear()
        got = fresh["exp"](x)
        assert calls == []  # VML's
        np.testing.assert_allclose(got, np.exp(x), rtol=4e-16)
        calls.clear()
        fresh["exp"](x[: 1 << 16])
        assert calls == ["exp"]  # a smaller class: NumPy's
        assert measured == [np.dtype(np.float64)]
        mkl.forget_choices()
        fresh["tanh"](x)
        assert measured == [np.dtype(np.float64)]  # read from blas.json
    finally:
        mkl.forget_choices()


@needs_mkl
def test_vml_choices_are_measured_for_every_op_and_class(monkeypatch, tmp_path):
    monkeypatch.setenv("EINSUMGRAD_CACHE", str(tmp_path))
    monkeypatch.delenv("EINSUMGRAD_VML")
    got = mkl.measure_vml(np.dtype(np.float32))
    assert set(got) == set(mkl.ufuncs)
    assert all(set(v) == set(mkl._VML_BUCKETS) and set(v.values()) <= {"mkl", "numpy"}
               for v in got.values())
    monkeypatch.setenv("EINSUMGRAD_VML", "numpy")
    assert {c for v in mkl.vml_choices(np.float32).values() for c in v.values()} == {"numpy"}
