"""The CuPy backend: arrays on an NVIDIA GPU, made the first time one shows up
(so CuPy is imported only where it is used)."""
from __future__ import annotations

from .base import Backend, register_lazy

_CUPY: Backend | None = None


def cupy_backend() -> Backend:
    """The CuPy backend (CuPy imported on the first call)."""
    global _CUPY
    if _CUPY is None:
        try:
            import cupy
            import cupyx
            from cupyx.scipy.special import erf
        except ImportError as e:
            raise ImportError("device 'cuda' needs CuPy: pip install -e '.[gpu]'") from e
        _CUPY = Backend("cupy", cupy, erf=erf, add_at=cupyx.scatter_add,
                        as_strided=cupy.lib.stride_tricks.as_strided,
                        to_numpy=cupy.asnumpy, device="cuda")
    return _CUPY


register_lazy("cupy", ("cuda", "gpu"), cupy_backend)
