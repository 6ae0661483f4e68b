"""Special values: every element-wise op, activation and row-wise op of the public
surface against torch at 0, -0.0, +-1, +-inf, NaN, +-1e300 (float64) or +-3e38
(float32), the smallest subnormals and the largest finite values, in float64 and
float32: the value, the first derivative in reverse mode (``backward``) and in
forward mode (``jvp``), and the second derivative both ways (grad of grad, and
``directional``). NaN positions must match; numbers agree within a few ulps.

Where einsumgrad and torch differ and einsumgrad is right (by the limit, or by
the definition), the case is in ``DIFFERENT`` with einsumgrad's answer and a
one-line reason: the test holds einsumgrad to that answer and checks torch still
gives another (so a stale entry shows). Each op is evaluated once per dtype at
all points together (torch's vectorized kernels are the ones a model runs), row-wise
ops on the rows of all points stacked; each op at each point, in both dtypes, is one
test case.
"""
import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import einsumgrad as eg
from backends import npy, xb
from einsumgrad.nn import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
INF, NAN = math.inf, math.nan
DTYPES = {"float64": (np.float64, torch.float64), "float32": (np.float32, torch.float32)}
POINTS = ["0", "-0", "1", "-1", "inf", "-inf", "nan", "big", "-big", "sub", "-sub",
          "max", "-max"]


def points(dtype: str) -> np.ndarray:
    """The special points of ``dtype``, in the order of ``POINTS``."""
    fi = np.finfo(DTYPES[dtype][0])
    big, sub, top = (1e300 if dtype == "float64" else 3e38), fi.smallest_subnormal, fi.max
    return np.array([0.0, -0.0, 1.0, -1.0, INF, -INF, NAN, big, -big, sub, -sub, top, -top],
                    dtype=DTYPES[dtype][0])


ULPS = 16  # libm, SLEEF, MKL and NumPy's own exp, erf, tanh... each within a few ulps


def assert_close(got, want, dtype: str, what: str, terms: bool = False):
    """Equal within ``ULPS`` ulps, NaN exactly where ``want`` has NaN, infinities of
    the same sign; below the smallest normal number an absolute ``tiny``. With
    ``terms`` (a row-wise op, whose results sum terms about as large as the
    inputs' ordinary entries and its largest result), also within ``ULPS`` ulps of
    ``max(1, largest finite |want|)``: an entry that cancels to about 0 is only
    that exact."""
    fi = np.finfo(DTYPES[dtype][0])
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == fi.dtype, f"{what}: {got.dtype}, not {fi.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, torch {want.shape}"
    atol = float(fi.tiny)
    if terms:
        finite = np.where(np.isfinite(want), np.abs(want), 0)
        atol = ULPS * float(fi.eps) * max(1.0, float(finite.max(initial=0.0)))
    with np.errstate(all="ignore"):
        near = np.abs(got - want) <= atol + ULPS * float(fi.eps) * np.abs(want)
    bad = ~((got == want) | (np.isnan(got) & np.isnan(want))
            | (np.isfinite(got) & np.isfinite(want) & near))
    if bad.any():
        raise AssertionError(f"{what}: einsumgrad {got[bad] if got.ndim else got}, "
                             f"torch {want[bad] if want.ndim else want}")


# -- each op's results, both ways --------------------------------------------------------

def _cot(shape, dtype, cot):
    return np.broadcast_to(np.asarray(cot, dtype), shape).copy()


def _grad(k, xs):
    return "grad" if len(xs) == 1 else f"grad{k}"


def eg_results(f, args, dtype, cot, tan, second: bool) -> dict:
    """Value, ``grad{k}`` (reverse, cotangent ``cot``), ``jvp`` (tangent ``tan`` on
    the first argument) and, with ``second``, by the first argument: ``grad2``, the
    gradient of ``sum(grad0 * tan)``, and ``fwd2``, ``directional(f, 2)`` along ``tan``."""
    t = DTYPES[dtype][0]
    leaf = lambda a: eg.tensor(xb(a, t), requires_grad=True)  # noqa: E731
    with np.errstate(all="ignore"):
        xs = [leaf(a) for a in args]
        out = f(*xs)
        c_out, v = (eg.tensor(xb(_cot(s, t, c))) for s, c in ((out.shape, cot),
                                                              (xs[0].shape, tan)))
        out.backward(c_out)
        r = {"value": npy(out)}
        r.update({_grad(k, xs): npy(x.grad) for k, x in enumerate(xs)})
        first = lambda y: f(y, *xs[1:])  # noqa: E731  (the others held)
        if second:
            d1 = eg.grad(lambda y: eg.sum(first(y) * c_out))
            r["grad2"] = npy(eg.grad(lambda y: eg.sum(d1(y) * v))(leaf(args[0])))
            r["fwd2"] = npy(eg.directional(first, 2)(leaf(args[0]), v))
        r["jvp"] = npy(eg.jvp(first, (leaf(args[0]),), (v,))[1])
    return r


