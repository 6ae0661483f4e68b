"""einsumgrad: a small, exact einsum-to-autograd engine.

Data flows spec -> derive -> plan -> backends; the tape sits on the
backends, the rules on the tape, and the transforms on top of those:

* :mod:`einsumgrad.spec`: einsum strings parsed into integer index labels;
* :mod:`einsumgrad.derive`: VJP / JVP / Jacobian patterns, derived on labels (pure);
* :mod:`einsumgrad.plan`: contraction order (opt_einsum), planned once, cached;
* :mod:`einsumgrad.backends`: NumPy or CuPy, chosen by the arrays' own type,
  with MKL and numba kernels as capabilities;
* :mod:`einsumgrad.tensor`: Tensor, Primitive and the tape, which knows no rule;
* :mod:`einsumgrad.rules`: every primitive beside its VJP, JVP and batch rule;
* :mod:`einsumgrad.transforms`: grad, vjp, jvp, jacrev, jacfwd, hessian, ...;
* :mod:`einsumgrad.numpy_api`: NumPy's functions on Tensors, run as einsumgrad ops;
* :mod:`einsumgrad.program`: trace once into a Program (read it, emit NumPy source, jit it);
* :mod:`einsumgrad.distributed`: the batch transforms on dask arrays, blocks of rows on workers;
* :mod:`einsumgrad.extend`: what a person adding a primitive imports.
"""
import numpy as _numpy

from .backends import Backend, register_backend
from .backends import backend_of as _backend_of
from .defaults import get_default_dtype, set_default_dtype
from .derive import derive
from .explain import Tape, explain, trace
from .program import Program, TraceError, jit, make_program
from .creation import (arange, eye, from_dlpack, full, linspace, ones, ones_like, zeros,
                       zeros_like)
from .rules import (abs, argmax, argmin, astype, clamp, clip, concatenate, copy, cos, cumsum,
                    einsum, erf, exp, expand_dims, flip, floor_divide, gelu, log, log_softmax,
                    logsumexp, matmul, max, maximum, mean, min, minimum, moveaxis, pad, prod, relu,
                    remainder, reshape, sigmoid, sin, softmax, softplus, split, sqrt, square,
                    squeeze, stack, std, sum, swapaxes, tanh, transpose, var, where)
from .spec import EinsumError
from .tensor import BatchMixingError, Tensor, TracerConversionError, enable_grad, no_grad
from . import numpy_api as _numpy_api  # noqa: F401 (gives Tensor NumPy's protocols)
from .vmap import per_sample_grad, per_sample_grad_norm, vmap
from .transforms import (batch_hessian, batch_jacobian, directional, elementwise_grad, grad,
                         hessian, hvp, jacfwd, jacrev, jvp, value_and_grad, vjp)

cat, unsqueeze, clone = concatenate, expand_dims, copy  # torch's spellings

__version__ = "0.1.0"


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Wrap an array-like as a Tensor.

    A CuPy array stays on its GPU; anything else becomes a NumPy array.

    Raises:
        TypeError: ``requires_grad`` on a non-floating dtype (complex included:
            einsumgrad does not differentiate complex values).
    """
    if isinstance(data, Tensor):  # a copy through the backend (inside a program trace too)
        xp = _backend_of(data.data)
        return Tensor(xp.asarray(data.data, dtype=dtype).copy(), requires_grad=requires_grad)
    if _backend_of(data).name != "numpy":  # a device array (CuPy, the tests' strict) stays put
        arr = data if dtype is None else data.astype(dtype)
    else:
        arr = _numpy.array(data, dtype=dtype)
    return Tensor(arr, requires_grad=requires_grad)
