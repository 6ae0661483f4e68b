"""What a person adding a primitive imports: the rule writer's face.

A primitive is a name and an implementation on backend arrays; its rules sit
beside it, written with the engine's own ops so they differentiate again:

* ``p.defvjp(lambda k, g, out, *xs, **params: ...)``: input ``k``'s cotangent
  from the output's ``g``;
* ``p.defjvp(lambda k, t, out, *xs, **params: ...)``: the output's tangent
  from input ``k``'s ``t`` (or ``p.deflinear()`` where ``p`` is linear in
  each input, as a product is);
* ``p.defbatch(lambda bdims, shapes, out_shape, **params: ...)``: where the
  batch axis goes, or :class:`BatchMixingError` where rows mix;
* :func:`broadcasting` for NumPy broadcasting between inputs.

``g`` and ``t`` may carry leading batch axes (a Jacobian's basis): a rule
keeps them in front. The machinery (the tape in :mod:`einsumgrad.tensor`)
knows no rule; :func:`check_grads` tests a new one against finite
differences, in both modes, to any order.

Example:
    >>> import einsumgrad as eg
    >>> from einsumgrad.extend import Primitive, as_tensor, backend_of, bind, elementwise_batch
    >>> cube_p = Primitive("cube", lambda x: backend_of(x).power(x, 3))
    >>> @cube_p.defvjp
    ... def cube_vjp(k, g, out, x):
    ...     return g * 3.0 * x * x
    >>> @cube_p.defjvp
    ... def cube_jvp(k, t, out, x):
    ...     return t * 3.0 * x * x
    >>> cube_p.defbatch(elementwise_batch) is elementwise_batch
    True
    >>> cube = lambda x: bind(cube_p, as_tensor(x))
    >>> float(eg.grad(lambda x: cube(x).sum())(eg.tensor([2.0]))[0])
    12.0
"""
from .backends import Backend, backend_of, common_backend, in_order_of, memory_order
from .rules.einsum import broadcast_to, constant_like, einsum_spec, sum_to
from .rules.elementwise import broadcasting, elementwise_batch
from .rules.shape import normalize_axes, reshape
from .spec import Spec, letters, parse
from .tensor import BatchMixingError, Node, Primitive, Tensor, as_tensor, bind, pair
from .testing import check_grads

__all__ = ["Backend", "BatchMixingError", "Node", "Primitive", "Spec", "Tensor", "as_tensor",
           "backend_of", "bind", "broadcast_to", "broadcasting", "check_grads", "common_backend",
           "constant_like", "einsum_spec", "elementwise_batch", "in_order_of", "letters",
           "memory_order", "normalize_axes", "pair", "parse", "reshape", "sum_to"]
