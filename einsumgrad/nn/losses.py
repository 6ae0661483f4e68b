"""Losses with ``torch.nn.functional``'s meaning; :mod:`.functional` re-exports them.

Picking each target's log-probability is an einsum with a constant mask
(one-hot rows, scaled by class weights and label smoothing), so the adjoint
is a multiply, not a scatter, and every loss differentiates to any order.
Inside ``vmap`` the targets may be mapped along with the inputs: the mask is
then built once for the whole batch, one per example.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from .. import rules as ops
from ..backends import backend_of
from ..rules.shape import Batched, elementwise_apply, stand_in
from ..tensor import Tensor, as_tensor

_REDUCTIONS = ("mean", "sum", "none")


def labels_array(labels: Any, like: Tensor):
    """``labels`` (an array, a Tensor or a list) as an array on ``like``'s backend."""
    xp = backend_of(stand_in(like).data)
    data = labels.data if isinstance(labels, Tensor) else labels
    if not hasattr(data, "dtype"):
        data = xp.asarray(data)
    if backend_of(data) is not xp:
        data = xp.asarray(backend_of(data).to_numpy(data))
    return data


def _check_reduction(reduction: Any) -> None:
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be 'mean', 'sum' or 'none', got a "
                        f"{type(reduction).__name__} (a class weight goes in weight=)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction!r} is not a valid value for reduction: "
                         f"'mean', 'sum' or 'none'")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return ops.sum(loss) if reduction == "sum" else ops.mean(loss)


def _class_axis(x: Tensor, what: str) -> int:
    if x.ndim == 0:
        raise ValueError(f"{what}: the input needs a class axis, got a 0-d tensor")
    return 0 if x.ndim == 1 else 1


def _picked(logp: Tensor, labels: Any, weight: Any, ignore_index: int, reduction: str,
            smoothing: float, what: str) -> Tensor:
    """``-sum_c logp[..., c, ...] M[..., c, ...]`` reduced: the negative log-likelihood
    of integer ``labels``, with class weights and label smoothing in ``M``.

    ``M = kept * ((1 - s) onehot(y) w[y] + (s / C) w)``: torch's ``(1 - s) nll +
    (s / C) smooth``, where both parts of a mean divide by the same total, the
    weights of the kept targets (their count without weights). Inside ``vmap``
    with mapped ``labels`` (a batched tensor) ``M`` and that total are built for
    the whole batch at once, one per example.
    """
    xp = backend_of(stand_in(logp).data)
    mapped = type(labels) is Batched
    y = labels if mapped else labels_array(labels, logp)
    axis = _class_axis(logp, what)
    want = logp.shape[:axis] + logp.shape[axis + 1:]
    if tuple(y.shape) != want:
        raise ValueError(f"{what}: labels of shape {tuple(y.shape)} do not fit input of "
                         f"shape {logp.shape} (classes on axis {axis}, as torch): labels "
                         f"must have shape {want}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{what}: labels must be integer class indices, got {y.dtype}")
    c, dtype = logp.shape[axis], logp.dtype
    w = None
    if weight is not None:
        w = labels_array(weight, logp).astype(dtype)
        if tuple(w.shape) != (c,):
            raise ValueError(f"{what}: weight of shape {tuple(w.shape)} for {c} classes")
    after = logp.ndim - axis - 1  # axes after the class axis: counted from the end, so
    classes = xp.arange(c).reshape((c,) + (1,) * after)  # leading (mapped) axes pass

    def column(a):  # labels-shaped ``a`` with the class axis inserted (size 1)
        return a.reshape(a.shape[:a.ndim - after] + (1,) + a.shape[a.ndim - after:])

    def masks(y):
        """The mask ``M`` for labels ``y`` (leading axes allowed), and each target's
        share of a mean's total (its class weight, 0 where ignored)."""
        kept = y != ignore_index
        bad = kept & ((y < 0) | (y >= c))
        if bool(xp.any(bad)):
            raise ValueError(f"{what}: label {int(y[bad].reshape(-1)[0])} is out of range "
                             f"for {c} classes (input {logp.shape}, class axis {axis})")
        # An ignored target's row of the mask is zero (its label may be a class).
        onehot = (column(y) == classes).astype(dtype)
        if w is not None:
            onehot = onehot * w.reshape((c,) + (1,) * after)
        mask = onehot * (1.0 - smoothing) if smoothing else onehot
        if smoothing:
            spread = xp.full((c,), smoothing / c, dtype=dtype) if w is None else w * (smoothing / c)
            mask = mask + spread.reshape((c,) + (1,) * after)
        mask = mask * column(kept).astype(dtype)
        share = (onehot * column(kept)).sum(axis=-after - 1) if w is not None else kept
        return mask, share

    if mapped:
        mask = elementwise_apply(lambda t: Tensor(masks(t.data)[0]), y)
    else:
        mask, share = masks(y)
        mask = Tensor(mask)
    # Off the mask a -inf log-probability (a -inf logit) would give -inf * 0 = nan:
    # those entries are not the loss's, as torch's gather leaves them out.
    logp = ops.where(mask != 0, logp, 0.0)
    s = "abcdefghijklmnopqrstuvwxyz"[:logp.ndim]
    if reduction == "none":
        return -ops.einsum(f"{s},{s}->{s[:axis] + s[axis + 1:]}", logp, mask)
    total = ops.einsum(f"{s},{s}->", logp, mask)
    if reduction == "sum":
        return -total
    if not mapped:
        # The kept targets' weights (their count unweighted); none: nan, as torch.
        n = float(xp.sum(share))
        return total * (-1.0 / n if n else math.nan)

    def scale(t):  # -1 / (each example's total), nan where it is 0
        share = masks(t.data)[1]
        n = share.reshape(share.shape[:share.ndim - len(want)] + (-1,)).sum(axis=-1)
        n = n.astype(dtype)
        return Tensor(xp.where(n > 0, -1.0 / xp.where(n > 0, n, 1.0), math.nan).astype(dtype))
    return total * elementwise_apply(scale, y)


