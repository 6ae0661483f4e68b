"""Tensor and tape: primitives are bound here, recorded, and differentiated.

A :class:`Primitive` holds its implementation on backend arrays and its rules:
``vjp(k, g, out, *xs)``, ``jvp(k, t, out, *xs)`` and ``batch`` (which axis of
the output is the batch axis, for :func:`~einsumgrad.batch_jacobian`). Rules
are written with the engine's own ops, so running them while recording makes
the backward (or forward) pass itself differentiable. A primitive whose VJP
fills part of an otherwise zero array (indexing) may also give ``accum``, the
same VJP added in place into a buffer: a backward that records nothing sums
the cotangents of several slices of one tensor in one buffer that way. A
primitive may also give ``fused``: every input's VJP at once on backend
arrays, for a backward that records nothing (one fused kernel where the rule
is several passes); it may decline, and the rules run.

:func:`bind` applies a primitive to Tensors and, when something upstream
requires grad or a transform is tracing, records a :class:`Node` on the
output. :func:`backprop` walks nodes in reverse (cotangents may carry leading
batch axes: that is how a whole Jacobian costs one pass) and :func:`push`
walks them forward with tangents, which is true forward mode: each JVP rule
pushes the tangent through its primitive.

The tape knows no rule: it imports the backend layer alone, and the
primitives with their rules (broadcasting included) live in
:mod:`einsumgrad.rules`.
"""
from __future__ import annotations

import contextlib
import operator
import threading
from typing import Any, Callable, Sequence

import numpy

from .backends import (Backend, backend_of, device_backend, device_mismatch, in_order_of,
                       is_backend_array, to_backend)


class BatchMixingError(ValueError):
    """A function given to batch_jacobian / batch_hessian mixes batch rows."""


class TracerConversionError(TypeError):
    """A traced Tensor turned into an ndarray or a Python number inside a
    transform: the value would leave the tape and its gradient be lost
    (JAX's ``TracerArrayConversionError``)."""


class _State(threading.local):
    def __init__(self):
        self.grad = True        # record at all (no_grad turns it off)
        self.tracing = 0        # transforms in flight: record every op
        self.batch = 0          # batch_jacobian in flight: track batch axes
        self.inputs = {}        # id -> Tensor: the inputs transforms in flight trace
        self.program = None     # the recorder of a program trace in flight (einsumgrad.program)


state = _State()
PROGRAMS = 0  # program traces in flight in any thread (einsumgrad.program): a cheap first test
BATCHING = 0  # vmaps in flight in any thread (einsumgrad.vmap): bind's cheap first test

# The batching step, installed by einsumgrad.rules.shape (the tape knows no rule):
# ``_batch_step(prim, inputs, params)`` runs ``prim``'s batching rule where an input
# is batched (inside vmap) and returns its result, else None; ``_stand_in(t)`` is a
# plain Tensor with ``t``'s backend and dtype, batched or not.
_batch_step: Callable | None = None
_stand_in: Callable = lambda t: t  # noqa: E731


def install_batching(step: Callable, stand_in: Callable) -> None:
    """Give :func:`bind` vmap's batching step (see ``_batch_step``), and
    :func:`as_tensor` the way to read a batched tensor's backend."""
    global _batch_step, _stand_in
    _batch_step, _stand_in = step, stand_in


