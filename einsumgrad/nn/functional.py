"""Stateless layers, each a few einsums, with ``torch.nn.functional``'s meaning.

Every function takes and returns :class:`~einsumgrad.Tensor` (NumPy or backend
arrays are accepted too) and is differentiable to any order, because it is
built from the engine's primitives only: einsum, element-wise ops, indexing
and the patch op of :mod:`einsumgrad.rules.patches`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from .. import rules as ops
from ..backends import backend_of
from ..rules import add_bias, as_pair, einsum_spec, layer_norm, patch_einsum, patches, unpatch
from ..rules.attention import attention
from ..rules import unpatch_einsum  # noqa: F401  (re-exported)
from ..rules.batch_norm import batch_norm_p, batch_norm_train, relu_of
from ..rules.convolution import _parse as _conv_spec, patch_einsum_p
from ..rules.patches import check_fit
from ..rules.shape import Batched, active_levels, bottom, stand_in, wrap
from ..spec import parse
from ..tensor import Tensor, as_tensor, bind
from .losses import (binary_cross_entropy_with_logits, cross_entropy, l1_loss, labels_array,
                     mse_loss, nll_loss)

__all__ = ["linear", "conv1d", "conv2d", "batch_norm", "max_pool2d", "avg_pool2d", "layer_norm",
           "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", "mse_loss",
           "l1_loss", "scaled_dot_product_attention", "embedding", "dropout", "patches",
           "unpatch", "patch_einsum", "unpatch_einsum", "relu", "gelu", "sigmoid", "tanh",
           "softmax", "log_softmax"]

gelu, softmax, log_softmax = ops.gelu, ops.softmax, ops.log_softmax
sigmoid, tanh = ops.sigmoid, ops.tanh


def linear(x: Any, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T + b``: the einsum ``'...i,oi->...o'`` with ``w`` of shape ``(out, in)``."""
    y = ops.einsum("...i,oi->...o", x, w)
    return y if b is None else add_bias(y, b)


def relu(x: Any) -> Tensor:
    """``max(x, 0)``. On the output of a training-mode batch norm it is recorded
    as one op with the norm (the same values and derivatives): the backward
    then masks the cotangent inside the norm's fused pass, not in passes of
    its own."""
    fused = relu_of(x) if isinstance(x, Tensor) else None
    return ops.relu(x) if fused is None else fused


def _xp(t: Tensor):
    """``t``'s backend (inside vmap, a batched tensor's physical one's)."""
    return backend_of(stand_in(t).data)


def _batched(*ts) -> bool:
    """Whether any of ``ts`` is a batched tensor (inside vmap)."""
    return any(type(t) is Batched for t in ts)


def _promoted(*ts: Tensor) -> list:
    """Tensors cast (on the tape) to the dtype NumPy's promotion gives them together:
    a float32 input to a float64 layer computes in float64, as NumPy would."""
    dt = _xp(ts[0]).result_type(*(t.dtype for t in ts))
    return [ops.astype(t, dt) for t in ts]