def torch_results(f, args, dtype, cot, tan, second: bool, elementwise: bool = False) -> dict:
    """As :func:`eg_results`, by torch. For an ``elementwise`` ``f`` (tangent 1) the
    forward-mode results are the reverse-mode ones, the derivatives themselves;
    otherwise torch's forward mode's, ``torch.func.jvp`` (nested for ``fwd2``), whose
    order of operations (and so overflow) is einsumgrad's forward mode's."""
    t, np_t = DTYPES[dtype][1], DTYPES[dtype][0]
    xs = [torch.tensor(np.asarray(a), dtype=t, requires_grad=True) for a in args]
    out = f(*xs)
    c = torch.tensor(_cot(out.shape, np_t, cot))
    grads = torch.autograd.grad(out, xs, c, create_graph=second, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]
    r = {"value": out.detach().numpy()}
    r.update({_grad(k, xs): g.detach().numpy(force=True) for k, g in enumerate(grads)})
    x0, v = xs[0].detach(), torch.tensor(_cot(xs[0].shape, np_t, tan))
    if second:
        if not grads[0].requires_grad:  # a derivative constant in x (relu's)
            r["grad2"] = np.zeros(x0.shape, np_t)
        else:
            (g2,) = torch.autograd.grad((grads[0] * v).sum(), xs[0], allow_unused=True)
            r["grad2"] = (torch.zeros_like(x0) if g2 is None else g2).detach().numpy(force=True)
    if elementwise:
        r["jvp"] = r[_grad(0, xs)]
        if second:
            r["fwd2"] = r["grad2"]
        return r
    rest = [x.detach() for x in xs[1:]]
    first = lambda y: f(y, *rest)  # noqa: E731
    along = lambda g: lambda y: torch.func.jvp(g, (y,), (v,))[1]  # noqa: E731
    r["jvp"] = along(first)(x0).numpy(force=True)
    if second:
        r["fwd2"] = along(along(first))(x0).numpy(force=True)
    return r


def check(table: str, op: str, point: str, results, pick=lambda a: a, terms: bool = False):
    """Compare every result in each dtype (``results(dtype)``: einsumgrad's and torch's;
    ``pick``: this point's part of arrays evaluated at all points); fail once,
    naming every mismatch. A case with a known bug and nothing else wrong is an xfail."""
    errors, known = [], []
    for dtype in DTYPES:
        got, want = results(dtype)
        for kind in want:
            g, w = pick(np.asarray(got[kind])), pick(np.asarray(want[kind]))
            what = f"{op} {kind} at {point} ({dtype})"
            key = (table, op, dtype, point, kind)
            try:
                if key in KNOWN_BUGS:
                    known.append(KNOWN_BUGS[key])
                    _differs(g, w, dtype, what, terms, "KNOWN_BUGS")
                elif key not in DIFFERENT:
                    assert_close(g, w, dtype, what, terms)
                else:
                    expected, reason = DIFFERENT[key]
                    g2, e = (expected(op, dtype, point, kind, g) if callable(expected)
                             else (g, np.full(np.shape(w), expected, dtype=w.dtype)))
                    e = np.asarray(e, dtype=g.dtype).reshape(np.shape(g2))
                    assert_close(g2, e, dtype, f"{what}, where it differs from torch ({reason})",
                                 terms)
                    _differs(g, w, dtype, what, terms, "DIFFERENT")
            except AssertionError as e:
                errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors))
    if known:
        pytest.xfail("; ".join(sorted(set(known))))


def _differs(got, want, dtype, what, terms, table):
    """Raise if torch's answer is einsumgrad's: the entry in ``table`` is stale."""
    try:
        assert_close(got, want.astype(got.dtype), dtype, what, terms)
    except AssertionError:
        return
    raise AssertionError(f"{what} matches torch now: take it out of {table}")


# -- element-wise: one input -----------------------------------------------------------

def _gelu_tanh(t):
    return (F.gelu(t, approximate="tanh") if isinstance(t, eg.Tensor)
            else TF.gelu(t, approximate="tanh"))