class Primitive:
    """An op on backend arrays with its derivative rules beside it."""

    __slots__ = ("name", "impl", "vjp", "jvp", "batch", "accum", "fused", "vmap")

    def __init__(self, name: str, impl: Callable):
        self.name, self.impl = name, impl
        self.vjp = self.jvp = self.batch = self.accum = self.fused = self.vmap = None

    def defvjp(self, fn: Callable) -> Callable:
        self.vjp = fn
        return fn

    def defjvp(self, fn: Callable) -> Callable:
        self.jvp = fn
        return fn

    def deflinear(self) -> None:
        """The primitive is linear in each input, the others held fixed (a
        product, patches): its JVP is itself with the tangent in the input's
        slot, as HIPS autograd's ``def_linear``. It must pass leading batch
        axes of a tangent through, as every JVP rule does."""
        self.jvp = lambda k, t, out, *xs, **params: bind(self, *xs[:k], t, *xs[k + 1:], **params)

    def defbatch(self, fn: Callable) -> Callable:
        self.batch = fn
        return fn

    def defvmap(self, fn: Callable) -> Callable:
        """``fn(bdims, *xs, **params)``: the batching rule :func:`einsumgrad.vmap` runs.
        ``bdims[k]`` is 0 where input ``k`` carries one more leading axis (the mapped
        one) and None where it does not; ``fn`` returns the output with that axis
        first. Written with the engine's ops, as the other rules."""
        self.vmap = fn
        return fn

    def defaccum(self, fn: Callable) -> Callable:
        """``fn(buf, g, out, x, **params)`` adds the VJP for the one input into
        the backend array ``buf`` in place (for a backward that records nothing)."""
        self.accum = fn
        return fn

    def deffused(self, fn: Callable) -> Callable:
        """``fn(g, out, *xs, **params)`` gives every input's VJP at once as backend
        arrays (for a backward that records nothing), or None to leave it to
        the rules. It must agree with ``vjp``, which stays the definition."""
        self.fused = fn
        return fn

    def __repr__(self) -> str:
        return f"<primitive {self.name}>"


_DATA, _VERSION = operator.attrgetter("data"), operator.attrgetter("version")  # no frame per call


class Node:
    """One recorded application: the primitive, its inputs and its parameters,
    with the versions of the inputs (and of the output, 0 at birth) as they
    were, so a derivative through values changed since raises."""

    __slots__ = ("prim", "inputs", "params", "versions", "out_version")

    def __init__(self, prim: Primitive, inputs: tuple, params: dict):
        self.prim, self.inputs, self.params = prim, inputs, params
        self.versions = tuple(map(_VERSION, inputs))
        self.out_version = 0

    def check(self, out: "Tensor") -> None:
        """Before differentiating through this op: raise if its output is complex
        (see :func:`differentiable`), or if ``out`` or an input changed in place
        since it was recorded."""
        if out.data.dtype.kind == "c":
            differentiable(out.dtype)
        if out.version != self.out_version:
            changed = (f"its output {_desc(out)} is at version {out.version}, "
                       f"expected {self.out_version}")
        else:
            for k, (x, v) in enumerate(zip(self.inputs, self.versions)):
                if x.version != v:
                    changed = f"its input {k} {_desc(x)} is at version {x.version}, expected {v}"
                    break
            else:
                return
        raise RuntimeError(f"op {self.prim.name!r}: a tensor its derivative needs was changed in "
                           f"place after the op was recorded ({changed}); redo the forward "
                           f"after the change, or change a clone")


def _desc(t: "Tensor") -> str:
    return f"(shape {t.shape}, dtype {t.dtype})"


_SCALAR = numpy.generic  # a module global: checked on every Tensor, a lookup saved


