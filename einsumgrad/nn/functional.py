"""Stateless layers, each a few einsums, with ``torch.nn.functional``'s meaning.

Every function takes and returns :class:`~einsumgrad.Tensor` (NumPy or backend
arrays are accepted too) and is differentiable to any order, because it is
built from the engine's primitives only: einsum, element-wise ops, indexing
and the patch op of :mod:`einsumgrad.nn.patches`.
"""
from __future__ import annotations

import math
from typing import Any

from .. import jit, ops
from ..elementwise import _elementwise_batch
from ..backend import backend_of
from ..linear import einsum_spec
from ..spec import parse
from ..tensor import BatchMixingError, Primitive, Tensor, as_tensor, bind
from .patch_einsum import patch_einsum, unpatch_einsum  # noqa: F401  (re-exported)
from .patches import _pair, patches, unpatch  # noqa: F401  (re-exported)

__all__ = ["linear", "conv2d", "max_pool2d", "avg_pool2d", "layer_norm", "cross_entropy",
           "mse_loss", "scaled_dot_product_attention", "embedding", "dropout", "patches",
           "unpatch", "patch_einsum", "unpatch_einsum", "relu", "gelu", "softmax", "log_softmax"]

relu, gelu, softmax, log_softmax = ops.relu, ops.gelu, ops.softmax, ops.log_softmax


def _add_bias_impl(y, b):
    # y is a product the layer has just made, read by nothing else (an
    # einsum's rules need its inputs, never its output): add b in place while
    # y is still in cache, as a GEMM with a bias term would. A view that cannot
    # take the sum (stride 0, read-only, another dtype or shape) gets a new array.
    # With MKL the backend's add runs it as one rank-1 update on MKL's threads.
    xp = backend_of(y)
    fits = b.ndim <= y.ndim and all(n in (1, m) for n, m in zip(b.shape[::-1], y.shape[::-1]))
    if (fits and 0 not in y.strides and getattr(y.flags, "writeable", True)
            and xp.result_type(y, b) == y.dtype):
        return xp.add(y, b, out=y)
    return y + b


add_bias_p = Primitive("add_bias", _add_bias_impl, elementwise=True, linear=True)
add_bias_p.defvjp(lambda k, g, out, y, b: g)
add_bias_p.defjvp(lambda k, t, out, y, b: t)
add_bias_p.defbatch(_elementwise_batch)


def _add_bias(y: Tensor, b: Any) -> Tensor:
    """``y + b`` for a ``y`` this layer just computed and hands on to nobody else."""
    return bind(add_bias_p, y, as_tensor(b, like=y))


