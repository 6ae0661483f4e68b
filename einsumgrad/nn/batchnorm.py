"""Batch normalization layers with torch's arguments, buffers and state-dict keys."""
from __future__ import annotations

from typing import Any

import numpy

from ..defaults import resolve
from ..tensor import Tensor, as_tensor
from . import functional as F
from .module import Module, Parameter


class _BatchNorm(Module):
    """Normalize each channel (axis 1) by batch statistics while training, by the
    running ones in ``eval()``, then scale by ``weight`` and shift by ``bias``.

    Buffers as torch's: ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (an int64 count), all in the state dict. Each
    training forward moves the running statistics by ``momentum`` towards
    the batch's (the variance unbiased), or, with ``momentum=None``, keeps
    their cumulative average over the batches seen.

    Training mode mixes the batch (each output depends on every sample's
    values through the statistics): ``eg.batch_jacobian`` through it raises
    ``BatchMixingError``. In ``eval()`` rows stay apart.
    """

    _ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=None):
        super().__init__()
        dtype = resolve(dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = Parameter(numpy.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(numpy.zeros(num_features, dtype)) if affine else None
        track = track_running_stats
        self.register_buffer("running_mean", numpy.zeros(num_features, dtype) if track else None)
        self.register_buffer("running_var", numpy.ones(num_features, dtype) if track else None)
        self.register_buffer("num_batches_tracked",
                             numpy.zeros((), numpy.int64) if track else None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            stats = (self.running_mean, 0), (self.running_var, 1), (self.num_batches_tracked, 0)
            for t, v in stats:
                t.data[...] = v
                t.version += 1

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        if x.ndim not in self._ranks:
            ranks = " or ".join(map(str, self._ranks))
            raise ValueError(f"{type(self).__name__}: expected a {ranks}-D input, got shape "
                             f"{x.shape}")
        factor = 0.0 if self.momentum is None else self.momentum
        counting = self.training and self.track_running_stats
        if counting and self.momentum is None:  # a cumulative moving average
            factor = 1.0 / (float(self.num_batches_tracked.data) + 1.0)
        use_running = not self.training or self.track_running_stats
        y = F.batch_norm(x, self.running_mean if use_running else None,
                         self.running_var if use_running else None, self.weight, self.bias,
                         self.training or self.running_mean is None, factor, self.eps)
        if counting:  # counted once the step has gone through: an error leaves it as it was
            self.num_batches_tracked.data += 1
            self.num_batches_tracked.version += 1
        return y

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over ``(N, C)`` or ``(N, C, L)``, as ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over ``(N, C, H, W)``, as ``torch.nn.BatchNorm2d``."""

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over ``(N, C, D, H, W)``, as ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)
