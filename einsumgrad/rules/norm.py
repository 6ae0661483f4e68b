"""Normalization primitives: the layer-norm family.

``normalize`` is ``(x - mean) / sqrt(var + eps)`` over trailing axes, one
primitive where the composite records ~10 ops forward and ~20 backward on the
full activation; ``layer_norm`` is ``xhat * weight + bias`` with ``xhat``
normalized, one primitive as torch's ``native_layer_norm``; ``inv_std`` is the
``1 / sqrt(var + eps)`` their rules need. Rules are engine ops, so they
differentiate again; forward and backward run as one pass over the rows each
where the backend offers the kernels (``xp.layer_norm``, ``xp.layer_norm_vjp``).
"""
from __future__ import annotations

import math
from typing import Any

from ..backends import backend_of
from ..tensor import BatchMixingError, Primitive, Tensor, as_tensor
from .einsum import broadcast_to, lift, sum, sum_to
from .elementwise import add_bias_array
from .reductions import mean
from .shape import Batched, bind, rank_up, stand_in

def _width(x, axes) -> int:
    """How many entries one normalized row has: the trailing ``axes`` of ``x``."""
    return math.prod(x.shape[a] for a in axes)


def _kept(x, axes) -> tuple:
    """``x``'s shape with the trailing ``axes`` kept as size 1 (the statistics')."""
    return x.shape[:x.ndim - len(axes)] + (1,) * len(axes)


def _centered(x, axes, eps):
    """``x - mean`` and ``1 / sqrt(var + eps)`` over the trailing ``axes`` (the
    latter with those axes kept as size 1).

    Row sums are matrix-vector products: NumPy's mean over short rows (a
    64-wide layer norm) goes row by row, 5x slower.
    """
    xp = backend_of(x)
    n, keep = _width(x, axes), _kept(x, axes)
    if n == 0:  # no entries: NaN statistics, as torch
        d = x - xp.mean(x, axis=axes, keepdims=True)
        return d, 1.0 / xp.sqrt(xp.mean(d * d, axis=axes, keepdims=True) + eps)
    rows = xp.reshape(x, (-1, n))
    ones = xp.ones(n, dtype=rows.dtype)
    d = xp.subtract(rows, (xp.matmul(rows, ones) * (1.0 / n))[:, None])
    var = xp.matmul(xp.multiply(d, d), ones) * (1.0 / n)
    return xp.reshape(d, x.shape), xp.reshape(1.0 / xp.sqrt(var + eps), keep)


def _unoverflowed(x, axes, eps, xhat, s) -> tuple:
    """``(xhat, s)`` with the rows whose variance overflowed (``s == 0`` though ``x``
    is finite: 1e300 next to 0, whose normalized values are about +-1, or a sum past
    the dtype's max) normalized again at ``x / m``, ``m = max |x|`` of the row, where
    nothing overflows: ``xhat = d' r``, ``s = r / m`` with ``d' = x / m - mean`` and
    ``r = 1 / sqrt(var' + eps / m^2)``. Other rows, and other arrays, as they were."""
    xp = backend_of(x)
    over = s == 0  # one entry per row
    if not bool(xp.any(over)):
        return xhat, s
    m = xp.where(over, xp.max(xp.abs(x), axis=axes, keepdims=True), 1)
    xs = x / m
    d = xs - xp.mean(xs, axis=axes, keepdims=True)
    r = 1.0 / xp.sqrt(xp.mean(d * d, axis=axes, keepdims=True) + eps / m / m)
    return xp.where(over, d * r, xhat), xp.where(over, r / m, s)


def _normalized(x, axes, eps) -> tuple:
    """``((x - mean) * s, s)`` with ``s = 1 / sqrt(var + eps)`` (axes kept as size 1)."""
    kernel = backend_of(x).layer_norm  # one pass over the rows where the backend has it
    fused = kernel(x, _width(x, axes), eps) if kernel else None
    if fused is not None:
        return _unoverflowed(x, axes, eps, fused[0], fused[1].reshape(_kept(x, axes)))
    d, s = _centered(x, axes, eps)
    d *= s
    return _unoverflowed(x, axes, eps, d, s)


def _normalize_impl(x, axes, eps, stats=None):
    # stats: (the output, s) as layer_norm computed them; s is kept for the rules.
    return _normalized(x, axes, eps)[0] if stats is None else stats[0]


