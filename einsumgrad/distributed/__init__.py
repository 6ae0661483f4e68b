"""Past one machine: einsumgrad's transforms on dask arrays, blocks of rows on dask workers.

``eg.batch_jacobian``, ``eg.batch_hessian``, ``eg.directional`` and
``eg.elementwise_grad`` take dask arrays chunked along the batch axes and
return lazy dask arrays: ``f`` is traced once on a small sample (a mixing
``f`` raises ``eg.BatchMixingError`` before anything is scheduled), then each
block runs the NumPy (or CuPy) transform on a worker, with no communication
between blocks. The functions here are the same transforms, callable by
this module's name; :func:`value_and_grad` gives the loss and gradient of a
mean over a data set held by the workers.

Importing this module imports neither dask nor anything beyond einsumgrad;
dask is imported at the first call that lifts a dask array. Install the
extra with ``pip install einsumgrad[distributed]`` (dask[array], distributed, zarr).
"""
from __future__ import annotations

from typing import Callable

# transforms.py imports .blocks while it is being imported itself, which runs this
# file first: bind the module object now (Python finds it in sys.modules) and read
# its functions at call time, when it is complete.
from .. import transforms
from .blocks import is_dask, on_blocks
from .reduce import value_and_grad

__all__ = ["batch_hessian", "batch_jacobian", "directional", "elementwise_grad", "is_dask",
           "on_blocks", "value_and_grad"]


def batch_jacobian(f: Callable, argnums=0, batch_ndim: int = 1, *,
                   chunk_size: int | None = None) -> Callable:
    """:func:`einsumgrad.batch_jacobian` on dask arrays chunked along the leading batch axes.

    Returns a lazy dask array ``(*batch, *fout, *fin)`` (the same structure as
    the NumPy call for tuple ``argnums`` or pytree outputs), chunked like
    ``x`` along the batch axes, one chunk along the rest; ``chunk_size``
    counts rows per pass inside each block.
    """
    local = transforms.batch_jacobian(f, argnums, batch_ndim, chunk_size=chunk_size)
    return on_blocks(local, argnums, batch_ndim)


def batch_hessian(f: Callable, argnums=0, batch_ndim: int = 1, *,
                  chunk_size: int | None = None) -> Callable:
    """:func:`einsumgrad.batch_hessian` on dask arrays chunked along the batch axes."""
    local = transforms.batch_hessian(f, argnums, batch_ndim, chunk_size=chunk_size)
    return on_blocks(local, argnums, batch_ndim)


def directional(f: Callable, order: int = 1) -> Callable:
    """:func:`einsumgrad.directional` on dask arrays ``x`` and ``v`` chunked along axis 0.

    ``directional`` alone does not prove that ``f`` keeps rows apart, so
    ``batch_jacobian(f)`` is traced on the sample first (BatchMixingError if not).
    """
    def rows_apart(x, v, **kwargs):
        transforms.batch_jacobian(f)(x, **kwargs)
    return on_blocks(transforms.directional(f, order), (0, 1), 1, check=rows_apart)


def elementwise_grad(f: Callable, argnums=0) -> Callable:
    """:func:`einsumgrad.elementwise_grad` on dask arrays of one shape, chunked along any axes."""
    return on_blocks(transforms.elementwise_grad(f, argnums), argnums, None)
