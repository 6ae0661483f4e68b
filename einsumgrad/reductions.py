"""Reductions that are not einsums: max (pooling) and the softmax family.

``sum`` and ``mean`` are einsums (linear.py). ``max`` is a primitive whose
rules build the argmax mask once, from the input and the saved output;
``softmax`` is one primitive whose rules are in engine ops on its output;
``logsumexp`` and ``log_softmax`` are composites with a constant shift.
"""
from __future__ import annotations

import builtins
import math

from .backend import backend_of
from .elementwise import exp, log
from .linear import _axes, reshape, sum
from .tensor import BatchMixingError, Primitive, Tensor, as_tensor, bind

def _offsets(shape: tuple, axes: tuple) -> list:
    """One index per position in the reduced ``axes`` (ints there, whole slices elsewhere).

    Reductions over a few small axes (pooling windows) run as element-wise ops
    over these slices: NumPy's reduce over short strided axes is many times slower.
    """
    idx = [()]
    for a in range(len(shape)):
        idx = [i + (j,) for i in idx for j in range(shape[a])] if a in axes else \
            [i + (slice(None),) for i in idx]
    return idx


_FOLD = 64  # fold over slices up to this many window positions, else one reduce


def _max_impl(x, axes):
    xp = backend_of(x)
    n = math.prod(x.shape[a] for a in axes)
    if n > _FOLD or n < 2 or x.ndim == len(axes):
        return xp.max(x, axis=axes)
    offs = _offsets(x.shape, axes)
    r = xp.maximum(x[offs[0]], x[offs[1]])
    for o in offs[2:]:
        xp.maximum(r, x[o], out=r)
    return r


max_p = Primitive("max", _max_impl)


def _max_mask(x: Tensor, out: Tensor, axes: tuple) -> tuple:
    """Constants for max's rules: where ``x`` attains its maximum (1, else 0), and
    ``1 / (number of ties)`` shaped like ``out``, or None where no window ties.

    Ties (windows of zeros after a ReLU) split the derivative evenly; the
    split is applied on the small output side, not on the mask.
    """
    xp = backend_of(x.data)
    mask = (x.data == xp.expand_dims(out.data, axes)).astype(x.dtype)
    n = math.prod(x.shape[a] for a in axes)
    if n > _FOLD or n < 2 or x.ndim == len(axes):
        count = xp.sum(mask, axis=axes)
    else:
        offs = _offsets(x.shape, axes)
        count = mask[offs[0]] + mask[offs[1]]
        for o in offs[2:]:
            count += mask[o]
    if not (xp.size(count) and xp.max(count) > 1):
        return Tensor(mask), None
    return Tensor(mask), Tensor(xp.reciprocal(count))


def _keep(t: Tensor, axes: tuple, ndim: int) -> Tensor:
    """``t`` (leading batch axes, then a max's output) with the reduced axes back as size 1."""
    nb = t.ndim - (ndim - len(axes))
    it = iter(t.shape[nb:])
    return reshape(t, t.shape[:nb] + tuple(1 if a in axes else next(it) for a in range(ndim)))


def _spread_impl(g, mask, axes):
    xp = backend_of(g)
    r = xp.empty_like(mask)
    kept = [a for a in range(mask.ndim) if a not in axes]
    order = sorted(range(g.ndim), key=lambda i: -mask.strides[kept[i]])
    if sorted(range(g.ndim), key=lambda i: -g.strides[i]) != order:
        # g in the mask's memory order first (one copy of the small side), so
        # each multiply below walks all three arrays the same way.
        buf = xp.empty(tuple(g.shape[i] for i in order), dtype=g.dtype)
        buf[...] = xp.transpose(g, order)
        g = xp.transpose(buf, tuple(order.index(i) for i in range(g.ndim)))
    for o in _offsets(mask.shape, axes):
        xp.multiply(g, mask[o], out=r[o])
    return r


# spread(g, mask) = g, with the reduced axes put back, times the constant mask:
# max's VJP. One multiply per window position keeps NumPy's inner loops long,
# where the broadcast multiply runs them over the window's 2 or 3 entries.
spread_p = Primitive("spread", _spread_impl, linear=True)
spread_p.defvjp(lambda k, g, out, x, mask, axes:
                sum(g * Tensor(mask), tuple(g.ndim - mask.ndim + a for a in axes)))
spread_p.defjvp(lambda k, t, out, x, mask, axes: _spread(t, Tensor(mask), axes))


@spread_p.defbatch
def _spread_batch(bdims, shapes, out_shape, mask, axes):
    kept = [a for a in range(len(out_shape)) if a not in axes]
    return kept[bdims[0]]


def _spread(g: Tensor, mask: Tensor, axes: tuple) -> Tensor:
    """``_keep(g) * mask`` for max's rules, as one primitive where the window is small."""
    n = math.prod(mask.shape[a] for a in axes)
    # A C-ordered g (from a reshape) against a mask in another order is where
    # the broadcast multiply is slowest; otherwise (g laid out as the mask,
    # leading batch axes, one big window) it is as fast or faster.
    if (g.ndim + len(axes) != mask.ndim or n > _FOLD or n < 2 or g.ndim == 0
            or not g.data.flags.c_contiguous):
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


