"""Attention's core as one primitive: ``softmax(scale * q k^T) v`` over the last two axes.

In engine ops the core is two einsums around a softmax, and its backward four
einsums and the softmax's rule, each a pass over the ``(..., Lq, Lk)`` scores
in memory. As one primitive a backend may run it as one kernel over the
matrix pairs (the NumPy backend's ``attention`` and ``attention_vjp``: each
pair's scores stay in cache), while the rules below stay the definition, in
engine ops: the VJP and JVP of every order, and what the transforms
differentiate. ``q``, ``k`` and ``v`` share their leading axes; the scale is
positive. ``scaled_dot_product_attention`` binds it where the backend's kernel
runs it (``attention_team``); elsewhere the composition runs as it always did.
"""
from __future__ import annotations

from ..backends import backend_of
from ..tensor import BatchMixingError, Primitive, as_tensor
from .einsum import einsum, sum
from .reductions import _softmax_fused, _softmax_impl, softmax
from .shape import batched_all, bind


def _probs_array(xp, q, k, scale):
    """``softmax(scale * q k^T)`` on arrays."""
    s = xp.matmul(q, xp.swapaxes(k, -1, -2))
    s *= scale
    return _softmax_impl(s, -1)


def _attention_impl(q, k, v, scale):
    xp = backend_of(q)
    o = xp.attention(q, k, v, scale) if xp.attention is not None else None
    return o if o is not None else xp.matmul(_probs_array(xp, q, k, scale), v)


def _probs(q, k, scale):
    return softmax(einsum("...qd,...kd->...qk", q, k) * scale, -1)


def _vjp(i, g, out, q, k, v, scale):
    p = _probs(q, k, scale)
    if i == 2:
        return einsum("...qk,...qd->...kd", p, g)
    dp = einsum("...qd,...kd->...qk", g, v)
    ds = p * (dp - sum(dp * p, -1, keepdims=True)) * scale  # the softmax's rule
    return einsum("...qk,...kd->...qd", ds, k) if i == 0 else einsum("...qk,...qd->...kd", ds, q)


def _jvp(i, t, out, q, k, v, scale):
    p = _probs(q, k, scale)
    if i == 2:
        return einsum("...qk,...kd->...qd", p, t)
    ds = (einsum("...qd,...kd->...qk", t, k) if i == 0 else
          einsum("...qd,...kd->...qk", q, t)) * scale
    return einsum("...qk,...kd->...qd", p * (ds - sum(ds * p, -1, keepdims=True)), v)


attention_p = Primitive("attention", _attention_impl)
attention_p.defvjp(_vjp)
attention_p.defjvp(_jvp)


@attention_p.deffused
def _fused(g, out, q, k, v, scale):
    # The three cotangents at once on arrays, for a backward that records nothing:
    # the backend's kernel, else the rules' products on arrays (the scores once).
    if g.shape != out.shape:  # a Jacobian's basis: the rules
        return None
    xp = backend_of(g)
    got = xp.attention_vjp(g, q, k, v, scale) if xp.attention_vjp is not None else None
    if got is not None:
        return got
    swap = lambda a: xp.swapaxes(a, -1, -2)  # noqa: E731
    p = _probs_array(xp, q, k, scale)
    dp = xp.matmul(g, swap(v))
    ds = _softmax_fused(dp, p, None, -1)  # the softmax's VJP reads its output alone
    ds = ds[0] if ds is not None else xp.multiply(p, dp - xp.sum(xp.multiply(dp, p), axis=-1,
                                                                 keepdims=True))
    ds *= scale
    return [xp.matmul(ds, k), xp.matmul(swap(ds), q), xp.matmul(swap(p), g)]


@attention_p.defbatch
def _batch(bdims, shapes, out_shape, scale):
    # A leading axis passes through; q's query rows and v's columns are independent
    # too. Any other axis of the last two is summed over: rows mix.
    n = len(out_shape)
    axes = set()
    for i, (b, s) in enumerate(zip(bdims, shapes)):
        if b is None:
            continue
        at = n - len(s) + b
        inner = at >= n - 2
        if inner and not ((i == 0 and at == n - 2) or (i == 2 and at == n - 1)):
            raise BatchMixingError("attention along the batch axis: the softmax or the "
                                   "products sum over it, so rows mix")
        axes.add(at)
    if len(axes) > 1:
        raise BatchMixingError("attention lines up the batch axis of one input with "
                               "another axis of the other: rows mix")
    return axes.pop()


attention_p.defvmap(lambda bdims, q, k, v, scale: bind(attention_p, *batched_all(bdims, (q, k, v)),
                                                         scale=scale))


def attention(q, k, v, scale: float):
    """``softmax(scale * q k^T) v`` over the last two axes of Tensors ``q`` ``(..., Lq,
    D)``, ``k`` ``(..., Lk, D)`` and ``v`` ``(..., Lk, Dv)`` of the same leading
    shape, ``scale`` > 0."""
    return bind(attention_p, *(as_tensor(t) for t in (q, k, v)), scale=float(scale))
