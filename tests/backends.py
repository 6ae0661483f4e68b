"""The array backend the suites run on, from ``EINSUMGRAD_BACKEND``.

``numpy`` (default), ``strict`` (the stand-in for a GPU: a NumPy subclass that
refuses to mix with plain arrays) or ``cupy``. Tests build their inputs with
:func:`xb` and read results with :func:`npy`, so one suite runs on each.
"""
from __future__ import annotations

import os

import numpy as np

NAME = os.environ.get("EINSUMGRAD_BACKEND", "numpy")


def xb(a, dtype=None):
    """A NumPy array (or array-like) moved onto the backend under test."""
    a = np.asarray(a, dtype=dtype)
    if NAME == "numpy":
        return a
    if NAME == "cupy":
        import cupy
        return cupy.asarray(a)
    if NAME == "strict":
        from einsumgrad.backends.strict import to_strict
        return to_strict(a)
    raise ValueError(f"EINSUMGRAD_BACKEND={NAME!r}: use numpy, strict or cupy")


def npy(t) -> np.ndarray:
    """Any result (Tensor, backend array, scalar) as a plain NumPy array."""
    if hasattr(t, "numpy") and not isinstance(t, np.ndarray):
        return np.asarray(t.numpy())
    if type(t).__module__.startswith("cupy"):
        return t.get()
    return np.asarray(t).view(np.ndarray) if isinstance(t, np.ndarray) else np.asarray(t)