both = lambda f: (f, f)  # noqa: E731  (the same expression serves both libraries)
UNARY = {
    "abs": (eg.abs, torch.abs), "abs()": both(abs), "neg": both(lambda t: -t),
    "cos": (eg.cos, torch.cos), "sin": (eg.sin, torch.sin), "erf": (eg.erf, torch.erf),
    "exp": (eg.exp, torch.exp), "log": (eg.log, torch.log), "sqrt": (eg.sqrt, torch.sqrt),
    "square": (eg.square, torch.square), "tanh": (eg.tanh, torch.tanh),
    "sigmoid": (eg.sigmoid, torch.sigmoid), "relu": (eg.relu, torch.relu),
    "F.relu": (F.relu, torch.relu),  # its own function: fuses with a batch norm before it
    "softplus": (eg.softplus, TF.softplus), "gelu": (eg.gelu, TF.gelu),
    "gelu tanh": both(_gelu_tanh),
    "clip": (lambda t: eg.clip(t, -1.0, 2.0), lambda t: torch.clamp(t, -1.0, 2.0)),
    # Tensor operators with a Python scalar on one side.
    "x + 2": both(lambda t: t + 2.0), "2 - x": both(lambda t: 2.0 - t),
    "x * 3": both(lambda t: t * 3.0), "x / 3": both(lambda t: t / 3.0),
    "3 / x": both(lambda t: 3.0 / t),
    **{f"x ** {c}": both(lambda t, c=c: t ** c)
       for c in (0.0, 1.0, 2.0, 3.0, -1.0, -2.0, 0.5, 1.5, 2.5)},
    **{f"{c} ** x": both(lambda t, c=c: c ** t) for c in (0.0, 1.0, 2.0, -2.0, 0.5)},
}


@functools.cache
def unary(op: str, dtype: str) -> tuple:
    x = points(dtype)
    f_eg, f_torch = UNARY[op]
    return (eg_results(f_eg, [x], dtype, 1.0, 1.0, second=True),
            torch_results(f_torch, [x], dtype, 1.0, 1.0, second=True, elementwise=True))


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("op", UNARY)
def test_unary(op, point):
    """Value, derivative (reverse and forward) and second derivative (both ways)."""
    check("unary", op, point, lambda dtype: unary(op, dtype), lambda a: a[POINTS.index(point)])


def test_other_names_are_the_same_functions():
    """What the tables above reach under one name only."""
    assert (F.gelu, F.softmax, F.log_softmax) == (eg.gelu, eg.softmax, eg.log_softmax)
    assert (eg.Tensor.exp, eg.Tensor.log, eg.Tensor.tanh, eg.Tensor.sqrt, eg.Tensor.sigmoid,
            eg.Tensor.relu, eg.Tensor.sin, eg.Tensor.cos) == (
        eg.exp, eg.log, eg.tanh, eg.sqrt, eg.sigmoid, eg.relu, eg.sin, eg.cos)


# -- element-wise: two inputs, every pair of points ---------------------------------------

BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b, "**": lambda a, b: a ** b, "%": lambda a, b: a % b,
          "maximum": lambda a, b: (eg.maximum if isinstance(a, eg.Tensor) else torch.maximum)(a, b),
          "minimum": lambda a, b: (eg.minimum if isinstance(a, eg.Tensor) else torch.minimum)(a, b)}


@functools.cache
def binary(op: str, dtype: str) -> tuple:
    """``x op y`` for every pair: ``x`` repeats each point ``len(POINTS)`` times."""
    y = np.tile(points(dtype), len(POINTS))
    x = np.repeat(points(dtype), len(POINTS))
    f = BINARY[op]
    return (eg_results(f, [x, y], dtype, 1.0, 1.0, second=False),
            torch_results(f, [x, y], dtype, 1.0, 1.0, second=False, elementwise=True))


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("op", BINARY)
def test_binary(op, point):
    """``x op y`` for ``x`` at ``point`` and ``y`` at every point: value, both gradients."""
    i = POINTS.index(point)
    check("binary", op, point, lambda dtype: binary(op, dtype),
          lambda a: a[i * len(POINTS):(i + 1) * len(POINTS)])


# -- row-wise: reductions, the softmax family, losses, normalization, pooling -------------

def rows(v):
    """Two rows with ``v`` in them: once beside ordinary values, once tied with itself."""
    return np.array([[v, 0.5, -1.5, v], [v, v, 1.0, 2.0]])


# Cotangents, tangents and constants are multiples of 1/8: sums of their products
# with the rows are exact, so a sum that cancels compares exactly too.
COT = np.array([[0.375, -1.25, 0.625, 0.25], [1.125, 0.5, -0.75, -0.875]])
TAN = np.array([[-0.5, 0.875, 0.25, 1.375], [0.625, -1.125, 0.5, 0.75]])
_W, _B = np.array([0.5, -2.0, 1.5, 1.0]), np.array([0.125, 0.25, -0.375, 0.0])
_TARGET = np.array([[0.25, -1.0, 2.0, 0.0], [1.0, 0.5, -0.5, 3.0]])
_LABELS = np.array([0, 2])
_like = lambda a, t: eg.tensor(xb(a, t.dtype))  # noqa: E731
_tlike = lambda a, t: torch.tensor(a, dtype=t.dtype)  # noqa: E731


