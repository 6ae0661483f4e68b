"""Transforms on functions of Tensors, built on two walks: ``backprop`` and ``push``.

Each transform traces ``f`` (recording every op while it is in flight), then
pulls cotangents back (:func:`vjp`) or pushes tangents forward (:func:`jvp`).
The final walk records only what an enclosing transform or a user's
``requires_grad`` needs, so transforms nest: ``hessian`` is ``jacfwd`` of
``jacrev``. A whole Jacobian is one walk: the basis rides as one extra
leading index through every pattern.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

from .backends import backend_of
from .plan import jacobian_of
from .rules import einsum_p, identity_p, reshape
from .spec import Spec, letters
from .tensor import (BatchMixingError, Tensor, as_tensor, backprop, bind, differentiable, push,
                     state)


@contextlib.contextmanager
def _tracing(batch: bool = False):
    """Record every op while ``f`` runs (and track batch axes for batch_jacobian)."""
    prev = state.grad
    state.grad = True
    state.tracing += 1
    state.batch += batch
    try:
        yield
    finally:
        state.tracing -= 1
        state.batch -= batch
        state.grad = prev


def _start(p: Any) -> Tensor:
    """A fresh tensor standing for one primal; tied to ``p`` if an outer graph needs it."""
    p = _float_tensor(p)
    if p.requires_grad or state.tracing > 1:
        x = bind(identity_p, p)
    else:
        x = Tensor(p.data)
    x.bdim = p.bdim
    return x


def _float_tensor(p: Any) -> Tensor:
    t = as_tensor(p)
    differentiable(t.dtype)
    return t


def _finish(t: Tensor) -> Tensor:
    """Cut a result from the trace when nothing outside needs its graph."""
    return t if state.tracing or t.requires_grad else t.detach()


def _basis(like: Tensor, shape: tuple, nb_shape: tuple = ()) -> Tensor:
    """Identity basis: shape ``(n,) + nb_shape + shape`` with ``n = prod(shape)``."""
    xp = backend_of(like.data)
    n = math.prod(shape)
    e = xp.eye(n, dtype=like.dtype).reshape((n,) + (1,) * len(nb_shape) + shape)
    return Tensor(xp.broadcast_to(e, (n,) + nb_shape + shape))


def _zeros(like: Tensor, shape: tuple) -> Tensor:
    return Tensor(backend_of(like.data).zeros(shape, dtype=like.dtype))


def _move_first_last(t: Tensor) -> Tensor:
    """Move axis 0 after the others: an einsum."""
    labels = letters(t.ndim)
    return _einsum1(Spec((labels,), labels[1:] + labels[:1]), t)


def _einsum1(spec: Spec, t: Tensor) -> Tensor:
    """A one-operand einsum (a transpose) on a clean spec."""
    return bind(einsum_p, t, spec=spec)


def _argnums(argnums, n: int) -> tuple:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums {a} out of range for {n} argument(s)")
    return tuple(a % n for a in nums)


def trace_call(f: Callable, args: Sequence, nums: tuple, batch: bool = False,
               bdims: Sequence | None = None):
    """Run ``f`` recording every op, with fresh tensors at ``nums``; returns (xs, out).

    With ``batch`` each op's batch rule tracks a batch axis: axis 0 of each
    traced argument, or ``bdims[j]`` of argument ``nums[j]`` (None: not tracked).

    While ``f`` runs those tensors are the inputs being traced
    (``state.inputs``): turning anything that depends on them into NumPy
    values raises, and so does changing them in place.
    """
    with _tracing(batch):
        args = list(args)
        xs = []
        for j, i in enumerate(nums):
            args[i] = _start(args[i])
            if batch:
                args[i].bdim = 0 if bdims is None else bdims[j]
            xs.append(args[i])
        inputs = state.inputs
        state.inputs = {**inputs, **{id(x): x for x in xs}}
        try:
            out = f(*args)
        finally:
            state.inputs = inputs
        out = tuple(map(as_tensor, out)) if isinstance(out, (tuple, list)) else as_tensor(out)
    return xs, out


# -- the two foundations ----------------------------------------------------------

def vjp(f: Callable, *primals) -> tuple:
    """Reverse mode: ``(out, vjp_fn)``, with ``vjp_fn(cotangent)`` a tuple, one per primal.

    ``vjp_fn(g)[k][j...] = sum_i g[i...] d out[i...] / d primal_k[j...]``.
    """
    xs, out = trace_call(f, primals, tuple(range(len(primals))))

    def vjp_fn(cotangent) -> tuple:
        g = as_tensor(cotangent, like=out)
        if g.shape[g.ndim - out.ndim:] != out.shape:
            raise ValueError(f"vjp: cotangent shape {g.shape} does not match the output "
                             f"{out.shape}")
        return tuple(_finish(r) for r in _pull(out, g, xs))
    return _finish(out), vjp_fn


def _pull(out: Tensor, g: Tensor, xs: Sequence[Tensor]) -> list:
    """Cotangents of ``xs`` (zeros where out does not depend on them)."""
    nb = g.ndim - out.ndim
    got = {id(t): c for t, c in backprop([out], [g], xs)}
    return [got[id(x)] if id(x) in got else _zeros(g, g.shape[:nb] + x.shape) for x in xs]


def jvp(f: Callable, primals: Sequence, tangents: Sequence) -> tuple:
    """Forward mode: ``(out, tangent_out)``, tangents pushed through each JVP rule."""
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    xs, out = trace_call(f, primals, tuple(range(len(primals))))
    ts = [as_tensor(t, like=x) for t, x in zip(tangents, xs)]
    for t, x in zip(ts, xs):
        if t.shape != x.shape:
            raise ValueError(f"jvp: tangent shape {t.shape} does not match its primal {x.shape}")
    return _finish(out), _finish(_push(out, xs, ts))


def _push(out: Tensor, xs: Sequence[Tensor], ts: Sequence[Tensor]) -> Tensor:
    nb = ts[0].ndim - xs[0].ndim
    r = push(out, xs, ts)
    return r if r is not None else _zeros(ts[0], ts[0].shape[:nb] + out.shape)


# -- gradients -------------------------------------------------------------------------

def value_and_grad(f: Callable, argnums=0) -> Callable:
    """``(f(*args), gradient)`` of a scalar ``f``; a tuple of gradients for tuple ``argnums``."""
    def wrapped(*args):
        nums = _argnums(argnums, len(args))
        xs, out = trace_call(f, args, nums)
        if out.size != 1:
            raise ValueError(f"grad needs a scalar output, got shape {out.shape}; "
                             f"use jacrev, or vjp with a cotangent")
        gs = [_finish(g) for g in _pull(out, Tensor(backend_of(out.data).ones_like(out.data)), xs)]
        return _finish(out), (gs[0] if isinstance(argnums, int) else tuple(gs))
    return wrapped


def grad(f: Callable, argnums=0) -> Callable:
    """The gradient of a scalar ``f`` with respect to ``args[argnums]``."""
    vg = value_and_grad(f, argnums)
    return lambda *args: vg(*args)[1]


def elementwise_grad(f: Callable, argnums=0) -> Callable:
    """For element-wise ``f``: the diagonal of its Jacobian, in one reverse pass.

    It is the gradient of ``sum(f)``, which equals the diagonal exactly when each
    output element depends on the matching input element only (broadcast inputs
    get the sum over the broadcast axes, as a meshgrid's partials are). That is
    proved while ``f`` runs: each axis of the arguments (lined up from the
    right, as broadcasting lines them up) is tracked as a batch axis in turn,
    and every op's batch rule checks that it keeps those slices apart. Axis 0
    is tracked while tracing for the gradient; each further axis costs one
    more forward pass of ``f``.

    Raises:
        BatchMixingError: ``f`` mixes elements (names the op).
    """
    def wrapped(*args):
        nums = _argnums(argnums, len(args))
        ranks = [as_tensor(args[i]).ndim for i in nums]
        rank = max(ranks)
        for axis in range(1, rank):
            _, out = trace_call(f, args, nums, batch=True,
                                bdims=[_lined_up(axis, r, rank) for r in ranks])
            _check_elementwise(out, axis, rank)
        xs, out = trace_call(f, args, nums, batch=rank > 0,
                             bdims=[_lined_up(0, r, rank) for r in ranks])
        if rank:
            _check_elementwise(out, 0, rank)
        gs = [_finish(g) for g in _pull(out, Tensor(backend_of(out.data).ones_like(out.data)), xs)]
        return gs[0] if isinstance(argnums, int) else tuple(gs)
    return wrapped


def _lined_up(axis: int, ndim: int, rank: int):
    """Axis ``axis`` of the broadcast shape (rank ``rank``) in an argument of rank ``ndim``."""
    a = axis - (rank - ndim)
    return a if a >= 0 else None


def _check_elementwise(out, axis: int, rank: int) -> None:
    if isinstance(out, tuple):
        raise TypeError("elementwise_grad: f must return one Tensor")
    want = out.ndim - rank + axis
    if out.bdim is not None and out.bdim != want:
        raise BatchMixingError(f"elementwise_grad: f moves the arguments' axis {axis} to "
                               f"axis {out.bdim} of its output: not element-wise")


# -- Jacobians and Hessians ----------------------------------------------------------

def _single_einsum(out: Tensor, x: Tensor):
    """If ``out`` is one einsum with ``x`` as one operand and nothing else traced, its slot."""
    node = out.node
    if state.tracing or node is None or node.prim is not einsum_p:
        return None
    slots = [k for k, t in enumerate(node.inputs) if t is x]
    if len(slots) != 1 or any(t.node is not None for t in node.inputs):
        return None
    return slots[0]


def _materialized(out: Tensor, x: Tensor) -> Tensor | None:
    """``J`` built by the derivation layer when ``out`` is one einsum of ``x``."""
    k = _single_einsum(out, x)
    if k is None:
        return None
    node = out.node
    return Tensor(jacobian_of(node.params["spec"], k, [t.data for t in node.inputs]))


def _jacobian(f: Callable, argnums, one: Callable) -> Callable:
    """Trace ``f``; ``one(out, xs)`` gives the Jacobians of one output w.r.t. ``xs``.

    A tuple ``argnums`` gives a tuple per output; a tuple of outputs gives a
    tuple of those (as ``torch.func``, so ``hessian`` with tuple ``argnums``
    gives the blocks ``H[i][j]``).
    """
    def wrapped(*args):
        nums = _argnums(argnums, len(args))
        xs, out = trace_call(f, args, nums)
        pick = (lambda r: r[0]) if isinstance(argnums, int) else tuple
        if isinstance(out, tuple):
            return tuple(pick(one(o, xs)) for o in out)
        return pick(one(out, xs))
    return wrapped


def _jacrev_one(out: Tensor, xs: Sequence[Tensor]) -> list:
    res = [_materialized(out, x) for x in xs]
    if any(r is None for r in res):
        gs = _pull(out, _basis(out, out.shape), xs)  # one pass: (n_out, *x.shape) each
        res = [_finish(reshape(g, out.shape + x.shape)) for g, x in zip(gs, xs)]
    return res


def _jacfwd_one(out: Tensor, xs: Sequence[Tensor]) -> list:
    res = []
    for x in xs:
        J = _materialized(out, x)
        if J is None:
            t = _push(out, [x], [_basis(x, x.shape)])  # one pass: (n_in, *out.shape)
            J = _finish(reshape(_move_first_last(t), out.shape + x.shape))
        res.append(J)
    return res


def jacrev(f: Callable, argnums=0) -> Callable:
    """Full Jacobian ``out.shape + arg.shape`` by reverse mode, in one batched pass.

    The cotangent is the identity basis over the output, carried as one extra
    leading index through every VJP pattern, so all ``out.size`` rows come out
    of one backward walk. When ``f`` is a single einsum of the argument, ``J``
    is built directly by the derivation layer (``jacobian_of``) instead.

    Args:
        f: takes Tensors, returns a Tensor (or a tuple of them).
        argnums: which argument(s): an int, or a tuple (then a tuple of Jacobians).
    """
    return _jacobian(f, argnums, _jacrev_one)


def jacfwd(f: Callable, argnums=0) -> Callable:
    """Full Jacobian ``out.shape + arg.shape`` by forward mode, in one batched pass.

    The tangent is the identity basis over the argument, one extra leading
    index pushed through every JVP rule: cheaper than :func:`jacrev` when the
    argument is smaller than the output. Arguments as for :func:`jacrev`.
    """
    return _jacobian(f, argnums, _jacfwd_one)


def hessian(f: Callable, argnums=0) -> Callable:
    """Hessian ``out.shape + arg.shape + arg.shape``: forward over reverse.

    With tuple ``argnums`` the result is the blocks ``H[i][j]`` (derivative by
    argument ``j`` of the gradient by argument ``i``), as ``torch.func.hessian``.
    """
    return jacfwd(jacrev(f, argnums), argnums)


def hvp(f: Callable) -> Callable:
    """Hessian-vector product ``H(x) v`` of a scalar ``f``, without building ``H``.

    Forward over reverse: the JVP of ``grad(f)`` at ``x`` along ``v``, about
    the cost of two gradients.
    """
    return lambda x, v: jvp(grad(f), (x,), (v,))[1]


def directional(f: Callable, order: int = 1) -> Callable:
    """``d^n/dt^n f(x + t v)`` at ``t = 0``: nested forward mode, no Hessian built.

    Each order nests one more :func:`jvp`, so order ``n`` costs about ``2^n``
    forward passes and no derivative tensor larger than ``f``'s output. For a
    row-wise ``f``, ``directional(f, 2)(x, x)[b, j] ==
    einsum('bi,bjik,bk->bj', x, H, x)`` with ``H = batch_hessian(f)(x)`` of
    shape ``(B, out, in, in)``: seed 000's contraction, H never built.

    Args:
        f: takes one Tensor, returns a Tensor.
        order: the derivative's order, at least 1.
    """
    if order < 1:
        raise ValueError("directional: order must be at least 1")

    def wrapped(x, v):
        g = f
        for _ in range(order):
            g = (lambda h: lambda y: jvp(h, (y,), (v,))[1])(g)
        return g(x)
    return wrapped


# -- per-sample derivatives ----------------------------------------------------------

def batch_jacobian(f: Callable, *, batch_ndim: int = 1,
                   chunk_size: int | None = 16384) -> Callable:
    """Per-sample Jacobian ``(B,) + out.shape[1:] + x.shape[1:]`` of a row-wise ``f``.

    The batch axis stays one free index through every pattern: the basis covers
    one sample's features and is broadcast over ``B``, so no ``B x B`` block is
    ever built. Forward mode (one push of ``prod(fin)`` tangents) when a
    sample has no more inputs than outputs, else reverse mode (one pull of
    ``prod(fout)`` cotangents). While ``f`` runs, each op's batch rule checks
    that it keeps rows apart, so a mixing ``f`` is an error, never a silently
    summed answer.

    Args:
        f: maps ``x`` of shape ``(B, *fin)`` to ``(B, *fout)``, row ``b`` of the
            output depending on row ``b`` of ``x`` alone. Parameters without a
            batch axis (closed over, or broadcast) are fine.
        batch_ndim: how many leading axes of ``x`` are batch axes. With
            ``batch_ndim=2`` and ``x`` of shape ``(B, N, 3)`` (seed 002's
            point clouds) ``f`` is called on the points flattened to
            ``(B * N, 3)`` and the result is ``(B, N) + fout + fin``; every
            point is checked to stay apart from every other, across ``B``
            and ``N`` alike.
        chunk_size: at most this many rows go through ``f`` at once, so the
            memory for the trace and the tangents stays bounded however large
            ``B`` is (rows are independent, so this changes no number).
            ``None`` passes all rows at once. Inside another transform, or
            when ``x`` requires grad, all rows go at once, so the result stays
            differentiable.

    Raises:
        BatchMixingError: ``f`` mixes batch rows (names the op).
    """
    def wrapped(x):
        x = _float_tensor(x)
        lead = x.shape[:batch_ndim]
        if batch_ndim != 1:
            if len(lead) != batch_ndim:
                raise ValueError(f"batch_jacobian: x of shape {x.shape} has fewer than "
                                 f"batch_ndim={batch_ndim} axes")
            x = reshape(x, (math.prod(lead),) + x.shape[batch_ndim:])
        B = x.shape[0]
        if chunk_size is None or B <= chunk_size or state.tracing or x.requires_grad:
            J = _batch_jacobian(f, x)
        else:
            xp = backend_of(x.data)
            J = None
            for i in range(0, B, chunk_size):
                part = _batch_jacobian(f, Tensor(x.data[i:i + chunk_size])).data
                if J is None:
                    J = xp.empty((B,) + part.shape[1:], dtype=part.dtype)
                J[i:i + len(part)] = part
            J = Tensor(J)
        if batch_ndim != 1:
            J = reshape(J, lead + J.shape[1:])
        return _finish(J)
    return wrapped


def _batch_jacobian(f: Callable, x: Tensor) -> Tensor:
    xs, out = trace_call(f, (x,), (0,), batch=True)
    x = xs[0]
    B = x.shape[0]
    if out.ndim == 0 or out.shape[0] != B:
        raise BatchMixingError(f"batch_jacobian: f's output {out.shape} does not keep the "
                               f"batch axis of size {B} first")
    if out.bdim not in (0, None):
        raise BatchMixingError(f"batch_jacobian: f moved the batch axis to {out.bdim}")
    fin, fout = x.shape[1:], out.shape[1:]
    if math.prod(fin) <= math.prod(fout):
        t = _push(out, [x], [_basis(x, fin, (B,))])           # (E, B, *fout)
        return reshape(_move_first_last(t), out.shape + fin)
    g = _pull(out, _basis(out, fout, (B,)), [x])[0]        # (C, B, *fin)
    ls = letters(g.ndim)
    return reshape(_einsum1(Spec((ls,), (ls[1], ls[0]) + ls[2:]), g), out.shape + fin)


def batch_hessian(f: Callable, *, batch_ndim: int = 1,
                  chunk_size: int | None = 16384) -> Callable:
    """Per-sample Hessian ``(B,) + out.shape[1:] + x.shape[1:] * 2``: forward over reverse.

    ``batch_jacobian`` of ``batch_jacobian``; the arguments, the rule on ``f``
    and the error are as there.
    """
    inner = batch_jacobian(f, chunk_size=None)
    return batch_jacobian(inner, batch_ndim=batch_ndim, chunk_size=chunk_size)