class Tensor:
    """An array (NumPy or CuPy) that records the ops applied to it.

    Attributes:
        data: the backend array.
        requires_grad: whether ``backward`` accumulates into ``grad``.
        grad: the accumulated gradient (a Tensor) or ``None``.
        node: the recorded :class:`Node` that made it, or ``None`` (a leaf, or
            nothing needed the graph).
        bdim: which axis is the batch axis while a batch transform traces
            (``None``: none, or no such transform in flight).
        version: how many times it was changed in place (in-place operators,
            ``t[idx] = v``, optimizer steps, ``load_state_dict``): a recorded
            op notes its inputs' versions, and differentiating through it
            after one changed raises, as torch's version counter.
    """

    __slots__ = ("data", "requires_grad", "grad", "node", "bdim", "version", "__weakref__")
    __array_ufunc__ = None  # ndarray (op) Tensor defers to Tensor; numpy_api gives the protocols

    def __init__(self, data: Any, requires_grad: bool = False):
        if isinstance(data, _SCALAR):
            # NumPy reductions and 0-d arithmetic give scalars; data stays an
            # array so np.asarray(t) works and in-place updates (optimizers) stick.
            data = backend_of(data).asarray(data)
        if requires_grad:
            differentiable(data.dtype)
        self.data = data
        self.requires_grad = requires_grad
        self.grad = None
        self.node = None
        self.bdim = None
        self.version = 0

    # -- array-like surface -------------------------------------------------
    # C getters: read on every op, a Python frame each would cost more than the read
    shape = property(operator.attrgetter("data.shape"))
    ndim = property(operator.attrgetter("data.ndim"))
    dtype = property(operator.attrgetter("data.dtype"))
    size = property(operator.attrgetter("data.size"))

    def __len__(self) -> int:
        return len(self.data)

    @property
    def device(self) -> str:
        return backend_of(self.data).device

    def numpy(self) -> numpy.ndarray:
        """The values as a NumPy array (copied from the GPU if need be).

        Raises:
            TracerConversionError: inside a transform, on a Tensor that
                depends on the transform's input (its gradient would be lost).
        """
        concrete(self, "numpy()")
        return self._values()

    def _values(self) -> numpy.ndarray:
        return numpy.asarray(backend_of(self.data).to_numpy(self.data))

    def __array__(self, dtype=None, copy=None):
        concrete(self, "numpy.asarray")
        a = self._values()
        if dtype is not None and a.dtype != dtype:
            return a.astype(dtype)  # already a fresh copy
        return a.copy() if copy else a

    def item(self) -> float:
        concrete(self, "item()")
        return self.data.item()

    def tolist(self):
        concrete(self, "tolist()")
        return self._values().tolist()

    def __float__(self) -> float:
        concrete(self, "float()")
        return float(self.data.item())

    def __int__(self) -> int:
        concrete(self, "int()")
        return int(self.data.item())

    def __bool__(self) -> bool:
        if self.size != 1:  # as torch and NumPy; without __bool__ Python would use len()
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous: "
                             f"only a one-element tensor has one")
        return bool(self.data.item())  # branching on a traced value loses no gradient

    def __repr__(self) -> str:
        body = numpy.array2string(self._values(), separator=", ", prefix="tensor(")
        extra = ", requires_grad=True" if self.requires_grad else ""
        if self.dtype != numpy.float64:
            extra = f", dtype={self.dtype}" + extra
        return f"tensor({body}{extra})"

    def to_device(self, device: Any) -> "Tensor":
        """A copy on ``device`` ('cpu', 'cuda' or a Backend), cut from the graph (a leaf)."""
        b = device if isinstance(device, Backend) else device_backend(device)
        return Tensor(to_backend(self.data, b), self.requires_grad)

    def __dlpack__(self, *args, **kwargs):
        """The array's DLPack capsule: ``torch.from_dlpack(t)`` shares its memory."""
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag:
            differentiable(self.dtype)
        self.requires_grad = flag
        return self

    @property
    def is_leaf(self) -> bool:
        return self.node is None

    def backward(self, grad: Any = None, retain_graph: bool | None = None,
                 create_graph: bool = False) -> None:
        """Reverse mode from this tensor into ``.grad`` of leaves requiring grad.

        Args:
            grad: the cotangent, shaped like this tensor; optional for a scalar.
            retain_graph: keep the graph for another backward (default:
                ``create_graph``); otherwise what it saved is freed.
            create_graph: record the backward pass itself, so the gradients
                can be differentiated again.
        """
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward of a tensor of shape {self.shape} needs `grad` "
                                   f"(shaped like it); only a scalar's is implied")
            grad = Tensor(ones_like_data(self.data))
        grad = as_tensor(grad, like=self)
        if grad.shape != self.shape:
            raise ValueError(f"backward: grad has shape {grad.shape}, the tensor {self.shape}")
        if grad.dtype != self.dtype:  # as torch: the cotangent takes the tensor's dtype
            grad = Tensor(grad.data.astype(self.dtype))
        if not self.requires_grad:
            raise RuntimeError("backward of a tensor that does not require grad: "
                               "no input on its path has requires_grad=True")
        retain = create_graph if retain_graph is None else retain_graph
        with _recording(create_graph):
            grads = backprop([self], [grad], targets=None, release=not retain)
        for t, g in grads:
            g = g if create_graph else g.detach()
            t.grad = g if t.grad is None else (t.grad + g if create_graph else
                                               Tensor(t.grad.data + g.data))