def _torch_max_rows(t):
    # torch.max of a whole tensor splits its gradient evenly between ties and
    # between NaNs, as einsumgrad's max does; torch.amax over a dim gives a row
    # with a NaN max a NaN gradient everywhere (0 / 0 ties).
    return torch.stack([torch.max(r) for r in t])


def _torch_max_pool(t):
    # torch's max_pool2d routes a tied window's gradient to one entry; einsumgrad
    # splits it, as torch.max does: compare with torch.max over each 2x2 window.
    windows = t.reshape(-1, 2, 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
    return torch.stack([torch.max(w) for w in windows]).reshape(-1, 1, 1, 2)


# Row by row: evaluated on the rows of every point stacked, (2 * points, 4), with
# the cotangent COT per entry of the output, or its first column per row (window).
ROWWISE = {
    "softmax": (lambda t: eg.softmax(t, -1), lambda t: torch.softmax(t, -1), COT),
    "log_softmax": (lambda t: eg.log_softmax(t, -1), lambda t: torch.log_softmax(t, -1), COT),
    "logsumexp": (lambda t: eg.logsumexp(t, -1), lambda t: torch.logsumexp(t, -1), COT[:, 0]),
    "max rows": (lambda t: eg.max(t, -1), _torch_max_rows, COT[:, 0]),
    "Tensor.max": (lambda t: t.max(axis=-1), _torch_max_rows, COT[:, 0]),
    "sum rows": (lambda t: eg.sum(t, -1), lambda t: torch.sum(t, -1), COT[:, 0]),
    "mean rows": (lambda t: eg.mean(t, -1), lambda t: torch.mean(t, -1), COT[:, 0]),
    "min rows": (lambda t: eg.min(t, -1), lambda t: -_torch_max_rows(-t), COT[:, 0]),
    "prod rows": (lambda t: eg.prod(t, -1), lambda t: torch.prod(t, -1), COT[:, 0]),
    "var rows": (lambda t: eg.var(t, -1), lambda t: torch.var(t, -1, correction=0), COT[:, 0]),
    "std rows": (lambda t: eg.std(t, -1), lambda t: torch.std(t, -1, correction=0), COT[:, 0]),
    "cumsum": (lambda t: eg.cumsum(t, -1), lambda t: torch.cumsum(t, -1), COT),
    "layer_norm": (lambda t: F.layer_norm(t, 4), lambda t: TF.layer_norm(t, (4,)), COT),
    "layer_norm affine": (
        lambda t: F.layer_norm(t, 4, _like(_W, t), _like(_B, t)),
        lambda t: TF.layer_norm(t, (4,), _tlike(_W, t), _tlike(_B, t)), COT),
    "max_pool2d": (lambda t: F.max_pool2d(eg.reshape(t, (-1, 1, 2, 4)), 2), _torch_max_pool,
                   COT[:, 0].reshape(1, 1, 1, 2)),
}
# Over the whole (2, 4) block: evaluated point by point.
SECOND_AT = ["0", "-0", "1", "inf", "-inf", "nan"]
WHOLE = {
    "max": (eg.max, torch.max), "sum": (eg.sum, torch.sum), "mean": (eg.mean, torch.mean),
    "cross_entropy": (lambda t: F.cross_entropy(t, xb(_LABELS)),
                      lambda t: TF.cross_entropy(t, torch.tensor(_LABELS))),
    "mse_loss": (lambda t: F.mse_loss(t, _like(_TARGET, t)),
                 lambda t: TF.mse_loss(t, _tlike(_TARGET, t))),
}


@functools.cache
def rowwise(op: str, dtype: str) -> tuple:
    x = np.concatenate([rows(v) for v in points(dtype)])
    f_eg, f_torch, cot = ROWWISE[op]
    n = len(POINTS)
    cot, tan = np.concatenate([cot] * n), np.tile(TAN, (n, 1))
    return (eg_results(f_eg, [x], dtype, cot, tan, second=True),
            torch_results(f_torch, [x], dtype, cot, tan, second=True))


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("op", ROWWISE)
def test_rowwise(op, point):
    """Value, gradient, JVP and second derivatives (both ways) of a row-wise op."""
    i = POINTS.index(point)
    pick = lambda a: a[i] if a.shape[0] == len(POINTS) else a[2 * i:2 * i + 2]  # noqa: E731
    check("rows", op, point, lambda dtype: rowwise(op, dtype), pick, terms=True)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("op", WHOLE)
def test_whole(op, point):
    """Value, gradient, JVP of a reduction or loss over a block; second derivatives
    (both ways) at the points of ``SECOND_AT``."""
    f_eg, f_torch = WHOLE[op]
    second = point in SECOND_AT

    def results(dtype):
        x = rows(points(dtype)[POINTS.index(point)])
        return (eg_results(f_eg, [x], dtype, 1.0, TAN, second),
                torch_results(f_torch, [x], dtype, 1.0, TAN, second))
    check("whole", op, point, results, terms=True)


# -- empty reductions ---------------------------------------------------------------------

@pytest.mark.parametrize("op", ["mean", "sum"])
@pytest.mark.parametrize("shape,axis", [((0,), None), ((2, 0), -1), ((2, 0), None),
                                        ((0, 3), 0), ((0, 3), 1)])
def test_reductions_over_nothing(op, shape, axis):
    """A mean over no entries is 0 / 0, NaN, as NumPy's and torch's; a sum is 0."""
    f_eg, f_torch = getattr(eg, op), getattr(torch, op)
    results = lambda dtype: [  # noqa: E731
        run(lambda t, f=f: f(t) if axis is None else f(t, axis), [np.zeros(shape)], dtype,
            1.0, 0.0, second=False)
        for run, f in ((eg_results, f_eg), (torch_results, f_torch))]
    check("empty", op, f"{shape} over {axis}", results)


# -- where einsumgrad and torch differ --------------------------------------------------

def _scale_free(op, dtype, point, kind, got):
    """layer_norm(x) is layer_norm(x / c) once eps is negligible beside the variance:
    at a huge ``x`` its value, and ``c^k`` times its k-th derivatives, are torch's at
    ``x / c``, with ``c`` taking the row's largest entry to 2^24 (nothing overflows,
    and eps = 1e-5 is below rounding beside a variance of 2^46).
    Returns (einsumgrad's, scaled to compare, and torch's)."""
    t = DTYPES[dtype][0]
    c = abs(float(points(dtype)[POINTS.index(point)])) / 2.0 ** 24
    want = _torch_scaled(op, dtype, point, c)[kind]
    order = {"value": 0, "grad": 1, "jvp": 1, "grad2": 2, "fwd2": 2}[kind]
    if order == 2:  # c^-2 underflows: compare as they are (0 both, or nearly)
        return got, (want / c / c).astype(t)
    return (got * t(c) if order else got), want


@functools.cache
def _torch_scaled(op, dtype, point, c):
    x = (rows(points(dtype)[POINTS.index(point)]) / c).astype(DTYPES[dtype][0])
    return torch_results(ROWWISE[op][1], [x], dtype, ROWWISE[op][2], TAN, second=True)


def _scaled_twice(op, dtype, point, kind, got):
    """var(x) = c^2 var(x / c): its first derivatives at a huge ``x`` are ``c`` times
    torch's at ``x / c`` (``c`` as in :func:`_scale_free`), where no mean overflows."""
    c = abs(float(points(dtype)[POINTS.index(point)])) / 2.0 ** 24
    return got, (_torch_scaled(op, dtype, point, c)[kind] * c).astype(DTYPES[dtype][0])


def _exact_prod(op, dtype, point, kind, got):
    """prod's second derivatives (``grad2``, ``fwd2``) at finite rows, in rationals:
    sums of products of all entries but two, rounded once to the dtype."""
    t = DTYPES[dtype][0]
    top = Fraction(float(np.finfo(t).max))
    rnd = lambda q: (INF if q > 0 else -INF) if abs(q) > top else float(q)  # noqa: E731
    want = []
    for x, c, v in zip(rows(points(dtype)[POINTS.index(point)]).astype(t), COT[:, 0], TAN):
        x, v = [Fraction(float(a)) for a in x], [Fraction(float(a)) for a in v]
        n = range(len(x))
        h = lambda i, k: math.prod(x[j] for j in n if j not in (i, k))  # noqa: E731
        if kind == "grad2":
            want.append([rnd(Fraction(c) * sum(v[i] * h(i, k) for i in n if i != k)) for k in n])
        else:
            want.append(rnd(sum(v[i] * v[k] * h(i, k) for i in n for k in n if i != k)))
    return got, np.array(want, dtype=t)


def _shift_free(op, dtype, point, kind, got):
    """logsumexp(x - c) = logsumexp(x) - c: its derivatives at ``x`` are torch's at
    ``x - max(x)``, where nothing rounds away beside the max."""
    x = rows(points(dtype)[POINTS.index(point)])
    x = (x - x.max()).astype(DTYPES[dtype][0])
    return got, torch_results(ROWWISE[op][1], [x], dtype, ROWWISE[op][2], TAN,
                              second=True)[kind]


def _tangent_at_nans(op, dtype, point, kind, got):
    """A max over entries with NaNs is NaN and attains it at the NaNs: its JVP is
    the mean of the tangent there, over each row (max rows), window (max_pool2d) or
    the whole block (max)."""
    x = rows(points(dtype)[POINTS.index(point)])
    at = np.where(np.isnan(x), TAN, np.nan)
    if op == "max_pool2d":  # (2, 4) as two 2x2 windows
        at = at.reshape(2, 2, 2).transpose(1, 0, 2).reshape(2, 4)
    return got, (np.nanmean(at) if op == "max" else np.nanmean(at, axis=-1))


def _numpy_remainder(op, dtype, point, kind, got):
    """``x % y`` for ``x`` at ``point`` and ``y`` at every point, by NumPy."""
    x = points(dtype)[POINTS.index(point)]
    with np.errstate(all="ignore"):
        return got, np.remainder(x, points(dtype))


def _identity(op, dtype, point, kind, got):
    return got, points(dtype)[POINTS.index(point)]


def _hessian_along(op, dtype, point, kind, got):
    """d^2/dt^2 f(x + t v) by torch's reverse mode (the Hessian of each row, v^T H v)."""
    i = POINTS.index(point)
    return got, _torch_hessian_along(op, dtype)[2 * i:2 * i + 2]


@functools.cache
def _torch_hessian_along(op, dtype):
    t = DTYPES[dtype][1]
    f = ROWWISE[op][1]
    row = lambda r: f(r[None])[0]  # noqa: E731
    x = torch.tensor(np.concatenate([rows(v) for v in points(dtype)]), dtype=t)
    h = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(row)))(x)
    v = torch.tensor(np.tile(TAN, (len(POINTS), 1)), dtype=t)
    return torch.einsum("roij,ri,rj->ro", h, v, v).numpy()


