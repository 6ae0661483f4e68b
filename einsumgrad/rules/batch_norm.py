"""Batch normalization in training mode as one primitive: ``xhat * w + b`` with
``xhat = (x - mean) / sqrt(var + eps)``, the statistics over every axis but the
channels (axis 1 of ``(N, C, ...)``).

Composed of engine ops it records ~10 ops forward and ~20 backward on the full
activation; as one primitive the forward is a few passes and a backward that
records nothing one fused pass per term (:func:`_fused`), with the rules in
engine ops as ever (they differentiate again, to any order). The statistics
are reductions over the batch axis, so the batch rule refuses it: rows mix.
In eval mode batch norm is a per-channel affine map, composed of ``x * a + c``
by :func:`einsumgrad.nn.functional.batch_norm`, with no primitive.
"""
from __future__ import annotations

import math

from ..backends import backend_of
from ..plan import plan_for
from ..spec import Spec
from ..tensor import BatchMixingError, Primitive, Tensor, bind
from .einsum import broadcast_to, lift, sum_to
from .elementwise import sqrt
from .reductions import mean


def _channel_sum(a, axes: tuple):
    """``a`` summed over ``axes`` (negative, kept as size 1), as one planned einsum:
    the planner sums by a matrix-vector product in ``a``'s memory order."""
    labels = tuple(range(a.ndim))
    gone = {a.ndim + ax for ax in axes}
    r = plan_for(Spec((labels,), tuple(l for l in labels if l not in gone)), [a])([a])
    return r.reshape(tuple(1 if i in gone else n for i, n in enumerate(a.shape)))


def statistics(x, w, b, axes: tuple, eps: float, relu: bool = False) -> tuple:
    """``(y, xhat, mean, var, s)`` on backend arrays: the output, ``x`` normalized, and
    the batch mean, biased variance and ``1 / sqrt(var + eps)`` (axes kept as size 1).

    Two passes for the variance (over ``x - mean``), never ``E[x^2] - mean^2``,
    which cancels to noise for a large mean in float32. With ``relu`` the output
    is ``max(y, 0)``. Where the backend has a batch-norm kernel (numba's, for
    NumPy) it makes ``y`` and the statistics in three passes over ``x``, and
    ``xhat`` is None: the fused VJP makes it again from ``x`` as it goes.
    """
    xp = backend_of(x)
    kept = tuple(1 if i - x.ndim in axes else n for i, n in enumerate(x.shape))
    if xp.batch_norm and axes[0] == -x.ndim and axes[1:] == tuple(range(2 - x.ndim, 0)):
        got = xp.batch_norm(x, w, b, eps, relu)
        if got is not None:
            y, mu, var, s = got
            return (y, None) + tuple(a.reshape(kept) for a in (mu, var, s))
    n = math.prod(x.shape[a] for a in axes)
    mu = _channel_sum(x, axes) * (1.0 / n)
    xhat = xp.subtract(x, mu)
    sq = xp.multiply(xhat, xhat)
    var = _channel_sum(sq, axes) * (1.0 / n)
    s = 1.0 / xp.sqrt(var + eps)
    xhat *= s
    y = xp.multiply(xhat, w, out=sq)  # the square's buffer, no longer needed
    xp.add(y, b, out=y)  # through the backend: a rank-1 update where it has one (MKL)
    if relu:
        xp.maximum(y, 0, out=y)
    return y, xhat, mu, var, s


def _normalized(x: Tensor, axes: tuple, eps: float) -> tuple:
    """``(xhat, s)`` in engine ops on ``x``: what the rules differentiate through."""
    d = x - mean(x, axes, keepdims=True)
    s = 1.0 / sqrt(mean(d * d, axes, keepdims=True) + eps)
    return d * s, s


def _normalize_rule(t: Tensor, xhat: Tensor, s: Tensor, axes: tuple) -> Tensor:
    # xhat's Jacobian s (I - 11^T/n - xhat xhat^T/n) is symmetric: one formula for
    # the VJP and the JVP.
    return s * (t - mean(t, axes, keepdims=True) - xhat * mean(t * xhat, axes, keepdims=True))


def _relu_mask(out: Tensor) -> Tensor:
    # relu's rule on its output, a constant: 1 where out > 0, 0 where 0, NaN at NaN
    xp = backend_of(out.data)
    d = xp.asarray(xp.minimum(out.data, 1))
    return Tensor(xp.ceil(d, out=d))


def _vjp(k, g, out, x, w, b, axes, eps, stats=None, relu=False):
    nb = g.ndim - out.ndim
    if relu:
        g = g * _relu_mask(out)
    if k == 2:
        return sum_to(g, b.shape, nb)
    xhat, s = _normalized(x, axes, eps)
    if k == 1:
        return sum_to(g * xhat, w.shape, nb)
    return _normalize_rule(g * w, xhat, s, axes)