# -- what may be differentiated, what may leave the tape ------------------------

def differentiable(dtype) -> None:
    """Refuse to differentiate with respect to anything but real floating values.

    Complex tensors are refused rather than given gradients without the
    conjugations torch's convention needs (a wrong answer, silently).
    """
    if dtype.kind == "c":
        raise TypeError(f"einsumgrad does not differentiate complex tensors (dtype {dtype}): "
                        f"split them into real and imaginary parts, or use torch")
    if dtype.kind != "f":
        raise TypeError(f"only floating-point tensors can require grad, got dtype {dtype}")


def traced(t: "Tensor") -> bool:
    """Whether ``t`` depends on an input a transform in flight is tracing."""
    inputs = state.inputs
    if not inputs:
        return False
    if id(t) in inputs:
        return True
    return any(id(x) in inputs for x in toposort([t], lambda x: True, set(inputs)))


def concrete(t: "Tensor", what: str) -> None:
    """Refuse ``what`` (a conversion to NumPy or Python values) on a traced ``t``."""
    if state.program is not None:  # a program trace: its own error, naming the line
        state.program.concrete(t, what)
    if traced(t):
        raise TracerConversionError(
            f"{what} on a Tensor traced by a transform: the values would leave the tape and "
            f"the derivative through them be lost. Keep to einsumgrad ops inside the "
            f"function (eg.einsum, eg.exp, t.sum(), ...), or .detach() first if no "
            f"derivative should flow there")


# -- binding and recording ----------------------------------------------------

def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """``x`` as a Tensor; a Python scalar takes the dtype NumPy would give it next to ``like``."""
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "shape") and not isinstance(x, (numpy.ndarray, numpy.generic)) \
            and not is_backend_array(x):
        raise TypeError(f"a {type(x).__module__}.{type(x).__name__} is not an array einsumgrad "
                        f"runs on: wrap it with eg.tensor(x) (a copy) or eg.from_dlpack(x) "
                        f"(the same memory)")
    if BATCHING and like is not None:  # a batched ``like`` has no array of its own to read
        like = _stand_in(like)
    if like is not None and isinstance(x, (int, float, bool)):
        xp = backend_of(like.data)
        return Tensor(xp.asarray(x, dtype=xp.result_type(like.data.dtype, x)))
    if like is not None and not hasattr(x, "__array_namespace__") and not isinstance(x, numpy.ndarray):
        x = backend_of(like.data).asarray(x)
    if not hasattr(x, "shape"):
        x = numpy.asarray(x)
    return Tensor(x)


def ones_like_data(data):
    """Ones shaped like the backend array ``data``: a scalar's without ``ones_like``'s
    Python layers (a gradient's seed, once per call of ``grad``)."""
    xp = backend_of(data)
    return xp.asarray(1, dtype=data.dtype) if data.ndim == 0 else xp.ones_like(data)


def pair(x: Any, y: Any) -> tuple:
    """Two operands as Tensors; a Python scalar takes its dtype from the other side."""
    if isinstance(x, Tensor):
        return x, as_tensor(y, like=x)
    y = as_tensor(y)
    return as_tensor(x, like=y), y