_NONFINITE = ["inf", "-inf", "big", "-big", "max", "-max"]
_2ND = ["grad2", "fwd2"]
_1ST = ["grad", "jvp"]
_LN = ["layer_norm", "layer_norm affine"]
_MAX64 = float(np.finfo(np.float64).max)
_MSE2 = 2 * float((TAN ** 2).sum()) / TAN.size  # mse_loss's d^2/dt^2 along TAN, at any x
# (table, ops, dtypes (None: both), points, kinds, einsumgrad's answer, why). The answer
# is a number, an array shaped as the case's result, or a function giving
# (einsumgrad's result to compare, the reference) from (op, dtype, point, kind,
# einsumgrad's result), as _scale_free.
_DIFFERENCES = [
    # NaN in, NaN out
    ("unary", ["abs", "abs()"], None, ["nan"], _1ST, NAN,
     "|x|' at NaN is NaN: torch's sgn(NaN) = 0 hides the NaN"),
    ("unary", ["relu", "F.relu"], None, ["nan"], _1ST, NAN,
     "relu' at NaN is NaN: torch's threshold_backward passes the cotangent through as 1"),
    # the sign of zero
    ("unary", ["sqrt"], None, ["-0"], _1ST, INF,
     "-0.0 is 0: sqrt' is +inf there, its limit inside the domain; torch's "
     "0.5 / sqrt(-0.0) is -inf"),
    ("unary", ["sqrt"], None, ["-0"], _2ND, -INF,
     "-0.0 is 0: sqrt'' is -inf there, its limit; torch's takes the sign of -0.0"),
    ("unary", ["x ** 0.5"], None, ["-0"], _1ST, INF,
     "as sqrt': +inf at 0 (IEEE pow(-0.0, -0.5) = +inf); torch's rsqrt(-0.0) is -inf"),
    ("unary", ["x ** 1.5"], None, ["-0"], _2ND, INF,
     "0.75 x ** -0.5 is +inf at 0 (IEEE pow(-0.0, -0.5)); torch's rsqrt(-0.0) is -inf"),
    # IEEE pow at -inf
    ("unary", ["x ** 0.5"], None, ["-inf"], _1ST, 0.0,
     "the value is IEEE pow(-inf, 0.5) = +inf (torch's too) and its derivative 0.5 "
     "pow(-inf, -0.5) = 0 follows it; torch's goes through rsqrt(-inf), NaN"),
    ("unary", ["x ** 1.5"], None, ["-inf"], _2ND, 0.0,
     "0.75 pow(-inf, -0.5) = 0, as the IEEE value +inf; torch's goes through rsqrt(-inf), NaN"),
    ("unary", ["0.0 ** x"], None, ["0", "-0", "1", "sub", "big", "max", "inf"], _2ND, 0.0,
     "0 ** y is 0 for every y > 0 (its first derivative taken as 0 at y = 0, as torch's), "
     "so its second is 0; torch's double backward multiplies by log(0)"),
    # Gaussian tails: phi(x) times a power of x is 0 beyond |x| = 40
    ("unary", ["erf"], None, ["inf", "-inf", "max", "-max"], _2ND, 0.0,
     "erf''(x) = -2x erf'(x) tends to 0; torch's is -2x * 0, NaN at inf or once x^2 overflows"),
    ("unary", ["erf"], ["float32"], ["big", "-big"], _2ND, 0.0,
     "erf''(x) = -2x erf'(x) tends to 0; torch's is -2x * 0, NaN once x^2 overflows"),
    ("unary", ["gelu", "gelu tanh"], None, ["-inf"], ["value"], 0.0,
     "gelu(x) = x Phi(x) tends to 0; torch's is -inf * 0"),
    ("unary", ["gelu"], ["float32"], ["inf"], ["value"], INF,
     "gelu(inf) = inf; torch's vectorized float32 kernel gives NaN"),
    ("unary", ["gelu"], ["float32"], ["big", "max"], ["value"], _identity,
     "gelu(x) = x for x far above 0; torch's float32 x * (1 + erf) overflows to inf"),
    ("unary", ["gelu"], None, ["inf"], _1ST, 1.0,
     "gelu' = Phi + x phi tends to 1; torch's is 1 + inf * 0"),
    ("unary", ["gelu"], None, ["-inf"], _1ST, 0.0,
     "gelu' = Phi + x phi tends to 0; torch's is 0 + -inf * 0"),
    ("unary", ["gelu"], None, _NONFINITE, _2ND, 0.0,
     "gelu'' = phi (2 - x^2) tends to 0; torch's is 0 * inf"),
    ("unary", ["gelu tanh"], None, ["inf", "big", "max"], _1ST, 1.0,
     "tanh-gelu is x beyond |x| = 40, its derivative 1; torch's is 1 + x * 0 * inf"),
    ("unary", ["gelu tanh"], None, ["-inf", "-big", "-max"], _1ST, 0.0,
     "tanh-gelu is 0 beyond x = -40, its derivative 0; torch's is x * 0 * inf"),
    ("unary", ["gelu tanh"], None, _NONFINITE, _2ND, 0.0,
     "tanh-gelu is x or 0 beyond |x| = 40, its second derivative 0; torch's is inf * 0"),
    # logsumexp beside its own rounding
    ("rows", ["logsumexp"], None, ["big", "max"], ["grad", "grad2"], _shift_free,
     "two entries tied near the dtype's max: softmax is 1/2 on each; torch's "
     "exp(x - logsumexp(x)) loses the log 2 beside 1e300, and gives 1"),
    # max over a NaN: forward mode as reverse
    ("rows", ["max rows", "Tensor.max", "min rows", "max_pool2d"], None, ["nan"], ["jvp"],
     _tangent_at_nans,
     "max's JVP is J t with the Jacobian of its VJP (torch.max's backward too): the "
     "tangent at the NaN, split between NaNs; torch's forward-mode max gives NaN"),
    ("whole", ["max"], None, ["nan"], ["jvp"], _tangent_at_nans,
     "max's JVP is J t with the Jacobian of its VJP (torch.max's backward too): the "
     "tangent at the NaN, split between NaNs; torch's forward-mode max gives NaN"),
    # x % y exactly, as C's fmod
    *(("binary", ["%"], [dtype], ["1", "-1", "big", "-big", "max", *more], ["value"],
       _numpy_remainder, "x % y is exact (C's fmod): 0 with y's sign where y is a subnormal "
       "that divides x, as np.remainder; torch's vectorized x - floor(x / y) y meets x / y = "
       "inf: NaN") for dtype, more in (("float64", ["-max"]), ("float32", []))),
    ("whole", ["mse_loss"], None, ["inf", "-inf", "nan"], ["fwd2"], _MSE2,
     "mean((x - t)^2)'s second derivative is 2 |v|^2 / n for every x (torch's double "
     "backward agrees); torch's nested jvp multiplies x - t = inf by a zero tangent"),
    # prod: sums of products of all entries but one or two, exact (no division)
    ("rows", ["prod rows"], None, ["sub", "-sub"], _2ND, _exact_prod,
     "prod's second derivatives sum products of all entries but two (-0.75 beside two "
     "subnormals), though the whole product underflows to 0; torch's divide by it"),
    ("rows", ["prod rows"], None, ["big", "-big"], ["grad2"], _exact_prod,
     "sums of products of all entries but two, as they are (-4.5e299 at [0, 0]); torch's "
     "double backward gives NaN where an intermediate overflows"),
    ("rows", ["prod rows"], ["float32"], ["max", "-max"], ["grad2"], _exact_prod,
     "sums of products of all entries but two, run in float64 for float32, as they are; "
     "torch's double backward gives NaN where an intermediate overflows"),
    ("rows", ["prod rows"], ["float64"], ["max"], ["grad2"],
     np.array([[-INF, INF, INF, -0.4453125 * _MAX64], [INF, INF, NAN, NAN]]),
     "terms past float64's max (1.8e308 * 1.5): exact at [0, 3], but -inf at [0, 0] (is "
     "-0.45 max) and NaN at [1, 2:] (are inf); torch's double backward: NaN at 6 of 8"),
    ("rows", ["prod rows"], ["float64"], ["-max"], ["grad2"],
     np.array([[INF, NAN, INF, 0.4453125 * _MAX64], [-INF, -INF, INF, INF]]),
     "terms past float64's max (1.8e308 * 1.5): exact at [0, 3], but inf at [0, 0] (is "
     "0.45 max) and NaN at [0, 1] (is inf); torch's double backward: NaN at 6 of 8"),
    ("rows", ["prod rows"], None, ["inf"], ["grad2"],
     np.array([[NAN, INF, INF, NAN], [INF, INF, NAN, NAN]]),
     "by the limit (the infinities one s -> inf) every entry is +-inf: einsumgrad's where "
     "s^2 decides a sum, NaN where inf - inf meet; torch's are all NaN"),
    ("rows", ["prod rows"], None, ["-inf"], ["grad2"],
     np.array([[NAN, NAN, NAN, NAN], [-INF, -INF, NAN, NAN]]),
     "by the limit (the infinities one s -> -inf) every entry is +-inf: einsumgrad's "
     "at [1, :2], NaN where inf - inf meet; torch's are all NaN"),
    # var and std: NumPy's values; the mean of x / n where sum(x) overflows
    ("rows", ["var rows"], ["float32"], ["big", "-big", "max", "-max"], _1ST, _scaled_twice,
     "var's derivative 2 (x - mean) / n is finite (the mean taken as sum(x / n) where "
     "sum(x) overflows); torch's mean overflows: -inf"),
    ("rows", ["var rows"], ["float64"], ["max", "-max"], _1ST, _scaled_twice,
     "var's derivative 2 (x - mean) / n is finite (the mean taken as sum(x / n) where "
     "sum(x) overflows); torch's mean overflows: -inf"),
    ("rows", ["std rows"], ["float32"], ["big", "-big", "max", "-max"], ["value"], INF,
     "NumPy's std is sqrt(var), and var (9e76) overflows float32: inf, np.std's value; "
     "torch's float32 kernel gives the true std, 1.5e38"),
    ("rows", ["std rows"], ["float32"], ["big", "-big", "max", "-max"], _1ST + _2ND, 0.0,
     "std = sqrt(var) is inf (NumPy's value) where var overflows: its derivatives "
     "0.5 var' / sqrt(var) and on are 0; torch's are inf or NaN (its std is finite)"),
    ("rows", ["std rows"], ["float64"], ["max", "-max"], _1ST + _2ND, 0.0,
     "std = sqrt(var) is inf (NumPy's and torch's value) where var overflows: its "
     "derivatives 0.5 var' / sqrt(var) and on are 0, as torch's at 1e300; torch's mean "
     "overflows here: NaN"),
    # layer norm
    ("rows", _LN, None, ["0", "-0", "1", "-1", "sub", "-sub"], ["fwd2"], _hessian_along,
     "torch's nested jvp of layer_norm is wrong (its own reverse-mode Hessian, and finite "
     "differences in test_layer_norm_second_directional_derivative, give einsumgrad's)"),
    ("rows", _LN, None, ["big", "-big", "max", "-max"], ["value"] + _1ST, _scale_free,
     "layer_norm is scale-free: at 1e300 it is what it is at 1, scaled; torch's "
     "variance overflows (1e300 squared) and gives NaN"),
    ("rows", _LN, None, ["big", "-big", "max", "-max"], _2ND, _scale_free,
     "layer_norm is scale-free: its second derivatives at 1e300 are 1e-600, 0 in "
     "float64; torch's variance overflows and gives NaN"),
]