def _normalize_rule(k, g, out, x, axes, eps, stats=None):
    # y = (x - mean) * s with s = 1/sqrt(var + eps): its Jacobian
    # s (I - 11^T/n - y y^T/n) is symmetric, so the VJP and JVP are one formula.
    # Written in engine ops on x and the output, so it differentiates again;
    # s is the forward's, not computed again (a pass over x fewer).
    m1 = mean(g, axes, keepdims=True)
    m2 = mean(g * out, axes, keepdims=True)
    s = bind(inv_std_p, x, axes=axes, eps=eps, value=None if stats is None else stats[1])
    return s * (g - m1 - out * m2)


# (x - mean) / sqrt(var + eps) over trailing axes as one primitive: the
# composite records ~10 ops forward and ~20 backward on the full activation.
normalize_p = Primitive("normalize", _normalize_impl)
normalize_p.defvjp(_normalize_rule)
normalize_p.defjvp(_normalize_rule)


@normalize_p.deffused
def _normalize_fused(g, out, x, axes, eps, stats=None):
    # The rule above as one pass over the rows, when the forward kept s.
    if stats is None:
        return None
    kernel = backend_of(g).layer_norm_vjp
    dx = kernel(g, out, stats[1], _width(x, axes)) if kernel else None
    return None if dx is None else (dx,)


def _inv_std_d(x, out, axes):
    # ds/dx = -s^3 (x - mean) / n, in engine ops: normalize's rule differentiates again.
    # Taken as -s^2 (s (x - mean)) / n with the mean a sum of x / n: nothing overflows
    # for a row near the dtype's max, where s is tiny and s^3 underflows.
    n = _width(x, axes)
    centered = x - sum(x * (1.0 / n), axes, keepdims=True)
    return (out * out) * (-1.0 / n) * (out * centered)


# 1 / sqrt(var + eps) over trailing axes (kept as size 1): normalize's rule
# needs it, as one primitive rather than six ops on the full activation
# (``value``: the forward's, where it has it).
inv_std_p = Primitive("inv_std", lambda x, axes, eps, value=None:
                      _normalized(x, axes, eps)[1] if value is None else value)
inv_std_p.defvjp(lambda k, g, out, x, axes, eps, value=None: g * _inv_std_d(x, out, axes))
inv_std_p.defjvp(lambda k, t, out, x, axes, eps, value=None:
                 sum(t * _inv_std_d(x, out, axes), axes, keepdims=True))


@normalize_p.defbatch
def _normalize_batch(bdims, shapes, out_shape, axes, eps, **_):
    if bdims[0] - len(out_shape) in axes:
        raise BatchMixingError("layer_norm normalizes along the batch axis: rows mix")
    return bdims[0]


inv_std_p.defbatch(_normalize_batch)

# The trailing axes are counted from the end; the forward's values (stats, value)
# are computed again on the physical tensor, where it has them, by the front end.
normalize_p.defvmap(lambda bdims, x, axes, eps, stats=None: _normalize(x, axes, eps))
inv_std_p.defvmap(lambda bdims, x, axes, eps, value=None:
                  bind(inv_std_p, x, axes=axes, eps=eps, value=None))


def _normalize(x: Tensor, axes: tuple, eps: float) -> Tensor:
    """``x`` normalized over the trailing ``axes``, keeping the forward's statistics
    for the rules where ``x`` holds values (outside vmap)."""
    stats = None if type(x) is Batched else _normalized(x.data, axes, eps)
    return bind(normalize_p, x, axes=axes, eps=eps, stats=stats)


def _layer_norm_impl(x, w, b, axes, eps, stats=None):
    # stats: (the output, x normalized, s) as layer_norm computed them.
    if stats is not None:
        return stats[0]
    xp = backend_of(x)
    y = xp.multiply(_normalized(x, axes, eps)[0], w)
    return y + b


def _normalized_node(x, axes, eps, stats):
    """x normalized, as a recorded normalize op (so it differentiates again)
    holding the forward's values, and normalize's stats (xhat, s) out of
    layer_norm's (y, xhat, s)."""
    inner = None if stats is None else stats[1:]
    return bind(normalize_p, x, axes=axes, eps=eps, stats=inner), inner


