"""Initializers with PyTorch's defaults, drawn from one seedable generator.

Values are drawn with NumPy's generator (so a seed gives the same model on
every backend) and placed on the backend by the caller.
"""
from __future__ import annotations

import math

import numpy

_rng = numpy.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator every layer initializer and dropout draws from."""
    global _rng
    _rng = numpy.random.default_rng(seed)


def generator() -> numpy.random.Generator:
    """The module-level generator (see :func:`manual_seed`)."""
    return _rng


def uniform(shape: tuple, bound: float, dtype, rng=None) -> numpy.ndarray:
    """``U(-bound, bound)`` samples of ``shape``."""
    return (rng or _rng).uniform(-bound, bound, size=shape).astype(dtype)


def fan_in_bound(fan_in: int) -> float:
    """``1/sqrt(fan_in)``, the bound of a layer's default bias; 0 for no inputs
    (torch's bias of a layer with none: zeros)."""
    return 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def kaiming_uniform(shape: tuple, fan_in: int, dtype, rng=None) -> numpy.ndarray:
    """``torch.nn.init.kaiming_uniform_(a=sqrt(5))``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    With ``fan_in`` 0 the weight has no entries (torch leaves it as it is).
    """
    gain = math.sqrt(2.0 / (1.0 + 5.0))
    return uniform(shape, gain * math.sqrt(3.0 / fan_in) if fan_in > 0 else 0.0, dtype, rng)


def xavier_uniform(shape: tuple, dtype, rng=None) -> numpy.ndarray:
    """``torch.nn.init.xavier_uniform_`` for a 2-D ``(fan_out, fan_in)`` weight."""
    fan_out, fan_in = shape
    return uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), dtype, rng)


def normal(shape: tuple, dtype, rng=None) -> numpy.ndarray:
    """Standard normal samples (``nn.Embedding``'s default)."""
    return (rng or _rng).standard_normal(shape).astype(dtype)