def nll_loss(input: Any, target: Any, weight: Any = None, ignore_index: int = -100,
             reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer ``target`` under log-probabilities ``input``, as torch's.

    Classes on axis 1: ``input`` ``(N, C)`` with ``target`` ``(N,)``, ``(N, C, d1,
    ...)`` with ``(N, d1, ...)``, or ``(C,)`` with a 0-d target. ``weight`` ``(C,)``
    scales each target's term; ``'mean'`` divides by the kept targets' total
    weight (NaN if none), ``'sum'`` adds up, ``'none'`` keeps one loss per target
    (0 for an ignored one).

    Raises:
        ValueError: the target's shape does not fit, it is not integers, a label
            lies outside ``[0, C)`` (and is not ``ignore_index``), or ``reduction``
            is not one of ``'mean'``, ``'sum'``, ``'none'``.
    """
    _check_reduction(reduction)
    return _picked(as_tensor(input), target, weight, ignore_index, reduction, 0.0, "nll_loss")


def cross_entropy(logits: Any, labels: Any, reduction: str = "mean",
                  label_smoothing: float = 0.0, ignore_index: int = -100, *,
                  weight: Any = None) -> Tensor:
    """Cross-entropy between ``softmax(logits)`` and ``labels``, as torch's.

    ``labels`` are integer classes (shapes as :func:`nll_loss`'s) or, with the
    logits' own shape and a floating dtype, class probabilities. With
    ``label_smoothing`` ``s`` the target is ``(1 - s) onehot + s / C``; ``weight``
    ``(C,)`` weighs the classes; ``ignore_index`` marks integer targets left out.
    ``reduction`` as :func:`nll_loss`'s (a mean over probability targets divides
    by their count).

    Raises:
        ValueError: as :func:`nll_loss`, or ``label_smoothing`` outside ``[0, 1]``.
    """
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    logits = as_tensor(logits)
    axis = _class_axis(logits, "cross_entropy")
    logp = ops.log_softmax(logits, axis)
    if getattr(labels, "dtype", None) is not None and labels.dtype.kind == "f" and \
            tuple(labels.shape) == logits.shape:
        return _soft_targets(logp, as_tensor(labels, like=logits), weight, reduction,
                             label_smoothing, axis)
    return _picked(logp, labels, weight, ignore_index, reduction, label_smoothing,
                   "cross_entropy")


def _soft_targets(logp: Tensor, target: Tensor, weight: Any, reduction: str, smoothing: float,
                  axis: int) -> Tensor:
    """Cross-entropy against class probabilities (differentiable in them too)."""
    c = logp.shape[axis]
    if smoothing:
        target = target * (1.0 - smoothing) + smoothing / c
    terms = logp * target
    if weight is not None:
        w = labels_array(weight, logp).astype(logp.dtype)
        terms = terms * Tensor(w.reshape((c,) + (1,) * (logp.ndim - axis - 1)))
    return _reduce(-ops.sum(terms, axis), reduction)


def binary_cross_entropy_with_logits(input: Any, target: Any, weight: Any = None,
                                     reduction: str = "mean", pos_weight: Any = None) -> Tensor:
    """``-[p t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))]``, as torch's, stable for any ``x``.

    Written ``(1 - t) x + (1 + (p - 1) t) softplus(-x)`` (``p`` the ``pos_weight``,
    1 without): softplus is ``logaddexp(0, .)``, so a logit of 1e4 or -1e4
    gives its exact loss and gradient, never ``log(0)``. ``weight`` scales each
    element (broadcast), ``pos_weight`` the positive term per class (last axis).

    Raises:
        ValueError: ``target``'s shape differs from ``input``'s (as torch), or a
            bad ``reduction``.
    """
    _check_reduction(reduction)
    x = as_tensor(input)
    t = as_tensor(target, like=x)
    if t.shape != x.shape:
        raise ValueError(f"Target size ({t.shape}) must be the same as input size ({x.shape})")
    sp = ops.softplus(-x)
    if pos_weight is None:
        loss = (1.0 - t) * x + sp
    else:
        loss = (1.0 - t) * x + (1.0 + (as_tensor(pos_weight, like=x) - 1.0) * t) * sp
    if weight is not None:
        loss = loss * as_tensor(weight, like=x)
    return _reduce(loss, reduction)


def _prediction_and_target(input: Any, target: Any) -> tuple:
    """Both as Tensors; shapes that differ get torch's warning (they broadcast)."""
    a = as_tensor(input)
    b = as_tensor(target, like=a)
    if a.shape != b.shape:
        warnings.warn(f"Using a target size ({b.shape}) that is different to the input size "
                      f"({a.shape}). This will likely lead to incorrect results due to "
                      f"broadcasting. Please ensure they have the same size.", UserWarning,
                      stacklevel=3)
    return a, b


def mse_loss(input: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Mean (or sum, or each) of the squared differences, as torch's.

    Shapes that differ are broadcast as torch does, with torch's warning: a
    ``(N,)`` prediction against an ``(N, 1)`` target gives an ``(N, N)``
    difference, rarely what was meant.
    """
    _check_reduction(reduction)
    a, b = _prediction_and_target(input, target)
    d = a - b
    return _reduce(d * d, reduction)


def l1_loss(input: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Mean (or sum, or each) of the absolute differences, as torch's (same warning
    as :func:`mse_loss` for shapes that differ)."""
    _check_reduction(reduction)
    a, b = _prediction_and_target(input, target)
    return _reduce(ops.abs(a - b), reduction)