def bind(prim: Primitive, *inputs: Tensor, **params) -> Tensor:
    """Apply ``prim`` to Tensors, recording it when something needs the graph.

    Inside ``vmap`` (:mod:`einsumgrad.vmap`) a batched input makes ``prim`` run its
    batching rule instead, which binds the ops on the physical tensors.
    """
    if BATCHING:
        out = _batch_step(prim, inputs, params)
        if out is not None:
            return out
    try:
        if PROGRAMS and state.program is not None:  # a program trace records every primitive
            out = Tensor(state.program.bind(prim, inputs, params))
        else:
            out = Tensor(prim.impl(*map(_DATA, inputs), **params))
    except Exception:
        err = device_mismatch([t.data for t in inputs])
        if err is None:
            raise
        raise err from None  # one clear error, not the array library's deep one
    st = state
    if st.grad:
        rg = False
        for t in inputs:
            if t.requires_grad:
                rg = True
                break
        if rg or st.tracing:
            if rg and out.data.dtype.kind == "c":
                raise TypeError(f"op {prim.name!r} gives a complex result from a tensor that "
                                f"requires grad: einsumgrad does not differentiate complex values")
            out.requires_grad = rg
            out.node = Node(prim, inputs, params)
    if st.batch:
        bdims = [t.bdim for t in inputs]
        if any(b is not None for b in bdims):
            if prim.batch is None:
                raise BatchMixingError(f"op {prim.name!r} has no batch rule: cannot show it "
                                       f"keeps batch rows apart")
            out.bdim = prim.batch(bdims, [t.shape for t in inputs], out.shape, **params)
    return out


@contextlib.contextmanager
def no_grad():
    """Stop recording inside the block (as ``torch.no_grad``)."""
    prev = state.grad
    state.grad = False
    try:
        yield
    finally:
        state.grad = prev


@contextlib.contextmanager
def enable_grad():
    prev = state.grad
    state.grad = True
    try:
        yield
    finally:
        state.grad = prev


@contextlib.contextmanager
def _recording(on: bool):
    prev = state.grad
    state.grad = on
    try:
        yield
    finally:
        state.grad = prev


# -- in-place changes -------------------------------------------------------------

def update(t: Tensor, compute: Callable[[Tensor], Tensor], *others: Tensor) -> Tensor:
    """Change ``t`` in place to ``compute(t)`` (which may read ``others``), as torch.

    Where nothing records (under ``no_grad``, or nothing requires grad and no
    transform traces) the values are written into ``t.data``, so whoever
    holds that buffer sees them. Where it records, a leaf that requires grad
    refuses (torch's rule), and so does an input a transform traces; any
    other tensor takes the recorded result (a new buffer, so no value another
    op saved changes) and its history goes on from there. Either way its
    version goes up, so an op recorded earlier that saved ``t`` refuses to
    be differentiated through.

    Raises:
        RuntimeError: a leaf that requires grad outside ``no_grad``, or a
            traced input.
        ValueError, TypeError: ``compute`` gave another shape or dtype.
    """
    recording = state.grad and (state.tracing or t.requires_grad or
                                any(o.requires_grad for o in others))
    if recording:
        if id(t) in state.inputs:
            raise RuntimeError("an input a transform differentiates cannot be changed in "
                               "place: compute a new tensor (x = x + ..., eg.where(...))")
        if t.requires_grad and t.node is None:
            raise RuntimeError("a leaf tensor that requires grad cannot be changed in place "
                               "outside eg.no_grad() (as torch): wrap the update in "
                               "`with eg.no_grad():`, or change a clone")
        before = Tensor(t.data, t.requires_grad)
        before.node, before.bdim, before.version = t.node, t.bdim, t.version
        new = compute(before)
    else:
        with no_grad():
            new = compute(t)
    if new.shape != t.shape:
        raise ValueError(f"in-place result of shape {new.shape} does not fit a tensor of "
                         f"shape {t.shape}")
    if new.dtype != t.dtype:
        raise TypeError(f"in-place result of dtype {new.dtype} for a tensor of dtype {t.dtype}")
    t.version += 1
    if recording:
        t.data = new.data
        t.node, t.requires_grad, t.bdim = new.node, new.requires_grad, new.bdim
        if t.node is not None:
            t.node.out_version = t.version
    else:
        t.data[...] = new.data
    return t


# -- graph walks ----------------------------------------------------------------