# Known bugs outside the files this test was written with (nn/functional.py):
# (table, op, dtype, point, kind) -> why. The case is an xfail until it matches torch.
KNOWN_BUGS: dict = {}


def _expand(rows_) -> dict:
    out = {}
    for table, ops, dtypes, pts, kinds, expected, reason in rows_:
        for op in ops:
            for dtype in dtypes or DTYPES:
                for point in pts:
                    for kind in kinds:
                        out[(table, op, dtype, point, kind)] = (expected, reason)
    return out


DIFFERENT = _expand(_DIFFERENCES)


def test_layer_norm_second_directional_derivative():
    """``directional(layer_norm, 2)`` against central differences of its values, in
    float64 (where torch's nested jvp disagrees with both)."""
    x = np.concatenate([rows(0.0), rows(1.0), rows(-1.0)])
    v = np.tile(TAN, (3, 1))
    for w, b in ((None, None), (_W, _B)):
        f = lambda t: F.layer_norm(t, 4, *(None if a is None else eg.tensor(xb(a))  # noqa
                                            for a in (w, b)))
        got = npy(eg.directional(f, 2)(eg.tensor(xb(x)), eg.tensor(xb(v))))
        h = 1e-4
        at = lambda s: npy(f(eg.tensor(xb(x + s * h * v))))  # noqa: E731
        fd = (at(1) - 2 * at(0) + at(-1)) / h ** 2
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-6)