def linear(x: Any, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T + b``: the einsum ``'...i,oi->...o'`` with ``w`` of shape ``(out, in)``."""
    y = ops.einsum("...i,oi->...o", x, w)
    return y if b is None else _add_bias(y, b)


def conv2d(x: Any, w: Tensor, b: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation as torch's: ``x (B, C, H, W)``, ``w (F, C, kh, kw)``.

    The layer is one einsum over the patches of ``x``, ``'bchwkl,fckl->bfhw'``;
    its VJPs are the weight gradient ``'bfhw,bchwkl->fckl'`` and the patch
    cotangent ``'bfhw,fckl->bchwkl'`` added back onto the image by ``unpatch``.
    All three run as :func:`patch_einsum` / :func:`unpatch_einsum`: the forward
    and the weight gradient as matmuls over the patches copied a bounded chunk
    at a time (a copy made whole is kept for the weight gradient), the input
    gradient at stride 1 with enough channels as one matmul per kernel offset
    on the padded image.
    """
    y = patch_einsum("bchwkl,fckl->bfhw", x, w, w.shape[-2:], stride, padding)
    return y if b is None else _add_bias(y, ops.reshape(b, (-1, 1, 1)))


def max_pool2d(x: Any, kernel_size, stride=None) -> Tensor:
    """Maximum over each window (``stride`` defaults to the window size)."""
    x = as_tensor(x)
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(kernel_size if stride is None else stride)
    h, w = x.shape[-2:]
    if (kh, kw) == (sh, sw) and h % kh == 0 and w % kw == 0:
        # Windows tile the image: a reshape to (..., H/kh, kh, W/kw, kw) is a
        # view, and its adjoint a reshape too, so no window copy or overlap-add.
        t = ops.reshape(x, x.shape[:-2] + (h // kh, kh, w // kw, kw))
        return ops.max(t, axis=(-3, -1))
    return ops.max(patches(x, (kh, kw), (sh, sw)), axis=(-2, -1))


def avg_pool2d(x: Any, kernel_size, stride=None) -> Tensor:
    """Mean over each window: ``'...hwkl->...hw'`` scaled by ``1 / (kh * kw)``."""
    kh, kw = _pair(kernel_size)
    p = patches(as_tensor(x), (kh, kw), (kh, kw) if stride is None else stride)
    return ops.einsum("...hwkl->...hw", p) * (1.0 / (kh * kw))


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


def _normalized(x, axes, eps) -> tuple:
    """``((x - mean) * s, s)`` with ``s = 1 / sqrt(var + eps)`` (axes kept as size 1)."""
    fused = jit.layer_norm(x, _width(x, axes), eps)  # one pass where numba can (einsumgrad.jit)
    if fused is not None:
        return fused[0], fused[1].reshape(_kept(x, axes))
    d, s = _centered(x, axes, eps)
    d *= s
    return d, s


def _normalize_impl(x, axes, eps, stats=None):
    # stats: (the output, s) as layer_norm computed them; s is kept for the rules.
    return _normalized(x, axes, eps)[0] if stats is None else stats[0]


def _normalize_rule(k, g, out, x, axes, eps, stats=None):
    # y = (x - mean) * s with s = 1/sqrt(var + eps): its Jacobian
    # s (I - 11^T/n - y y^T/n) is symmetric, so the VJP and JVP are one formula.
    # Written in engine ops on x and the output, so it differentiates again;
    # s is the forward's, not computed again (a pass over x fewer).
    m1 = ops.mean(g, axes, keepdims=True)
    m2 = ops.mean(g * out, axes, keepdims=True)
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
    dx = jit.layer_norm_vjp(g, out, stats[1], _width(x, axes))
    return None if dx is None else (dx,)


def _inv_std_d(x, out, axes):
    # ds/dx = -s^3 (x - mean) / n, in engine ops: normalize's rule differentiates again.
    n = _width(x, axes)
    return (out * out * out) * (-1.0 / n) * (x - ops.mean(x, axes, keepdims=True))


# 1 / sqrt(var + eps) over trailing axes (kept as size 1): normalize's rule
# needs it, as one primitive rather than six ops on the full activation
# (``value``: the forward's, where it has it).
inv_std_p = Primitive("inv_std", lambda x, axes, eps, value=None:
                      _centered(x, axes, eps)[1] if value is None else value)
inv_std_p.defvjp(lambda k, g, out, x, axes, eps, value=None: g * _inv_std_d(x, out, axes))
inv_std_p.defjvp(lambda k, t, out, x, axes, eps, value=None:
                 ops.sum(t * _inv_std_d(x, out, axes), axes, keepdims=True))


@normalize_p.defbatch
def _normalize_batch(bdims, shapes, out_shape, axes, eps, **_):
    if bdims[0] - len(out_shape) in axes:
        raise BatchMixingError("layer_norm normalizes along the batch axis: rows mix")
    return bdims[0]


inv_std_p.defbatch(_normalize_batch)


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
        return ops.sum_to(g, b.shape, nb)
    xhat, inner = _normalized_node(x, axes, eps, stats)
    if k == 1:
        return ops.sum_to(g * xhat, w.shape, nb)
    return _normalize_rule(0, g * w, xhat, x, axes, eps, inner)


def _layer_norm_jvp(k, t, out, x, w, b, axes, eps, stats=None):
    xhat, inner = _normalized_node(x, axes, eps, stats)
    if k == 0:
        return _normalize_rule(0, t, xhat, x, axes, eps, inner) * w
    nb = t.ndim - w.ndim if k == 1 else t.ndim - b.ndim
    lead = t.shape[:nb]
    t = ops.reshape(t, lead + (1,) * (out.ndim - t.ndim + nb) + t.shape[nb:])
    return xhat * t if k == 1 else ops.broadcast_to(t, lead + out.shape)


# ``xhat * weight + bias`` with xhat normalized, as one primitive (torch's
# native_layer_norm): forward and backward are one pass each over the rows
# where numba compiles them (einsumgrad.jit), the rules engine ops as ever.
layer_norm_p = Primitive("layer_norm", _layer_norm_impl)
layer_norm_p.defvjp(_layer_norm_vjp)
layer_norm_p.defjvp(_layer_norm_jvp)


@layer_norm_p.defbatch
def _layer_norm_batch(bdims, shapes, out_shape, axes, eps, **_):
    if bdims[1] is not None or bdims[2] is not None:
        raise BatchMixingError("layer_norm with a weight or bias that varies along the batch")
    return _normalize_batch(bdims[:1], shapes, out_shape, axes, eps)


@layer_norm_p.deffused
def _layer_norm_fused(g, out, x, w, b, axes, eps, stats=None):
    if stats is None or w.shape != b.shape:
        return None
    r = jit.layer_norm_vjp(g, stats[1], stats[2], _width(x, axes), w)
    return None if r is None else (r[0], r[1].reshape(w.shape), r[2].reshape(b.shape))


def _layer_norm_stats(x, axes, eps, w, b) -> tuple:
    """``(xhat * w + b, xhat, s)``: the output and what the rules keep."""
    fused = jit.layer_norm(x, _width(x, axes), eps, w, b)
    if fused is not None:
        y, xhat, s = fused
        return y, xhat, s.reshape(_kept(x, axes))
    xhat, s = _normalized(x, axes, eps)
    y = backend_of(x).multiply(xhat, w)  # a new product: the bias can go into it in place
    return _add_bias_impl(y, b), xhat, s


def layer_norm(x: Any, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize over the trailing ``normalized_shape`` axes (biased variance, as torch)."""
    x = as_tensor(x)
    n = 1 if isinstance(normalized_shape, int) else len(tuple(normalized_shape))
    # Negative axes name the same axes of a cotangent with leading batch axes.
    axes, eps = tuple(range(-n, 0)), float(eps)
    if weight is not None and bias is not None:
        weight, bias = as_tensor(weight, like=x), as_tensor(bias, like=x)
        return bind(layer_norm_p, x, weight, bias, axes=axes, eps=eps,
                    stats=_layer_norm_stats(x.data, axes, eps, weight.data, bias.data))
    y = bind(normalize_p, x, axes=axes, eps=eps, stats=_normalized(x.data, axes, eps))
    if weight is not None:
        return y * weight
    return y if bias is None else y + bias


def _labels_array(labels: Any, like: Tensor):
    xp = backend_of(like.data)
    data = labels.data if isinstance(labels, Tensor) else labels
    if backend_of(data) is not xp:
        data = xp.asarray(backend_of(data).to_numpy(data))
    return data


def cross_entropy(logits: Any, labels: Any, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits)``, as torch's.

    The class axis is axis 1: ``logits`` ``(N, C)`` with ``labels`` ``(N,)``, or
    ``(N, C, d1, ...)`` with ``(N, d1, ...)``, or ``(C,)`` with a 0-d label; the
    mean is over the targets not equal to ``ignore_index`` (NaN if there are
    none, as torch). The label pick is an einsum with a constant one-hot mask,
    so its adjoint is a multiply, not a scatter.

    Raises:
        ValueError: the labels' shape does not fit the logits', they are not
            integers, or one lies outside ``[0, C)`` (and is not ``ignore_index``).
    """
    logits = as_tensor(logits)
    xp = backend_of(logits.data)
    y = _labels_array(labels, logits)
    if logits.ndim == 0:
        raise ValueError("cross_entropy: logits need a class axis, got a 0-d tensor")
    axis = 0 if logits.ndim == 1 else 1
    want = logits.shape[:axis] + logits.shape[axis + 1:]
    if tuple(y.shape) != want:
        raise ValueError(f"cross_entropy: labels of shape {tuple(y.shape)} do not fit logits of "
                         f"shape {logits.shape} (classes on axis {axis}, as torch): "
                         f"labels must have shape {want}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy: labels must be integer class indices, got {y.dtype}")
    c = logits.shape[axis]
    kept = y != ignore_index
    bad = kept & ((y < 0) | (y >= c))
    if bool(xp.any(bad)):
        raise ValueError(f"cross_entropy: label {int(y[bad].reshape(-1)[0])} is out of range "
                         f"for {c} classes (logits {logits.shape}, class axis {axis})")
    classes = xp.arange(c).reshape((c,) + (1,) * (logits.ndim - axis - 1))
    as_column = lambda a: a.reshape(want[:axis] + (1,) + want[axis:])
    # An ignored target's row of the mask is zero (its label may be a class).
    onehot = ((as_column(y) == classes) & as_column(kept)).astype(logits.dtype)
    logp = ops.log_softmax(logits, axis)
    s = "abcdefghijklmnopqrstuvwxyz"[:logits.ndim]
    n = int(xp.sum(kept))
    scale = -1.0 / n if n else math.nan  # no target left: nan, as torch
    return ops.einsum(f"{s},{s}->", logp, Tensor(onehot)) * scale


def mse_loss(a: Any, b: Any) -> Tensor:
    """Mean of the squared differences."""
    d = as_tensor(a) - b
    return ops.mean(d * d)


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight`` picked by integer ``ids``; the gradient scatters back into them."""
    return weight[_labels_array(ids, weight)]


def dropout(x: Any, p: float = 0.5, training: bool = True, rng=None) -> Tensor:
    """Zero each entry with probability ``p`` and scale the rest by ``1 / (1 - p)``."""
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    from .init import generator
    keep = (rng or generator()).random(x.shape) >= p
    mask = backend_of(x.data).asarray(keep).astype(x.dtype) * (1.0 / (1.0 - p))
    return x * Tensor(mask)


_ATTEND = parse("bhqk,bhkd->bhqd")


def scaled_dot_product_attention(q: Any, k: Any, v: Any, mask: Any = None,
                                 is_causal: bool = False) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` over the last two axes, as torch's.

    ``mask`` is boolean (True: may attend) or additive (float); ``is_causal``
    masks out keys after each query. Scores are ``'...qd,...kd->...qk'``.
    """
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    four = q.ndim == 4 and k.ndim == 4 and v.ndim == 4  # (batch, heads, length, dim)
    # The scale goes on q, the smaller side (Lq x d against Lq x Lk).
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    s = ops.einsum("bhqd,bhkd->bhqk" if four else "...qd,...kd->...qk", q, k)
    xp = backend_of(s.data)
    if is_causal:
        lq, lk = s.shape[-2:]
        allowed = xp.tril(xp.ones((lq, lk), dtype=bool))
        s = ops.where(xp.broadcast_to(allowed, s.shape), s, -math.inf)
    if mask is not None:
        m = mask.data if isinstance(mask, Tensor) else mask
        if m.dtype == bool:
            s = ops.where(xp.broadcast_to(m, s.shape), s, -math.inf)
        else:
            s = s + Tensor(m.astype(s.dtype))
    a = ops.softmax(s, -1)
    if four and a.shape[:2] == v.shape[:2] and a.shape[3] == v.shape[2]:  # else einsum says why
        # Written with the heads inside the queries, (b, q, h, d) in memory: the
        # output projection then reads it as a (b q) x (h d) matrix, no copy.
        return einsum_spec(_ATTEND, a, v, order=(0, 2, 1, 3))
    return ops.einsum("bhqk,bhkd->bhqd" if four else "...qk,...kd->...qd", a, v)