def _conv_padding(padding, kernel: tuple, dilation: tuple, stride: tuple) -> tuple:
    """Each axis's padding before, and how much more it takes after (0 or 1).

    ``padding`` is an int, one int per axis, ``"valid"`` (none) or ``"same"``:
    the output as long as the input, torch's split of an odd total (the extra
    entry after the image, where torch pads it too).

    Raises:
        ValueError: ``"same"`` with a stride other than 1 (as torch), another
            string, a negative padding, or a tuple of the wrong length.
    """
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n, (0,) * n
        if padding != "same":
            raise ValueError(f"padding {padding!r}: give an int, a tuple, 'same' or 'valid'")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple(t // 2 for t in total), tuple(t - 2 * (t // 2) for t in total)
    pads = (int(padding),) * n if isinstance(padding, numbers.Integral) else tuple(padding)
    if len(pads) != n or any(p < 0 for p in pads):
        raise ValueError(f"padding {padding!r}: want {n} non-negative ints")
    return pads, (0,) * n


def _groups_spec(c: int, f: int, groups: int) -> tuple:
    """The einsum of a grouped convolution over the patches and the shapes to view
    the image and the weight in: ``(spec, image shape (after B), weight shape)``.

    Input channels split into ``groups`` of ``c/g``, filters into ``groups`` of
    ``f/g``; group ``g`` of the filters sees group ``g`` of the channels only. A
    label of size 1 is left out (a depthwise convolution: one channel a group).
    """
    g, cg, fg = groups, c // groups, f // groups
    if g == 1:
        return "bchwkl,fckl->bfhw", (c,), (f, c)
    if cg == 1 and fg == 1:
        return "bghwkl,gkl->bghw", (g,), (g,)
    if cg == 1:
        return "bghwkl,gfkl->bgfhw", (g,), (g, fg)
    return "bgchwkl,gfckl->bgfhw", (g, cg), (g, fg, cg)


def conv2d(x: Any, w: Tensor, b: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """2-D cross-correlation as torch's: ``x (B, C, H, W)`` (or ``(C, H, W)``),
    ``w (F, C / groups, kh, kw)``.

    The layer is one einsum over the patches of ``x``, ``'bchwkl,fckl->bfhw'``;
    its VJPs are the weight gradient ``'bfhw,bchwkl->fckl'`` and the patch
    cotangent ``'bfhw,fckl->bchwkl'`` added back onto the image by ``unpatch``.
    All three run as :func:`patch_einsum` / :func:`unpatch_einsum`: the forward
    and the weight gradient as matmuls over the patches copied a bounded chunk
    at a time (a copy made whole is kept for the weight gradient), the input
    gradient at stride 1 with enough channels as one matmul per kernel offset
    on the padded image. With ``groups`` the channels split into groups:
    ``'bgchwkl,gfckl->bgfhw'`` (depthwise, one channel a group:
    ``'bghwkl,gkl->bghw'``).

    Args:
        stride, dilation: an int or a pair.
        padding: an int, a pair, ``"valid"`` (0) or ``"same"`` (stride 1 only;
            an odd total padding puts the extra row or column after, as torch).
        groups: how many groups the channels split into (``C`` and ``F`` are
            multiples of it).

    A float32 input to a float64 weight (or the other way round) computes in
    the dtype NumPy's promotion gives them (float64).

    Raises:
        ValueError: shapes that do not fit (channels, groups, rank), a window
            larger than the padded image, or a padding it cannot take.
    """
    x, w = as_tensor(x), as_tensor(w)
    if x.ndim == 3:  # unbatched, as torch
        return conv2d(ops.expand_dims(x, 0), w, b, stride, padding, dilation, groups)[0]
    return _conv(x, w, b, as_pair(stride), padding, as_pair(dilation), groups, "conv2d")


def conv1d(x: Any, w: Tensor, b: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> Tensor:
    """1-D cross-correlation as torch's: ``x (B, C, L)`` (or ``(C, L)``), ``w (F, C / groups, k)``.

    A 2-D convolution of images one row high (views, no copy): the einsum
    ``'bchwkl,fckl->bfhw'`` with ``h`` and ``k`` of size 1. Arguments as
    :func:`conv2d`'s, each an int (or a 1-tuple).
    """
    x, w = as_tensor(x), as_tensor(w)
    if x.ndim == 2:
        return conv1d(ops.expand_dims(x, 0), w, b, stride, padding, dilation, groups)[0]
    if x.ndim != 3 or w.ndim != 3:
        raise ValueError(f"conv1d: want x (B, C, L) and w (F, C/groups, k), got {x.shape} "
                         f"and {w.shape}")
    one = lambda v: (1, _single(v))  # noqa: E731
    pad = padding if isinstance(padding, str) else (0, _single(padding))
    y = _conv(ops.expand_dims(x, 2), ops.expand_dims(w, 2), b, one(stride), pad, one(dilation),
              groups, "conv1d")
    return ops.squeeze(y, 2)


def _single(v) -> int:
    """An int, or the one int of a 1-tuple (torch's spelling for 1-D layers)."""
    if isinstance(v, numbers.Integral):
        return int(v)
    (n,) = tuple(v)
    return int(n)


def _conv(x: Tensor, w: Tensor, b, stride: tuple, padding, dilation: tuple, groups: int,
          name: str) -> Tensor:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"{name}: want x (B, C, H, W) and w (F, C/groups, kh, kw), got "
                         f"{x.shape} and {w.shape}")
    (bsz, c), (f, cg), kernel = x.shape[:2], w.shape[:2], w.shape[-2:]
    if groups < 1 or c % groups or f % groups or cg != c // groups:
        raise ValueError(f"{name}: {c} input channels in {groups} group(s) do not fit a weight "
                         f"{w.shape} (want C and F multiples of groups, w.shape[1] = C/groups)")
    before, after = _conv_padding(padding, kernel, dilation, stride)
    if any(after):  # 'same' with an odd total: the extra zeros after the image first
        x = ops.pad(x, ((0, 0), (0, 0), (0, after[0]), (0, after[1])))
    ts = [x, w] + ([] if b is None else [as_tensor(b, like=w)])
    if len({t.dtype for t in ts}) > 1:
        ts = _promoted(*ts)
    x, w, b = ts if b is not None else ts + [None]
    spec, image, weight = _groups_spec(c, f, groups)
    xg = x if len(image) == 1 else ops.reshape(x, (bsz,) + image + x.shape[-2:])
    wg = w if weight == (f, cg) else ops.reshape(w, weight + kernel)
    if _batched(xg, wg):
        # Inside vmap: the primitive bound as it is, so its batching rule runs (the
        # front end would read the arrays to keep the patches for the weight gradient;
        # the rule keeps them, on the physical image).
        check_fit(name, xg.shape[-2:], kernel, before, dilation)
        y = bind(patch_einsum_p, xg, wg, spec=_conv_spec(spec, 0), kernel=tuple(kernel),
                 stride=stride, padding=before, patches=None, dilation=dilation)
    else:
        y = patch_einsum(spec, xg, wg, kernel, stride, before, dilation)
    if y.ndim == 5:  # (B, g, F/g, OH, OW): the filters' groups side by side, a view
        y = ops.reshape(y, (bsz, f) + y.shape[-2:])
    return y if b is None else add_bias(y, ops.reshape(b, (-1, 1, 1)))


def _channel_shape(x: Tensor) -> tuple:
    """The shape a per-channel vector broadcasts against ``x`` ``(N, C, ...)`` in."""
    return (x.shape[1],) + (1,) * (x.ndim - 2)


def batch_norm(x: Any, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalize each channel (axis 1) of ``x`` ``(N, C, ...)``, as torch's ``batch_norm``.

    Training: the statistics are the batch's, the mean and the biased variance
    over every axis but the channels; ``running_mean`` / ``running_var`` (if
    given) move towards them in place, ``r = (1 - momentum) r + momentum s``,
    with the unbiased variance, as torch. The output of one sample then
    depends on the whole batch: ``batch_jacobian`` through it raises
    ``BatchMixingError``. Otherwise the running statistics are the constants:
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``, applied
    as ``x * a + (bias - running_mean * a)`` with ``a = weight / sqrt(...)``
    (torch's CPU form; every row apart, so ``batch_jacobian`` passes).

    Raises:
        ValueError: ``x`` has no channel axis, the statistics' length is not
            the channels', or a training batch has one value per channel.
    """
    x = as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: want (N, C, ...), got shape {x.shape}")
    c, shape = x.shape[1], _channel_shape(x)
    # Arrays become Tensors over the same memory: running statistics update in place.
    running_mean, running_var, weight, bias = (None if t is None else as_tensor(t, like=x) for t in
                                               (running_mean, running_var, weight, bias))
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"batch_norm: {name} of shape {tuple(t.shape)} for {c} channels")
    if training:
        if _batched(x, weight, bias, running_mean, running_var):
            return _batch_norm_per_example(x, running_mean, running_var, weight, bias, eps)
        return _batch_norm_train(x, running_mean, running_var, weight, bias, momentum, eps)
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var are needed when not training")
    inv = 1.0 / ops.sqrt(running_var + eps)
    a = inv if weight is None else inv * weight
    shift = -(running_mean * a)
    if bias is not None:
        shift = shift + bias
    return add_bias(x * ops.reshape(a, shape), ops.reshape(shift, shape))


def _batch_norm_train(x, running_mean, running_var, weight, bias, momentum, eps) -> Tensor:
    c, shape = x.shape[1], _channel_shape(x)
    n = x.size // c if c else 0
    if n <= 1:
        raise ValueError(f"batch_norm: expected more than 1 value per channel when training, "
                         f"got input of shape {x.shape}")
    xp = backend_of(x.data)
    # One primitive (rules/batch_norm.py): a few passes forward, a fused backward.
    w = Tensor(xp.ones(c, dtype=x.dtype)) if weight is None else weight
    b = Tensor(xp.zeros(c, dtype=x.dtype)) if bias is None else bias
    ts = [x, w, b]
    if len({t.dtype for t in ts}) > 1:
        ts = _promoted(*ts)
    x, w, b = ts
    y, mean, var = batch_norm_train(x, ops.reshape(w, shape), ops.reshape(b, shape), eps)
    if running_mean is not None or running_var is not None:
        _update_running(mean, var, running_mean, running_var, momentum, n)
    return y


def _batch_norm_per_example(x, running_mean, running_var, weight, bias, eps) -> Tensor:
    """Training mode inside ``vmap``: each example normalized by its own statistics
    (what ``f`` computes on one example). Running statistics cannot follow: one
    update per example of one buffer, in place, has no meaning.

    Raises:
        RuntimeError: running statistics are given (torch.func's rule too).
    """
    if running_mean is not None or running_var is not None:
        raise RuntimeError(
            "batch_norm in training mode inside vmap: its running statistics would be "
            "updated in place once per example. Use eval() (the running statistics), or "
            "track_running_stats=False / running_mean=running_var=None (each example "
            "normalized by its own statistics); for per-sample gradients of a model in "
            "training mode, batch norm mixes the examples, so there are none")
    c, shape = x.shape[1], _channel_shape(x)
    if (x.size // c if c else 0) <= 1:
        raise ValueError(f"batch_norm: expected more than 1 value per channel when training, "
                         f"got input of shape {x.shape}")
    xp = _xp(x)
    w = Tensor(xp.ones(c, dtype=x.dtype)) if weight is None else weight
    b = Tensor(xp.zeros(c, dtype=x.dtype)) if bias is None else bias
    if len({x.dtype, w.dtype, b.dtype}) > 1:
        x, w, b = _promoted(x, w, b)
    axes = (-x.ndim,) + tuple(range(-x.ndim + 2, 0))
    return bind(batch_norm_p, x, ops.reshape(w, shape), ops.reshape(b, shape), axes=axes,
                eps=float(eps), stats=None)


def _update_running(mean, var, running_mean, running_var, momentum: float, n: int) -> None:
    """``r = (1 - m) r + m s`` in place on each running statistic, outside the tape."""
    m = float(momentum)
    if running_mean is not None:
        _lerp_into(running_mean, mean.reshape(-1), m)
    if running_var is not None:
        _lerp_into(running_var, var.reshape(-1) * (n / (n - 1)), m)  # unbiased, as torch


def _lerp_into(r: Tensor, s, m: float) -> None:
    data = r.data
    data *= 1.0 - m
    data += (m * s).astype(data.dtype, copy=False)
    r.version += 1  # changed in place, as torch's buffers


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


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight`` picked by integer ``ids``; the gradient scatters back into them.

    Inside ``vmap`` the ids may be mapped (each example picks its own rows) and so
    may the table.

    Raises:
        TypeError: ``ids`` are not integers (booleans would select rows as a mask).
        IndexError: an id outside ``[0, num_embeddings)``: a negative one is not
            counted from the end, as torch's.
    """
    weight = as_tensor(weight)
    xp = _xp(weight)
    mapped = type(ids) is Batched  # the whole batch's ids are checked at once
    arr = bottom(ids).data if mapped else xp.asarray(labels_array(ids, weight))  # lists too
    if arr.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers, got {arr.dtype}")
    n = weight.shape[0]
    bad = (arr < 0) | (arr >= n)
    if bool(xp.any(bad)):
        raise IndexError(f"embedding: index {int(arr[bad].reshape(-1)[0])} is out of range "
                         f"for a table of {n} rows (ids must lie in [0, {n}))")
    return weight[ids if mapped else arr]


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

    Inside ``vmap`` every example gets its own mask (``torch.func.vmap``'s
    ``randomness="different"``), whether ``x`` is mapped or not: the masks of
    the whole batch are drawn at once, so with the same ``rng`` they are the
    mask ``dropout`` draws for the batch written out (``(B,) + x.shape``).

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
    lv = active_levels()  # the vmaps in flight: one mask per example of each
    keep = (rng or generator()).random(tuple(n for _, n in lv) + x.shape) >= p
    mask = Tensor(_xp(x).asarray(keep).astype(x.dtype) * (1.0 / (1.0 - p)))
    return x * (wrap(mask, lv) if lv else mask)


_ATTEND = parse("bhqk,bhkd->bhqd")


def scaled_dot_product_attention(q: Any, k: Any, v: Any, mask: Any = None,
                                 is_causal: bool = False) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` over the last two axes, as torch's.

    ``mask`` is boolean (True: may attend) or additive (float); ``is_causal``
    masks out keys after each query. Scores are ``'...qd,...kd->...qk'``.
    """
    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    team = _xp(q).attention_team
    if (mask is None and not is_causal and team is not None
            and team(*(stand_in(t).data for t in (q, k, v)))):
        # One primitive where the backend's kernel runs it: each pair of matrices'
        # scores stay in cache (einsumgrad.rules.attention)
        return attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    four = q.ndim == 4 and k.ndim == 4 and v.ndim == 4  # (batch, heads, length, dim)
    # The scale goes on q, the smaller side (Lq x d against Lq x Lk).
    q = q * (1.0 / math.sqrt(q.shape[-1]))
    s = ops.einsum("bhqd,bhkd->bhqk" if four else "...qd,...kd->...qk", q, k)
    xp = _xp(s)
    if is_causal:
        lq, lk = s.shape[-2:]
        allowed = xp.tril(xp.ones((lq, lk), dtype=bool))
        s = ops.where(xp.broadcast_to(allowed, s.shape), s, -math.inf)
    if type(mask) is Batched:  # inside vmap, a mask per example: ops that broadcast it
        s = ops.where(mask, s, -math.inf) if mask.dtype == bool else \
            s + ops.astype(mask, s.dtype)
    elif mask is not None:
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
