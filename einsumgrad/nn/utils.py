"""Gradient utilities as ``torch.nn.utils``: clipping by norm or by value."""
from __future__ import annotations

import math
from typing import Iterable

import numpy

from ..backends import backend_of
from ..tensor import Tensor, no_grad

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _grads(parameters) -> list:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return [p.grad for p in params if p.grad is not None]


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
    """Scale the gradients in place so that their joint norm is at most ``max_norm``.

    As torch's: the norm is over all the gradients as one vector (the norm of
    their norms); each is multiplied by ``min(1, max_norm / (norm + 1e-6))``.
    Parameters without a gradient are skipped.

    Args:
        parameters: a Tensor or an iterable of them (``model.parameters()``).
        max_norm: the largest norm the gradients keep.
        norm_type: the p of the p-norm; ``float('inf')`` for the largest entry.
        error_if_nonfinite: raise instead of scaling by a NaN or infinite norm.

    Returns:
        The total norm before clipping, a 0-d Tensor.

    Raises:
        RuntimeError: ``error_if_nonfinite`` and the norm is NaN or infinite.
    """
    grads = _grads(parameters)
    p = float(norm_type)
    if not grads:
        return Tensor(numpy.asarray(0.0))  # no array to take a backend from: torch's 0.0
    xp = backend_of(grads[0].data)
    if p == math.inf:
        norms = [xp.max(xp.abs(g.data)) if g.size else xp.asarray(0.0, g.dtype) for g in grads]
        total = xp.max(xp.stack(norms))
    elif p == 2.0:
        norms = [xp.sqrt(xp.vdot(g.data.ravel(), g.data.ravel())) for g in grads]
        total = xp.sqrt(xp.sum(xp.stack(norms) ** 2))
    else:
        norms = [xp.sum(xp.abs(g.data) ** p) ** (1.0 / p) for g in grads]
        total = xp.sum(xp.stack(norms) ** p) ** (1.0 / p)
    total = xp.asarray(total)
    if error_if_nonfinite and not bool(xp.isfinite(total)):
        raise RuntimeError(f"The total norm of order {p} for gradients from `parameters` is "
                           f"non-finite, so it cannot be clipped. To disable this error and "
                           f"scale the gradients by the non-finite norm anyway, set "
                           f"`error_if_nonfinite=False`")
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0)
    with no_grad():
        for g in grads:
            g *= coef.astype(g.dtype)  # in place, as torch's mul_
    return Tensor(total)


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float) -> None:
    """Clip every gradient entry into ``[-clip_value, clip_value]``, in place."""
    with no_grad():
        for g in _grads(parameters):
            g.data[...] = backend_of(g.data).clip(g.data, -clip_value, clip_value)
            g.version += 1