def _jvp(k, t, out, x, w, b, axes, eps, stats=None, relu=False):
    if k == 2:
        t = lift(t, b.ndim, out.ndim)
        y = broadcast_to(t, t.shape[:t.ndim - out.ndim] + out.shape)
    else:
        xhat, s = _normalized(x, axes, eps)
        y = xhat * lift(t, w.ndim, out.ndim) if k == 1 else _normalize_rule(t, xhat, s, axes) * w
    return y * _relu_mask(out) if relu else y


batch_norm_p = Primitive("batch_norm", lambda x, w, b, axes, eps, stats=None, relu=False:
                         statistics(x, w, b, axes, eps, relu)[0] if stats is None else stats[0])
batch_norm_p.defvjp(_vjp)
batch_norm_p.defjvp(_jvp)


@batch_norm_p.defvmap
def _vmap(bdims, x, w, b, axes, eps, stats=None, relu=False):
    # Each example normalizes over its own axes (counted from the end); the
    # statistics are computed again on the physical tensor.
    if bdims[1] is not None or bdims[2] is not None:
        raise NotImplementedError("vmap of batch_norm with a weight or bias per example")
    return bind(batch_norm_p, x, w, b, axes=axes, eps=eps, stats=None, relu=relu)


@batch_norm_p.defbatch
def _batch(bdims, shapes, out_shape, axes, eps, **_):
    if bdims[0] is not None and bdims[0] - len(out_shape) in axes:
        raise BatchMixingError("batch_norm in training mode normalizes with statistics over "
                               "the batch axis: rows mix (eval() uses running statistics)")
    if bdims[1] is not None or bdims[2] is not None:
        raise BatchMixingError("batch_norm with a weight or bias that varies along the batch")
    return bdims[0]


@batch_norm_p.deffused
def _fused(g, out, x, w, b, axes, eps, stats=None, relu=False):
    # The rules above on arrays, with the forward's statistics:
    # dx = w s (g - sum(g)/n - xhat sum(g xhat)/n), dw = sum(g xhat), db = sum(g).
    if stats is None or g.shape != out.shape:  # a Jacobian's basis: the rules
        return None
    xp = backend_of(g)
    xhat, mu, s = stats[1], stats[2], stats[4]
    if xhat is None:  # the forward ran the backend's kernel: so does the backward
        got = xp.batch_norm_vjp(g, out, x, mu, s, w, relu)
        if got is not None:
            return got[0], got[1].reshape(w.shape), got[2].reshape(b.shape)
        xhat = xp.multiply(xp.subtract(x, mu), s)
    if relu:
        g = xp.multiply(g, _relu_mask(Tensor(out)).data)
    n = math.prod(x.shape[a] for a in axes)
    gx = xp.multiply(g, xhat)
    sum_gx, sum_g = _channel_sum(gx, axes), _channel_sum(g, axes)
    a = w * s
    dx = xp.multiply(xhat, a * sum_gx * (-1.0 / n), out=gx)
    xp.add(dx, xp.multiply(g, a), out=dx)
    xp.subtract(dx, a * sum_g * (1.0 / n), out=dx)
    return dx, sum_gx.reshape(w.shape), sum_g.reshape(b.shape)


def batch_norm_train(x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple:
    """Batch norm of ``x`` ``(N, C, ...)`` with the batch's statistics, as a recorded op.

    Args:
        w, b: per channel, shaped ``(C, 1, ...)`` to broadcast against ``x``'s
            axes after the batch.

    Returns:
        ``(y, mean, var)``: the output Tensor, and the batch mean and biased
        variance per channel (backend arrays, ``(C,)``) for running statistics.
    """
    axes = (-x.ndim,) + tuple(range(-x.ndim + 2, 0))  # negative: leading axes pass through
    stats = statistics(x.data, w.data, b.data, axes, float(eps))
    y = bind(batch_norm_p, x, w, b, axes=axes, eps=float(eps), stats=stats)
    return y, stats[2].reshape(-1), stats[3].reshape(-1)


def relu_of(y: Tensor) -> Tensor | None:
    """``relu(y)`` recorded as one batch-norm op with the ReLU fused, where ``y`` is
    the output of :func:`batch_norm_train` as recorded (else None).

    The values are relu's (``max(y, 0)``) and the derivatives the composition's,
    but the backward masks the cotangent inside the batch norm's fused pass
    instead of a ReLU's passes of its own. ``y`` itself stays as it was.
    """
    node = y.node
    if (node is None or node.prim is not batch_norm_p or node.params.get("relu")
            or node.params.get("stats") is None or y.version != node.out_version
            or any(t.version != v for t, v in zip(node.inputs, node.versions))):
        return None
    stats = node.params["stats"]
    out = backend_of(y.data).maximum(y.data, 0)
    return bind(batch_norm_p, *node.inputs, **dict(node.params, stats=(out,) + stats[1:],
                                                   relu=True))