def toposort(roots: Sequence[Tensor], keep: Callable[[Tensor], bool],
             stop: set | None = None) -> list:
    """Tensors reachable from ``roots`` through ``keep``-ing inputs, inputs first."""
    order, seen = [], set()
    stack = [(r, False) for r in roots if keep(r)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        node = t.node
        if node is None or (stop is not None and id(t) in stop):
            continue
        if node.inputs is None:
            raise RuntimeError(_FREED)
        for x in node.inputs:
            if id(x) not in seen and keep(x):
                stack.append((x, False))
    return order


def _reaching(roots: Sequence[Tensor], targets: Sequence[Tensor]) -> list:
    """The tensors on a path from ``targets`` to ``roots``, inputs first (the order
    :func:`toposort` gives), from one walk of the graph that stops at the targets."""
    on = {id(t): True for t in targets}  # id -> lies on such a path; settled inputs first
    order, seen = [], set()
    stack = [(r, False) for r in roots]
    pop, put = stack.pop, stack.append
    while stack:
        t, expanded = pop()
        i = id(t)
        if expanded:  # its inputs are settled
            reached = False
            for x in t.node.inputs:
                if on.get(id(x)):
                    reached = True
                    break
            if reached:
                order.append(t)
            on[i] = reached
            continue
        if i in seen:
            continue
        seen.add(i)
        node = t.node
        if node is None or i in on:  # a leaf, or a target (the only ids in ``on`` unseen)
            if on.setdefault(i, False):
                order.append(t)
            continue
        if node.inputs is None:
            raise RuntimeError(_FREED)
        put((t, True))
        for x in node.inputs:
            if id(x) not in seen:
                put((x, False))
    return order


def _as_tensor_value(g) -> "Tensor":
    """A cotangent kept as a Tensor or (where nothing records) a backend array, as a Tensor."""
    return g if isinstance(g, Tensor) else Tensor(g)


def backprop(roots: Sequence[Tensor], cotangents: Sequence[Tensor],
             targets: Sequence[Tensor] | None, release: bool = False) -> list:
    """Reverse mode: pull ``cotangents`` from ``roots`` back to ``targets``.

    Cotangents may carry leading batch axes beyond their root's shape; every
    VJP rule keeps them. With ``targets=None`` it flows into every leaf that
    requires grad (``Tensor.backward``). With ``release``, the nodes walked
    drop what they saved once the pass is done (a second backward then raises).

    Returns:
        ``[(tensor, cotangent)]`` for the targets (or leaves) reached.
    """
    return [(t, _as_tensor_value(g)) for t, g in backprop_values(roots, cotangents, targets,
                                                                   release)]


def backprop_values(roots: Sequence[Tensor], cotangents: Sequence[Tensor],
                    targets: Sequence[Tensor] | None, release: bool = False) -> list:
    """:func:`backprop`, each cotangent a Tensor or, where no transform records, a
    backend array of the pass's own (a caller wraps it in a fresh Tensor, cut from
    any graph, without wrapping a Tensor first)."""
    if targets is None:
        stop = None
        order = toposort(roots, _requires_grad, stop)
    else:
        order = _reaching(roots, targets)
        stop = set(map(id, targets))
    keep = set(map(id, order))  # the inputs a cotangent flows on to
    cots: dict = {}
    for r, g in zip(roots, cotangents):
        cots[id(r)] = cots[id(r)] + g if id(r) in cots else g
    owned: set = set()  # ids whose cotangent is a buffer of this pass's own, added into
    grad = state.grad
    quiet = not state.tracing and not BATCHING  # no transform records what the rules bind
    # Where the rules' own ops would record nothing (``plain``), a primitive's fused
    # or in-place VJP gives the same values on arrays, without a Tensor per step;
    # where no transform records either, cotangents stay arrays (no Tensor at all).
    result = []
    for t in reversed(order):
        i = id(t)
        g = cots.pop(i, None)
        if g is None:
            continue
        owned.discard(i)
        node = t.node
        if node is None or (stop is not None and i in stop):
            result.append((t, g))
            continue
        if (t.version != node.out_version or t.data.dtype.kind == "c"
                or tuple(map(_VERSION, node.inputs)) != node.versions):
            node.check(t)  # raises: the common case passes above without a call
        prim, xs, params = node.prim, node.inputs, node.params
        is_array = not isinstance(g, Tensor)
        plain = not grad
        if grad and quiet and (is_array or not g.requires_grad) and not t.requires_grad:
            plain = True
            for x in xs:
                if x.requires_grad:
                    plain = False
                    break
        gd = g if is_array else g.data
        fused = None
        if prim.fused is not None and plain:
            fused = prim.fused(gd, t.data, *map(_DATA, xs), **params)
        gt = None if is_array else g  # g as a Tensor, made where a rule needs one
        for k, x in enumerate(xs):
            ix = id(x)
            if ix not in keep:
                continue
            if gt is None and (fused is None or prim.accum is not None):
                gt = Tensor(g)
            if prim.accum is not None and plain:
                # Slices of one tensor (q, k and v of one product) add their
                # cotangents into one zero buffer, in place: not one zero
                # array each, then summed.
                xp = backend_of(gd)
                have = cots.get(ix)
                dtype = xp.result_type(gd.dtype, x.dtype, *(() if have is None else (have.dtype,)))
                if ix not in owned or have.dtype != dtype:
                    buf = in_order_of(x.data, x.shape, lead=gd.shape[:gd.ndim - t.ndim],
                                      dtype=dtype)
                    if have is not None:
                        buf += have if not isinstance(have, Tensor) else have.data
                    cots[ix] = buf if quiet else Tensor(buf)
                    owned.add(ix)
                have = cots[ix]
                prim.accum(have if quiet else have.data, gt, t, x, **params)
                continue
            if fused is not None:
                gk = fused[k]
                if isinstance(gk, _SCALAR):  # as a Tensor would hold it
                    gk = backend_of(gk).asarray(gk)
                if not quiet:
                    gk = Tensor(gk)
            else:
                gk = prim.vjp(k, gt, t, *xs, **params)
            have = cots.get(ix)
            if ix in owned:
                buf = have if quiet else have.data
                if gk.shape == buf.shape and gk.dtype == buf.dtype:
                    backend_of(buf).add(buf, gk if not isinstance(gk, Tensor) else gk.data,
                                        out=buf)
                    continue
            # a new sum (NumPy's promotion and broadcasting), no longer ours to add into
            owned.discard(ix)
            cots[ix] = gk if have is None else _as_tensor_value(have) + _as_tensor_value(gk)
    if release:
        for t in order:
            if t.node is not None:
                t.node.inputs = None
    return result


_FREED = ("trying to backward through the graph a second time: its saved tensors were freed; "
          "pass retain_graph=True the first time")


def _requires_grad(t: Tensor) -> bool:
    return t.requires_grad


def push(root: Tensor, sources: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor | None:
    """Forward mode: push ``tangents`` of ``sources`` through the recorded ops to ``root``.

    Each tangent may carry the same leading batch axes; JVP rules keep them.
    Returns ``root``'s tangent, or ``None`` where it does not depend on the sources.
    """
    order = _reaching([root], sources)
    stop = set(map(id, sources))
    tan = dict(zip(map(id, sources), tangents))
    order = [t for t in order if id(t) not in stop]
    # Each tangent is dropped after its last use, so a long chain holds few at once.
    uses: dict = {}
    for t in order:
        for x in t.node.inputs:
            uses[id(x)] = uses.get(id(x), 0) + 1
    for t in order:
        node = t.node
        if (t.version != node.out_version or t.data.dtype.kind == "c"
                or tuple(map(_VERSION, node.inputs)) != node.versions):
            node.check(t)  # raises: the common case passes above without a call
        prim, xs = node.prim, node.inputs
        total = None
        for k, x in enumerate(xs):
            uses[id(x)] -= 1
            tk = tan.get(id(x)) if uses[id(x)] or x is root else tan.pop(id(x), None)
            if tk is None:
                continue
            c = prim.jvp(k, tk, t, *xs, **node.params)
            total = c if total is None else total + c
        tan[id(t)] = total
    return tan.get(id(root))
