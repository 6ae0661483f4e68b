"""Backends, one file each, as opt_einsum keeps them: the array namespace is
chosen from the array's own type (:mod:`.base`).

* :mod:`.numpy_backend`: NumPy, the host's, with two optional capabilities:
  :mod:`.mkl` (MKL's GEMM and vector math) and :mod:`.kernels` (numba's
  fused row kernels);
* :mod:`.cupy_backend`: CuPy on an NVIDIA GPU, made on first use;
* :mod:`.strict`: the tests' stand-in for a GPU (registered when imported).

Rules and layers create and touch data only through :func:`backend_of`'s
namespace, never through ``numpy.``, and ask a backend for a capability by
name (``xp.layer_norm``, ``xp.normal_cdf``, ``xp.threads_large_gemm``), never
by importing a kernel module.
"""
from .base import (KERNELS, Backend, DeviceMismatchError, backend_of, common_backend,
                   device_backend, device_mismatch, in_order_of, is_backend_array, memory_order,
                   register_backend, register_lazy, to_backend)
from .cupy_backend import cupy_backend
from .numpy_backend import NUMPY

__all__ = ["KERNELS", "NUMPY", "Backend", "DeviceMismatchError", "backend_of", "common_backend",
           "cupy_backend", "device_backend", "device_mismatch", "in_order_of", "is_backend_array",
           "memory_order", "register_backend", "register_lazy", "to_backend"]
