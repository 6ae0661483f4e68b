"""Stateless layers, each a few einsums, with ``torch.nn.functional``'s meaning.

Every function takes and returns :class:`~einsumgrad.Tensor` (NumPy or backend
arrays are accepted too) and is differentiable to any order, because it is
built from the engine's primitives only: einsum, element-wise ops, indexing
and the patch op of :mod:`einsumgrad.rules.patches`.
"""
from __future__ import annotations

import math
from typing import Any

from .. import rules as ops
from ..backends import backend_of
from ..rules import add_bias, as_pair, einsum_spec, layer_norm, patch_einsum, patches, unpatch
from ..rules import unpatch_einsum  # noqa: F401  (re-exported)
from ..spec import parse
from ..tensor import Tensor, as_tensor

__all__ = ["linear", "conv2d", "max_pool2d", "avg_pool2d", "layer_norm", "cross_entropy",
           "mse_loss", "scaled_dot_product_attention", "embedding", "dropout", "patches",
           "unpatch", "patch_einsum", "unpatch_einsum", "relu", "gelu", "softmax", "log_softmax"]

relu, gelu, softmax, log_softmax = ops.relu, ops.gelu, ops.softmax, ops.log_softmax


def linear(x: Any, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T + b``: the einsum ``'...i,oi->...o'`` with ``w`` of shape ``(out, in)``."""
    y = ops.einsum("...i,oi->...o", x, w)
    return y if b is None else add_bias(y, b)


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
    return y if b is None else add_bias(y, ops.reshape(b, (-1, 1, 1)))


def max_pool2d(x: Any, kernel_size, stride=None) -> Tensor:
    """Maximum over each window (``stride`` defaults to the window size)."""
    x = as_tensor(x)
    (kh, kw), (sh, sw) = as_pair(kernel_size), as_pair(kernel_size if stride is None else stride)
    h, w = x.shape[-2:]
    if (kh, kw) == (sh, sw) and h % kh == 0 and w % kw == 0:
        # Windows tile the image: a reshape to (..., H/kh, kh, W/kw, kw) is a
        # view, and its adjoint a reshape too, so no window copy or overlap-add.
        t = ops.reshape(x, x.shape[:-2] + (h // kh, kh, w // kw, kw))
        return ops.max(t, axis=(-3, -1))
    return ops.max(patches(x, (kh, kw), (sh, sw)), axis=(-2, -1))


def avg_pool2d(x: Any, kernel_size, stride=None) -> Tensor:
    """Mean over each window: ``'...hwkl->...hw'`` scaled by ``1 / (kh * kw)``."""
    kh, kw = as_pair(kernel_size)
    p = patches(as_tensor(x), (kh, kw), (kh, kw) if stride is None else stride)
    return ops.einsum("...hwkl->...hw", p) * (1.0 / (kh * kw))


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
    """Rows of ``weight`` picked by integer ``ids``; the gradient scatters back into them.

    Raises:
        TypeError: ``ids`` are not integers (booleans would select rows as a mask).
        IndexError: an id outside ``[0, num_embeddings)``: a negative one is not
            counted from the end, as torch's.
    """
    xp = backend_of(weight.data)
    ids = xp.asarray(_labels_array(ids, weight))  # a list of ids too
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got {ids.dtype}")
    n = weight.shape[0]
    bad = (ids < 0) | (ids >= n)
    if bool(xp.any(bad)):
        raise IndexError(f"embedding: index {int(ids[bad].reshape(-1)[0])} is out of range "
                         f"for a table of {n} rows (ids must lie in [0, {n}))")
    return weight[ids]


def dropout_probability(p: float) -> float:
    """``p`` if it is a probability, as dropout takes it.

    Raises:
        ValueError: ``p`` outside ``[0, 1]`` (NaN included), as torch's.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p


def dropout(x: Any, p: float = 0.5, training: bool = True, rng=None) -> Tensor:
    """Zero each entry with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Raises:
        ValueError: ``p`` outside ``[0, 1]``.
    """
    dropout_probability(p)
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