@max_p.defbatch
def _max_batch(bdims, shapes, out_shape, axes):
    b = bdims[0]
    if b in axes:
        raise BatchMixingError("max over the batch axis: rows mix")
    return b - builtins.sum(1 for a in axes if a < b)


def max(x, axis=None, keepdims: bool = False) -> Tensor:
    """Maximum over ``axis``; its gradient is split evenly between ties."""
    x = as_tensor(x)
    axes = _axes(axis, x.ndim)
    r = bind(max_p, x, axes=axes)
    return _keep(r, axes, x.ndim) if keepdims else r


def logsumexp(x, axis=-1, keepdims: bool = False) -> Tensor:
    """``log(sum(exp(x)))`` over ``axis``, stable for large inputs."""
    x = as_tensor(x)
    xp = backend_of(x.data)
    # The shift is a constant: it cancels in the value and in every derivative.
    m = xp.max(x.data, axis=_axes(axis, x.ndim), keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    r = log(sum(exp(x - Tensor(m)), axis, keepdims=True)) + Tensor(m)
    return r if keepdims else reshape(r, tuple(n for i, n in enumerate(r.shape)
                                               if i not in _axes(axis, x.ndim)))


def _softmax_impl(x, axis):
    xp = backend_of(x)
    # Any shift cancels; the row max keeps exp from overflowing. Over short
    # rows NumPy's max is slow (18x a max over whole 32x32 blocks), so shift
    # by the max over the last two axes, and redo exactly the case where some
    # row's sum came out below sqrt(tiny): rows far under their block's max
    # (their small entries would underflow), all -inf, inf or nan.
    if axis == -1 and x.ndim >= 2 and x.shape[-1] * x.shape[-2] <= 4096 and x.dtype.kind == "f":
        m = xp.max(x, axis=(-2, -1), keepdims=True)
        e = x - xp.where(m == -math.inf, 0, m)
        xp.exp(e, out=e)
        s = xp.matmul(e, xp.ones(x.shape[-1], dtype=e.dtype))[..., None]  # row sums
        if xp.all(s >= math.sqrt(xp.finfo(x.dtype).tiny)):
            e /= s
            return e
    m = xp.max(x, axis=axis, keepdims=True)
    e = x - xp.where(m == -math.inf, 0, m)  # -inf rows 0/0, +inf rows inf-inf: NaN as torch
    e = xp.exp(e, out=e) if e.dtype.kind in "fc" else xp.exp(e)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


softmax_p = Primitive("softmax", _softmax_impl)
# One primitive instead of exp(x - logsumexp(x)): three passes forward, and a
# VJP of three, in engine ops on the output, so it differentiates again.
softmax_p.defvjp(lambda k, g, out, x, axis: out * (g - sum(g * out, axis, keepdims=True)))
softmax_p.defjvp(lambda k, t, out, x, axis: out * (t - sum(t * out, axis, keepdims=True)))


@softmax_p.defbatch
def _softmax_batch(bdims, shapes, out_shape, axis):
    if bdims[0] == axis % len(out_shape):
        raise BatchMixingError("softmax along the batch axis: rows mix")
    return bdims[0]


def softmax(x, axis=-1) -> Tensor:
    """``exp(x) / sum(exp(x))`` along ``axis``, stable for large inputs."""
    x = as_tensor(x)
    # A negative axis names the same axis of a cotangent with leading batch axes.
    return bind(softmax_p, x, axis=_axes(axis, x.ndim)[0] - x.ndim)


def _log_softmax_impl(x, axis):
    xp = backend_of(x)
    m = xp.max(x, axis=axis, keepdims=True)
    r = x - xp.where(m == -math.inf, 0, m)  # the shift cancels; NaN rows as softmax's
    r = r.astype(xp.result_type(r.dtype, 1.0), copy=False)  # integers: float, as exp gives
    r -= xp.log(xp.sum(xp.exp(r), axis=axis, keepdims=True))
    return r


log_softmax_p = Primitive("log_softmax", _log_softmax_impl)
# x - logsumexp(x) as one primitive (the composite records ten ops each way);
# its rules are in engine ops on the output, softmax being exp(out).
log_softmax_p.defvjp(lambda k, g, out, x, axis: g - exp(out) * sum(g, axis, keepdims=True))
log_softmax_p.defjvp(lambda k, t, out, x, axis: t - sum(exp(out) * t, axis, keepdims=True))
log_softmax_p.defbatch(_softmax_batch)


def log_softmax(x, axis=-1) -> Tensor:
    """``x - logsumexp(x)`` along ``axis``, stable for large inputs."""
    x = as_tensor(x)
    return bind(log_softmax_p, x, axis=_axes(axis, x.ndim)[0] - x.ndim)
