"""einsumgrad: a small, exact einsum-to-autograd engine.

Data flows spec -> derive -> plan -> backend; Tensor and tape sit on top, and
the transforms on top of those:

* :mod:`einsumgrad.spec`: einsum strings parsed into integer index labels;
* :mod:`einsumgrad.derive`: VJP / JVP / Jacobian patterns, derived on labels;
* :mod:`einsumgrad.plan`: contraction order (opt_einsum), planned once, cached;
* :mod:`einsumgrad.backend`: NumPy or CuPy, chosen by the arrays' own type;
* :mod:`einsumgrad.tensor` and :mod:`einsumgrad.ops`: Tensor, tape, the rule table;
* :mod:`einsumgrad.transforms`: grad, vjp, jvp, jacrev, jacfwd, hessian, ...
"""
from .backend import Backend, register_backend
from .derive import derive
from .explain import Tape, explain, trace
from .ops import (abs, einsum, erf, exp, gelu, log, log_softmax, logsumexp, matmul, max, mean,
                  relu, reshape, sigmoid, sin, cos, softmax, softplus, sqrt, square, sum, tanh,
                  transpose, where)
from .spec import EinsumError
from .tensor import BatchMixingError, Tensor, enable_grad, no_grad
from .transforms import (batch_hessian, batch_jacobian, directional, elementwise_grad, grad,
                         hessian, hvp, jacfwd, jacrev, jvp, value_and_grad, vjp)

__version__ = "0.1.0"


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Wrap an array-like as a Tensor.

    A CuPy array stays on its GPU; anything else becomes a NumPy array.

    Raises:
        TypeError: ``requires_grad`` on a non-floating dtype.
    """
    from .backend import backend_of
    if isinstance(data, Tensor):
        data = data.data
    if backend_of(data).name != "numpy":  # a device array (CuPy, the tests' strict) stays put
        arr = data if dtype is None else data.astype(dtype)
    else:
        import numpy
        arr = numpy.array(data, dtype=dtype)
    if requires_grad and arr.dtype.kind not in "fc":
        raise TypeError(f"only floating-point tensors can require grad, got dtype {arr.dtype}")
    return Tensor(arr, requires_grad=requires_grad)