def _layer_norm_vjp(k, g, out, x, w, b, axes, eps, stats=None):
    nb = g.ndim - out.ndim
    if k == 2:
        return sum_to(g, b.shape, nb)
    xhat, inner = _normalized_node(x, axes, eps, stats)
    if k == 1:
        return sum_to(g * xhat, w.shape, nb)
    return _normalize_rule(0, g * w, xhat, x, axes, eps, inner)


def _layer_norm_jvp(k, t, out, x, w, b, axes, eps, stats=None):
    xhat, inner = _normalized_node(x, axes, eps, stats)
    if k == 0:
        return _normalize_rule(0, t, xhat, x, axes, eps, inner) * w
    p = w if k == 1 else b
    t = lift(t, p.ndim, out.ndim)
    return xhat * t if k == 1 else broadcast_to(t, t.shape[:t.ndim - out.ndim] + out.shape)


# ``xhat * weight + bias`` with xhat normalized, as one primitive (torch's
# native_layer_norm): forward and backward are one pass each over the rows
# where the backend has the kernels (numba's, for NumPy), the rules engine ops as ever.
layer_norm_p = Primitive("layer_norm", _layer_norm_impl)
layer_norm_p.defvjp(_layer_norm_vjp)
layer_norm_p.defjvp(_layer_norm_jvp)


@layer_norm_p.defbatch
def _layer_norm_batch(bdims, shapes, out_shape, axes, eps, **_):
    if bdims[1] is not None or bdims[2] is not None:
        raise BatchMixingError("layer_norm with a weight or bias that varies along the batch")
    return _normalize_batch(bdims[:1], shapes, out_shape, axes, eps)


@layer_norm_p.defvmap
def _layer_norm_vmap(bdims, x, w, b, axes, eps, stats=None):
    if bdims[1] is None and bdims[2] is None:
        return layer_norm(x, len(axes), w, b, eps)
    # A weight or bias per example: x normalized, then the affine step broadcast.
    rank = max(x.ndim - (bdims[0] is not None), w.ndim - (bdims[1] is not None),
               b.ndim - (bdims[2] is not None))
    up = lambda t, bd: rank_up(t, rank) if bd is not None else t  # noqa: E731
    return up(_normalize(x, axes, eps), bdims[0]) * up(w, bdims[1]) + up(b, bdims[2])


@layer_norm_p.deffused
def _layer_norm_fused(g, out, x, w, b, axes, eps, stats=None):
    if stats is None or w.shape != b.shape:
        return None
    kernel = backend_of(g).layer_norm_vjp
    r = kernel(g, stats[1], stats[2], _width(x, axes), w) if kernel else None
    return None if r is None else (r[0], r[1].reshape(w.shape), r[2].reshape(b.shape))


def _layer_norm_stats(x, axes, eps, w, b) -> tuple:
    """``(xhat * w + b, xhat, s)``: the output and what the rules keep."""
    kernel = backend_of(x).layer_norm
    fused = kernel(x, _width(x, axes), eps, w, b) if kernel else None
    if fused is not None and not bool(backend_of(x).any(fused[2] == 0)):  # else overflowed
        y, xhat, s = fused
        return y, xhat, s.reshape(_kept(x, axes))
    xhat, s = _normalized(x, axes, eps)
    y = backend_of(x).multiply(xhat, w)  # a new product: the bias can go into it in place
    return add_bias_array(y, b), xhat, s


def layer_norm(x: Any, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize over the trailing ``normalized_shape`` axes (biased variance, as torch)."""
    x = as_tensor(x)
    n = 1 if isinstance(normalized_shape, int) else len(tuple(normalized_shape))
    # Negative axes name the same axes of a cotangent with leading batch axes.
    axes, eps = tuple(range(-n, 0)), float(eps)
    if weight is not None and bias is not None:
        like = stand_in(x)
        weight, bias = as_tensor(weight, like=like), as_tensor(bias, like=like)
        if Batched in (type(x), type(weight), type(bias)):  # the batching rule computes them
            return bind(layer_norm_p, x, weight, bias, axes=axes, eps=eps, stats=None)
        return bind(layer_norm_p, x, weight, bias, axes=axes, eps=eps,
                    stats=_layer_norm_stats(x.data, axes, eps, weight.data, bias.data))
    y = _normalize(x, axes, eps)
    if weight is not None:
        return y * weight
    return y if bias is None else y + bias
