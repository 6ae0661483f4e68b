"""Reductions that are not einsums alone: mean, max (pooling), the softmax family,
min, var, std, prod and cumsum.

``sum`` is an einsum (:mod:`.einsum`), ``mean`` a scaled one. ``max`` is a primitive whose
rules build the argmax mask once, from the input and the saved output;
``softmax`` is one primitive whose rules are in engine ops on its output;
``logsumexp`` and ``log_softmax`` are composites with a constant shift. ``var`` is
NumPy's value with torch's derivative; ``prod``'s derivative, the product of the
other entries, is built from a linear scan where dividing the product would fail.
"""
from __future__ import annotations

import builtins
import math

from ..backends import backend_of, common_backend, memory_order
from ..tensor import BatchMixingError, Primitive, Tensor, as_tensor
from .einsum import sum, transpose
from .elementwise import broadcasting, elementwise_batch, exp, log, where
from .shape import (Batched, astype, bind, getitem, int_axis, normalize_axes, pad_p, reshape,
                    same_op, shifted_axes)


def mean(x, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis``: :func:`sum`'s einsum, scaled by ``1 / n``."""
    x = as_tensor(x)
    n = math.prod(x.shape[a] for a in normalize_axes(axis, x.ndim))
    # Over no entries: 0 / 0, NaN, as NumPy and torch (the sum is 0).
    return sum(x, axis, keepdims) * (1.0 / n if n else math.nan)


# Reductions over a few small axes (pooling windows) run as element-wise ops over
# slices: NumPy's reduce over short strided axes is many times slower.
_FOLD = 64  # fold over slices up to this many window positions, else one reduce


def _in_memory_order(xp, a, axes: tuple):
    """``a`` transposed (a view) so that its axes run outermost to innermost in
    memory, the window ``axes`` renumbered to match, and the moves for arrays
    without the window axes (shaped as a reduction over them): ``to_m`` into the
    same order, ``back`` out of it; ``full_back`` puts a full one back."""
    perm = memory_order(a)
    kept_m = [p for p in perm if p not in axes]
    kept = [k for k in range(a.ndim) if k not in axes]
    to_m = lambda r: xp.transpose(r, [kept.index(k) for k in kept_m])
    back = lambda r: xp.transpose(r, [kept_m.index(k) for k in kept])
    full_back = lambda r: xp.transpose(r, [perm.index(k) for k in range(a.ndim)])
    axes_m = tuple(sorted(perm.index(w) for w in axes))
    return xp.transpose(a, perm), axes_m, to_m, back, full_back


def _fold(x, axes: tuple, op):
    """``op``-reduce ``x`` over small ``axes``, one axis at a time, in the order given
    (outermost in memory first): each op but the last then runs over whole rows
    (2x2 pooling: two ops, 1.5x faster than three over strided quarter slices)."""
    r, gone = x, 0
    for a in sorted(axes):
        ax = a - gone
        part = lambda j: r[(slice(None),) * ax + (j,)]
        acc = op(part(0), part(1)) if r.shape[ax] > 1 else part(0)
        for j in range(2, r.shape[ax]):
            op(acc, part(j), out=acc)
        r, gone = acc, gone + 1
    return r


def _aligned(xp, small, big, axes: tuple):
    """``small`` (``big``'s shape without ``axes``, both in memory order) with those
    axes back as size 1, the innermost one repeated to full size: an element-wise
    op against ``big`` then runs its inner loop over everything inside that axis
    (whole rows, or runs of channels), not over the window's 2 or 3 entries."""
    e = xp.expand_dims(small, axes)
    wide = [a for a in axes if big.shape[a] > 1]
    return xp.repeat(e, big.shape[wide[-1]], axis=wide[-1]) if wide else e


def _max_impl(x, axes):
    xp = backend_of(x)
    if axes == (3, 5) and xp.window_max:  # a pooling view (B, C, Ho, kh, Wo, kw): one pass
        out = xp.window_max(x)
        if out is not None:
            return out
    n = math.prod(x.shape[a] for a in axes)
    if n > _FOLD or n < 2 or x.ndim == len(axes):
        return xp.max(x, axis=axes)
    xm, axes_m, _, back, _ = _in_memory_order(xp, x, axes)
    return back(_fold(xm, axes_m, xp.maximum))


max_p = Primitive("max", _max_impl)


def _max_mask(x: Tensor, out: Tensor, axes: tuple) -> tuple:
    """Constants for max's rules: where ``x`` attains its maximum (a bool mask
    over small windows, else 1 and 0 in x's dtype), and ``1 / (number of ties)``
    shaped like ``out`` (None where there are no windows).

    Ties (windows of zeros after a ReLU) split the derivative evenly; the
    split is applied on the small output side, not on the mask. It is applied
    whether or not a window ties (1 where none does, exact): a branch on "any
    ties" would be one on the whole batch, which a program traced with ties
    could not replay block by block. A window whose max is NaN attains it at
    its NaNs (split between them), as torch.max.
    """
    xp = backend_of(x.data)
    n = math.prod(x.shape[a] for a in axes)
    nan = bool(xp.isnan(out.data).any())  # a pass over the small side only
    attains = lambda a, m: (a == m) | (xp.isnan(a) & xp.isnan(m)) if nan else a == m
    if n > _FOLD or n < 2 or x.ndim == len(axes):
        mask = attains(x.data, xp.expand_dims(out.data, axes)).astype(x.dtype)
        count = xp.sum(mask, axis=axes)
    else:  # in x's memory order, out lined up with it: long inner loops
        xm, axes_m, to_m, back, full_back = _in_memory_order(xp, x.data, axes)
        hit = attains(xm, _aligned(xp, to_m(out.data), xm, axes_m))
        # Counted in bytes (a window has at most _FOLD entries): 2x faster than
        # in floats. The mask stays bool: a product with it is as fast as with
        # floats, and the cast would be one more pass over the input's size.
        count = back(_fold(hit.view(xp.uint8), axes_m, xp.add))
        mask = full_back(hit)
    if not xp.size(count):
        return Tensor(mask), None
    return Tensor(mask), Tensor(xp.reciprocal(count.astype(x.dtype)))


def _keep(t: Tensor, axes: tuple, ndim: int) -> Tensor:
    """``t`` (leading batch axes, then a max's output) with the reduced axes back as size 1."""
    nb = t.ndim - (ndim - len(axes))
    it = iter(t.shape[nb:])
    return reshape(t, t.shape[:nb] + tuple(1 if a in axes else next(it) for a in range(ndim)))


def _spread_impl(g, mask, axes):
    xp = backend_of(g)
    mask_m, axes_m, to_m, _, full_back = _in_memory_order(xp, mask, axes)
    return full_back(xp.multiply(_aligned(xp, to_m(g), mask_m, axes_m), mask_m))


# spread(g, mask) = g, with the reduced axes put back, times the constant mask:
# max's VJP. g lined up with the mask in its memory order keeps NumPy's inner
# loops long, where the broadcast multiply runs them over the window's 2 or 3
# entries (or over a few channels).
spread_p = Primitive("spread", _spread_impl)
spread_p.defvjp(lambda k, g, out, x, mask, axes:
                sum(g * Tensor(mask), tuple(g.ndim - mask.ndim + a for a in axes)))
spread_p.defjvp(lambda k, t, out, x, mask, axes: _spread(t, Tensor(mask), axes))


@spread_p.defbatch
def _spread_batch(bdims, shapes, out_shape, mask, axes):
    kept = [a for a in range(len(out_shape)) if a not in axes]
    return kept[bdims[0]]


# One example's mask, broadcast over the examples: the definition, a broadcast multiply.
spread_p.defvmap(lambda bdims, g, mask, axes: _keep(g, axes, mask.ndim) * Tensor(mask))


def _spread(g: Tensor, mask: Tensor, axes: tuple) -> Tensor:
    """``_keep(g) * mask`` for max's rules, as one primitive where the window is small."""
    n = math.prod(mask.shape[a] for a in axes)
    # Leading batch axes (a Jacobian's) or one big window: the broadcast multiply.
    if g.ndim + len(axes) != mask.ndim or n > _FOLD or n < 2 or g.ndim == 0:
        return _keep(g, axes, mask.ndim) * mask
    return bind(spread_p, g, mask=mask.data, axes=axes)


@max_p.defvjp
def _max_vjp(k, g, out, x, axes):
    # The mask is built here from x and the saved max: the forward keeps nothing.
    mask, split = _max_mask(x, out, axes)
    return _spread(g if split is None else g * split, mask, axes)


@max_p.defjvp
def _max_jvp(k, t, out, x, axes):
    nb = t.ndim - x.ndim
    mask, split = _max_mask(x, out, axes)
    r = sum(t * mask, tuple(nb + a for a in axes))
    return r if split is None else r * split


@max_p.deffused
def _max_fused(g, out, x, axes):
    # The mask, the tie split and the spread in one pass over a pooling view.
    kernel = backend_of(x).window_max_vjp
    dx = kernel(x, out, g) if axes == (3, 5) and kernel else None
    return None if dx is None else (dx,)


max_p.defvmap(lambda bdims, x, axes: bind(max_p, x, axes=tuple(a + 1 for a in axes)))


@max_p.defbatch
def _max_batch(bdims, shapes, out_shape, axes):
    b = bdims[0]
    if b in axes:
        raise BatchMixingError("max over the batch axis: rows mix")
    return b - builtins.sum(1 for a in axes if a < b)


def max(x, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over ``axis``; its gradient is split evenly between ties."""
    x = as_tensor(x)
    axes = normalize_axes(axis, x.ndim)
    r = bind(max_p, x, axes=axes)
    return _keep(r, axes, x.ndim) if keepdims else r


def logsumexp(x, axis=-1, keepdims: bool = False) -> Tensor:
    """``log(sum(exp(x)))`` over ``axis``, stable for large inputs."""
    x = as_tensor(x)
    if type(x) is Batched:  # the shift is per example: on the physical tensor
        return Batched(logsumexp(x.phys, shifted_axes(axis, x.ndim), keepdims), x.level)
    xp = backend_of(x.data)
    # The shift is a constant: it cancels in the value and in every derivative.
    m = xp.max(x.data, axis=normalize_axes(axis, x.ndim), keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    r = log(sum(exp(x - Tensor(m)), axis, keepdims=True)) + Tensor(m)
    return r if keepdims else reshape(r, tuple(n for i, n in enumerate(r.shape)
                                               if i not in normalize_axes(axis, x.ndim)))


def _row_max(xp, x, axis):
    """``xp.max(x, axis, keepdims=True)``. Over short last-axis rows (a classifier's
    logits) as a running ``maximum`` of the columns: NumPy's reduction walks each
    row on its own, 111 against about 30 us on 2048 rows of 10 (a NaN wins either way)."""
    n = x.shape[axis] if x.ndim else 0
    if axis not in (-1, x.ndim - 1) or not 1 < n <= 16 or x.size < 256 * n:
        return xp.max(x, axis=axis, keepdims=True)
    m = xp.maximum(x[..., 0], x[..., 1])
    for j in range(2, n):
        xp.maximum(m, x[..., j], out=m)
    return m[..., None]


def _shift(xp, x, m):
    """``x - m`` for a max ``m``: the shift cancels in softmax and log-softmax and
    keeps exp from overflowing; all -inf rows give 0/0 and +inf rows inf-inf,
    NaN as in torch."""
    return x - xp.where(m == -math.inf, 0, m)


def _softmax_impl(x, axis):
    xp = backend_of(x)
    # Any shift cancels; the row max keeps exp from overflowing. Over short
    # rows NumPy's max is slow (18x a max over whole 32x32 blocks), so shift
    # by the max over the last two axes (or by nothing, where nothing can
    # overflow), and redo exactly the case where some row's sum came out
    # below sqrt(tiny): rows far under their shift (their small entries would
    # underflow), all -inf, inf or nan.
    if axis == -1 and x.ndim >= 2 and x.shape[-1] * x.shape[-2] <= 4096 and x.dtype.kind == "f":
        info = xp.finfo(x.dtype)
        if xp.max(x) < math.log(info.max) - math.log(x.shape[-1]) - 1:
            # No exp, nor any row's sum, can overflow: no shift at all (one
            # broadcast subtract fewer). Underflow is caught as for a shift.
            e = xp.exp(x)
        else:
            m = xp.max(x, axis=(-2, -1), keepdims=True)
            e = _shift(xp, x, m)
            xp.exp(e, out=e)
        floor = math.sqrt(info.tiny)
        ok = xp.divide_by_row_sums(e, floor) if xp.divide_by_row_sums else None  # one pass
        if ok is None:
            # Row sums as one matrix-vector product over all rows (e is a new array).
            s = xp.reshape(xp.matmul(xp.reshape(e, (-1, x.shape[-1])),
                                     xp.ones(x.shape[-1], dtype=e.dtype)), x.shape[:-1] + (1,))
            ok = bool(xp.all(s >= floor))
            if ok:
                e /= s
        if ok:
            return e
    m = xp.max(x, axis=axis, keepdims=True)
    e = _shift(xp, x, m)
    e = xp.exp(e, out=e) if e.dtype.kind in "fc" else xp.exp(e)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


softmax_p = Primitive("softmax", _softmax_impl)
# One primitive instead of exp(x - logsumexp(x)): three passes forward, and a
# VJP of three, in engine ops on the output, so it differentiates again.
softmax_p.defvjp(lambda k, g, out, x, axis: out * (g - sum(g * out, axis, keepdims=True)))
softmax_p.defjvp(lambda k, t, out, x, axis: out * (t - sum(t * out, axis, keepdims=True)))


@softmax_p.deffused
def _softmax_fused(g, out, x, axis):
    # The VJP as one pass over the rows, where the backend has the kernel.
    kernel = backend_of(g).softmax_vjp
    dx = kernel(g, out) if axis == -1 and kernel else None
    return None if dx is None else (dx,)


softmax_p.defvmap(same_op(softmax_p))  # the axis counts from the end


@softmax_p.defbatch
def _softmax_batch(bdims, shapes, out_shape, axis):
    if bdims[0] == axis % len(out_shape):
        raise BatchMixingError("softmax along the batch axis: rows mix")
    return bdims[0]


def softmax(x, axis=-1) -> Tensor:
    """``exp(x) / sum(exp(x))`` along ``axis``, stable for large inputs."""
    x = as_tensor(x)
    # A negative axis names the same axis of a cotangent with leading batch axes.
    return bind(softmax_p, x, axis=normalize_axes(int_axis(axis), x.ndim)[0] - x.ndim)


def _log_softmax_impl(x, axis):
    xp = backend_of(x)
    m = _row_max(xp, x, axis)
    r = _shift(xp, x, m)
    r = r.astype(xp.result_type(r.dtype, 1.0), copy=False)  # integers: float, as exp gives
    e = xp.exp(r)
    if axis in (-1, r.ndim - 1) and r.ndim and r.dtype.kind == "f":
        # The rows' sums as one matrix-vector product (NumPy's sum walks each short row).
        s = xp.matmul(e, xp.ones(r.shape[-1], dtype=r.dtype))[..., None]
    else:
        s = xp.sum(e, axis=axis, keepdims=True)
    r -= xp.log(s)
    return r


log_softmax_p = Primitive("log_softmax", _log_softmax_impl)
# x - logsumexp(x) as one primitive (the composite records ten ops each way);
# its rules are in engine ops on the output, softmax being exp(out).
log_softmax_p.defvjp(lambda k, g, out, x, axis: g - exp(out) * sum(g, axis, keepdims=True))
log_softmax_p.defjvp(lambda k, t, out, x, axis: t - sum(exp(out) * t, axis, keepdims=True))
log_softmax_p.defbatch(_softmax_batch)
log_softmax_p.defvmap(same_op(log_softmax_p))


def log_softmax(x, axis=-1) -> Tensor:
    """``x - logsumexp(x)`` along ``axis``, stable for large inputs."""
    x = as_tensor(x)
    return bind(log_softmax_p, x, axis=normalize_axes(int_axis(axis), x.ndim)[0] - x.ndim)


# -- min, argmax, var, std, prod, cumsum ----------------------------------------------------

def min(x, axis=None, keepdims: bool = False) -> Tensor:
    """Minimum over ``axis``: ``-max(-x)``, so ties and NaNs behave as in :func:`max`."""
    return -max(-as_tensor(x), axis, keepdims)


def _arg(name: str):
    def arg(x, axis=None, keepdims: bool = False) -> Tensor:
        x = as_tensor(x)
        if axis is not None:
            (axis,) = normalize_axes(int_axis(axis), x.ndim)
        if type(x) is Batched:  # per example: over the physical tensor's later axes
            if axis is None:
                r = arg(reshape(x.phys, x.phys.shape[:1] + (x.size,)), 1)
                return Batched(reshape(r, r.shape + (1,) * x.ndim) if keepdims else r, x.level)
            return Batched(arg(x.phys, axis + 1, keepdims), x.level)
        xp = backend_of(x.data)
        r = getattr(xp, name)(x.data, axis=axis)
        if keepdims:
            r = r.reshape(tuple(1 if axis in (None, a) else n for a, n in enumerate(x.shape)))
        return Tensor(xp.asarray(r))  # integer indices: no gradient
    arg.__name__ = name
    arg.__doc__ = f"NumPy's ``{name}`` (one axis, or the flattened tensor): an integer Tensor."
    return arg


argmax, argmin = _arg("argmax"), _arg("argmin")


def _over_axes_batch(bdims, shapes, out_shape, axes, **_):
    b, ndim = bdims[0], len(shapes[0])
    pos = [a % ndim for a in axes]
    if b in pos:
        raise BatchMixingError("a reduction over the batch axis: rows mix")
    return b - builtins.sum(1 for a in pos if a < b)


def _centered(x: Tensor, axes: tuple) -> Tensor:
    """``x`` minus its mean over ``axes``; where that mean overflows (entries near
    the dtype's max: a check on the small side) the mean of ``x / n`` instead."""
    m = mean(x, axes, keepdims=True)
    xp = backend_of(m.data)
    if not xp.all(xp.isfinite(m.data)):
        n = math.prod(x.shape[a] for a in axes)
        m = sum(x * (1.0 / n), axes, keepdims=True)
    return x - m


def _var_scale(x, axes: tuple, ddof: int) -> float:
    n = math.prod(x.shape[a] for a in axes)
    return 2.0 / (n - ddof) if n > ddof else math.nan


# NumPy's var, value for value; its derivative is 2 (x - mean) / (n - ddof), as torch's,
# in engine ops (so its Hessian, 2 (I - 1/n) / (n - ddof), follows). Written as the
# composite mean((x - mean)^2) it would carry sum(x - mean) = 0 along, and at an
# infinite entry inf - inf = NaN would reach every entry's derivative.
var_p = Primitive("var", lambda x, axes, ddof: backend_of(x).var(x, axis=axes, ddof=ddof))
var_p.defvjp(lambda k, g, out, x, axes, ddof:
             _keep(g, tuple(a % x.ndim for a in axes), x.ndim)
             * (_centered(x, axes) * _var_scale(x, axes, ddof)))
var_p.defjvp(lambda k, t, out, x, axes, ddof:
             sum(t * _centered(x, axes), tuple(t.ndim + a for a in axes))
             * _var_scale(x, axes, ddof))
var_p.defbatch(_over_axes_batch)
var_p.defvmap(same_op(var_p))  # the axes count from the end


def var(x, axis=None, ddof: int = 0, keepdims: bool = False) -> Tensor:
    """Variance over ``axis`` as NumPy's (``ddof=0``: divided by ``n - ddof``)."""
    x = as_tensor(x)
    axes = normalize_axes(axis, x.ndim)
    r = bind(var_p, x, axes=tuple(a - x.ndim for a in axes), ddof=ddof)
    return _keep(r, axes, x.ndim) if keepdims else r


def std(x, axis=None, ddof: int = 0, keepdims: bool = False) -> Tensor:
    """Standard deviation over ``axis``: ``sqrt(var)``, with derivative 0 where the
    variance is 0, as torch (not ``0 * inf``)."""
    if type(x) is Batched:  # the mask below is per example: on the physical tensor
        return Batched(std(x.phys, shifted_axes(axis, x.ndim), ddof, keepdims), x.level)
    v = var(x, axis, ddof, keepdims)
    flat = v.data == 0
    if not backend_of(v.data).any(flat):
        return v ** 0.5
    # Both wheres: the sqrt never sees the 0, so no inf meets the 0 cotangent.
    return where(flat, 0.0, where(flat, 1.0, v) ** 0.5)


def _prod_impl(x, axes):
    return backend_of(x).prod(x, axis=axes)  # axes count from the end: batch axes go first


prod_p = Primitive("prod", _prod_impl)


def _reverse(t: Tensor, axis: int) -> Tensor:
    return getitem(t, (Ellipsis, slice(None, None, -1)) + (slice(None),) * (-axis - 1))


# h_k = a_k h_{k-1} + b_k along the last axis (h_{-1} = 0): a first-order linear
# recurrence. Its derivatives are scans again, so products built from it (prod's
# derivative) are exact at every order, with no division. It runs in order, one
# step per entry (a cumprod where b is zero past its first entry, as for prod's
# first derivative): a parallel scan multiplies partial sums of 0 by inf, NaN.
def _scan_impl(a, b):
    xp = common_backend((a, b))
    dtype = xp.result_type(a, b)
    a, b = xp.broadcast_arrays(a, b)
    if b.shape[-1] and not xp.any(b[..., 1:]):  # b_0 times a running product of a
        h = a.astype(dtype)  # a new array
        h[..., 0] = 1
        return xp.multiply(xp.cumprod(h, axis=-1, out=h), b[..., :1], out=h)
    h = xp.moveaxis(b, -1, 0).astype(dtype, order="C")  # a new array, each step contiguous
    a = xp.moveaxis(a, -1, 0)
    for k in range(1, h.shape[0]):
        h[k] += a[k] * h[k - 1]
    return xp.moveaxis(h, 0, -1)


def _step(t: Tensor, by: int) -> Tensor:
    """``t`` moved one place along the last axis, a 0 coming in: ``t_{k-1}`` at ``k``
    (``by`` 1) or ``t_{k+1}`` (``by`` -1)."""
    kept = getitem(t, (Ellipsis, slice(None, -1) if by > 0 else slice(1, None)))
    return bind(pad_p, kept, width=((0, 0),) * (t.ndim - 1) + ((1, 0) if by > 0 else (0, 1),))


def _scan(a: Tensor, b: Tensor) -> Tensor:
    return bind(scan_p, a, b)


def _scan_vjp(k, g, out, a, b):
    # b's cotangent is the scan run backwards, each a_{k+1} carrying to k; a_k's
    # is that times h_{k-1}.
    gb = _reverse(_scan(_reverse(_step(a, -1), -1), _reverse(g, -1)), -1)
    return gb if k == 1 else gb * _step(out, 1)


def _scan_batch(bdims, shapes, out_shape):
    b = elementwise_batch(bdims, shapes, out_shape)
    if b == len(out_shape) - 1:
        raise BatchMixingError("a scan along the batch axis: rows mix")
    return b


scan_p = Primitive("scan", _scan_impl)
scan_p.defvjp(_scan_vjp)
scan_p.defjvp(lambda k, t, out, a, b: _scan(a, t * _step(out, 1) if k == 0 else t))
scan_p.defbatch(_scan_batch)
scan_p.defvmap(same_op(scan_p, align=True))  # along the last axis, never the examples' one
broadcasting(scan_p)


def _others(x: Tensor) -> Tensor:
    """The product of the other entries at each entry along the last axis, as the
    products before it times those after it (scans): exact with zeros and
    infinities, where ``prod / x`` is 0 / 0 or inf / inf, and finite where only the
    whole product overflows. Narrower floats than float64 run in float64 (as torch's
    CPU kernels accumulate): a product of two entries near float32's max, or a
    second derivative's sum of such products, stays finite until the end."""
    xp = backend_of(x.data)
    wide = xp.result_type(x.dtype, xp.float64)
    w = astype(x, wide)
    first = Tensor(xp.eye(1, x.shape[-1], dtype=wide)[0])  # 1, 0, 0, ...
    before = _scan(_step(w, 1), first)
    after = _reverse(_scan(_step(_reverse(w, -1), 1), first), -1)
    return astype(before * after, x.dtype)


def _prod_d(out: Tensor, x: Tensor, axes: tuple) -> Tensor:
    """d prod / d x, shaped as ``x``: ``prod / x`` where every product is a normal
    number (no zero, infinity or NaN among its entries, nothing over- or
    underflowed: a check on the small side), else the product of the others."""
    pos = tuple(a % x.ndim for a in axes)
    xp = backend_of(out.data)
    size, info = xp.abs(out.data), xp.finfo(out.dtype)
    if xp.all((size >= info.tiny) & (size <= info.max)):
        return _keep(out, pos, x.ndim) / x
    # The reduced axes last, as one: their others, put back.
    order = [a for a in range(x.ndim) if a not in pos] + list(pos)
    moved = transpose(x, order)
    lead = moved.shape[:x.ndim - len(pos)]
    d = reshape(_others(reshape(moved, lead + (math.prod(moved.shape[len(lead):]),))),
                moved.shape)
    return transpose(d, [order.index(a) for a in range(x.ndim)])


prod_p.defvjp(lambda k, g, out, x, axes:
              _keep(g, tuple(a % x.ndim for a in axes), x.ndim) * _prod_d(out, x, axes))
prod_p.defjvp(lambda k, t, out, x, axes:
              sum(t * _prod_d(out, x, axes), tuple(t.ndim + a for a in axes)))
prod_p.defbatch(_over_axes_batch)
prod_p.defvmap(same_op(prod_p))  # the axes count from the end


def prod(x, axis=None, keepdims: bool = False) -> Tensor:
    """Product over ``axis`` as NumPy's. Its derivative is the product of the other
    entries: exact with zeros and infinities (no 0 / 0), and where the whole product
    over- or underflows; so are its derivatives of every order."""
    x = as_tensor(x)
    axes = normalize_axes(axis, x.ndim)
    r = bind(prod_p, x, axes=tuple(a - x.ndim for a in axes))
    return _keep(r, axes, x.ndim) if keepdims else r


cumsum_p = Primitive("cumsum", lambda x, axis: backend_of(x).cumsum(x, axis=axis))
cumsum_p.defvjp(lambda k, g, out, x, axis: _reverse(bind(cumsum_p, _reverse(g, axis), axis=axis),
                                                    axis))
cumsum_p.deflinear()


cumsum_p.defvmap(same_op(cumsum_p))  # the axis counts from the end


@cumsum_p.defbatch
def _cumsum_batch(bdims, shapes, out_shape, axis):
    if bdims[0] == len(shapes[0]) + axis:
        raise BatchMixingError("cumsum along the batch axis: rows mix")
    return bdims[0]


def cumsum(x, axis=None) -> Tensor:
    """Running sum along ``axis`` as NumPy's (``None``: over the flattened tensor)."""
    x = as_tensor(x)
    if axis is None:
        x, axis = reshape(x, (x.size,)), 0
    (a,) = normalize_axes(int_axis(axis), x.ndim)
    return bind(cumsum_p, x, axis=a - x.ndim)
