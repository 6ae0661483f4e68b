"""Tracing a function into a straight list of equations.

While :func:`trace` runs ``f`` once, every input's array is a :class:`Traced`:
a stand-in that holds the value and the *slot* that computes it. Two kinds of
work are recorded as equations:

* every primitive applied through :func:`einsumgrad.tensor.bind` (the tape's
  one recording hook), run on the real arrays;
* the array-level work the rules do beside the primitives (a ReLU's mask, a
  clip's comparison, GELU's CDF, a max's ties): NumPy's ufuncs, functions,
  methods and indexing on a :class:`Traced`, and calls into a backend's
  namespace (``backend_of(x).exp``, ``.asarray``, MKL's or numba's kernels).

So a value that depends on the inputs is always computed by the program,
never baked in from the trace. Arrays that depend on no input (weights a
closure holds, ``eye`` bases, ``zeros``) are the program's constants, taken
at first use, as read-only copies (an op that would write into one at replay
writes into none at trace time either).

A value leaving for Python (``bool``, ``float``, ``int``, ``.item()``) is a
branch the program cannot take for every input. In the user's code it raises
:class:`TraceError` naming the line; inside einsumgrad's own rules (a skip
when no entry is NaN, a tie check) the value is recorded as a *guard*, checked
on every run: a program whose guard fails is traced again by ``jit``.

A trace over a long batch may compute each step on a few of its rows only
(``Recorder(rows=...)``, see ``chunk.RowTrace``): the program and every shape
the function sees are the batch's, each step's value a block of it, for as
long as every step is proved to keep rows apart; the first that is not, or a
value of the batch leaving for Python, raises :class:`Unproved` and the trace
starts again on the whole batch.
"""
from __future__ import annotations

import math
import operator
import os
import sys
import threading
from typing import Any, Callable

import numpy

from ..backends import Backend, backend_of, is_backend_array, register_backend
from ..backends import base as _backend_base
from ..tensor import Tensor, state

_tape = sys.modules[Tensor.__module__]  # the module (einsumgrad.tensor is also a function)


class TraceError(RuntimeError):
    """A program trace met something it cannot record: a branch on a traced
    value, a traced value leaving for NumPy or Python, or an array the program
    does not follow written with one it does."""


class Unproved(BaseException):
    """A trace on a block of rows met a step not known to keep rows apart: trace
    the whole batch instead. A BaseException: ``except Exception`` in the traced
    function lets it through."""


FLAGS = ("any", "all")
"""A flag over every entry of a batched value (``any()``, ``all()``, or a comparison
of its largest or smallest entry with a number): what a trace on a block of rows
(see :class:`~einsumgrad.program.chunk.RowTrace`) may branch on alone, where the
block's flag speaks for the batch or the replay checks it."""
ACROSS = FLAGS + ("max", "min")
"""Values over every entry of a batched value: the flags, and its largest and
smallest entries (which only a comparison with a number may read)."""


MIXED = "mixed"
"""A step's batch axis on a block trace where its result mixes the batch's rows (a
loss summed over the batch): recorded, its value not computed, an error only
where a later step, a guard or the outputs read it (a gradient's never does)."""


class _Whole(dict):
    """The values a trace on a block computed whole, and on first read those its steps
    would compute whole from them alone (an array made of the batch's shape, and
    steps on it): what constant folding reads, as it reads a whole trace's."""

    def __init__(self, values: dict, rec: "Recorder"):
        super().__init__(values)
        self.rec, self.made = rec, {}
        self.producers = {o: eq for eq in rec.eqs for o in eq.outs}

    def __contains__(self, slot) -> bool:
        if dict.__contains__(self, slot):
            return True
        if slot not in self.made:  # a step of one result, from values made whole alone
            eq = self.producers.get(slot)
            self.made[slot] = eq is not None and len(eq.outs) == 1 and not eq.writes \
                and not eq.seq and eq.op[0] not in ("guard", "fused") \
                and slot not in self.rec.across and all(s in self for s in eq.refs())
        return self.made[slot]

    def __missing__(self, slot):
        if slot not in self:
            raise KeyError(slot)
        eq = self.producers[slot]
        args, kwargs = _filled(eq.args, self), _filled(eq.kwargs, self)
        value = self.rec.run(eq.fn, args, kwargs)
        value = self[slot] = numpy.asarray(value) if eq.scalar else value
        return value


def _filled(template, values):
    """``template`` with each Ref replaced by its slot's value."""
    if type(template) is Ref:
        return values[template.slot]
    if type(template) in (tuple, list):
        return type(template)(_filled(t, values) for t in template)
    if type(template) is dict:
        return {k: _filled(v, values) for k, v in template.items()}
    return template


class GuardFailed(Exception):
    """A value a program was traced on (a rule's branch) differs for these inputs."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


class Ref:
    """A slot of a program in an equation's arguments."""

    __slots__ = ("slot",)

    def __init__(self, slot: int):
        self.slot = slot

    def __reduce__(self):
        return Ref, (self.slot,)

    def __repr__(self) -> str:
        return f"Ref({self.slot})"


class Eq:
    """One recorded step: ``outs = op(*args, **kwargs)``.

    Attributes:
        op: what runs: ``("prim", name)``, ``("ufunc", ufunc, method)``,
            ``("function", func)``, ``("method", name)``, ``("attr", name)``,
            ``("getitem",)``, ``("setitem",)``, ``("backend", backend, attr)``,
            ``("guard", kind)`` (a value the trace specialized on), or
            ``("fused", source, names)`` (element-wise steps as one kernel).
        fn: the callable (a primitive's impl; rebuilt from ``op`` on unpickling).
        args, kwargs: the arguments, :class:`Ref` where a slot goes.
        outs: the slots of the result (several where it is a tuple).
        seq: the result is a sequence of arrays (one slot each).
        scalar: the result is a NumPy scalar, turned into a 0-d array.
        writes: slots the step writes into in place.
    """

    __slots__ = ("op", "fn", "args", "kwargs", "outs", "seq", "scalar", "writes", "prim",
                 "inner")

    def __init__(self, op: tuple, fn: Callable, args: tuple, kwargs: dict, outs: tuple,
                 seq: bool = False, scalar: bool = False, writes: tuple = (), prim=None,
                 inner: list | None = None):
        self.op, self.fn, self.args, self.kwargs, self.outs = op, fn, args, kwargs, outs
        self.seq, self.scalar, self.writes, self.prim = seq, scalar, writes, prim
        self.inner = inner  # a fused step: the steps it runs as one kernel

    def refs(self) -> list:
        """The slots this step reads, in order (``writes`` among them)."""
        return refs_in((self.args, self.kwargs))

    def __repr__(self) -> str:
        return f"Eq({self.op[:2]}, outs={self.outs})"


def refs_in(obj: Any) -> list:
    """The slots a template (arguments, parameters) reads, in order."""
    found: list = []
    _refs(obj, found)
    return found


def _refs(obj: Any, found: list) -> None:
    if type(obj) is Ref:
        found.append(obj.slot)
    elif type(obj) in (tuple, list):
        for o in obj:
            _refs(o, found)
    elif type(obj) is dict:
        for o in obj.values():
            _refs(o, found)


# -- the stand-in arrays --------------------------------------------------------------

class Traced:
    """A backend array a program trace follows: its value and the slot computing it.

    It answers what describes an array (shape, dtype, strides) from the value,
    and records everything that computes with it. What would turn it into
    NumPy or Python values raises :class:`TraceError` (or, inside einsumgrad's
    rules, records a guard).
    """

    __slots__ = ("value", "slot", "rec")
    __hash__ = None  # as ndarray's

    def __init__(self, value, slot: int, rec: "Recorder"):
        self.value, self.slot, self.rec = value, slot, rec

    # The program's shape, which a trace on a block of rows computes less of
    shape = property(lambda self: self.rec.avals[self.slot][0])
    dtype = property(lambda self: self.value.dtype)
    ndim = property(lambda self: self.value.ndim)
    size = property(lambda self: math.prod(self.shape))
    strides = property(lambda self: self.value.strides)
    flags = property(lambda self: self.value.flags)
    itemsize = property(lambda self: self.value.itemsize)
    nbytes = property(lambda self: self.size * self.value.itemsize)
    device = property(lambda self: getattr(self.value, "device", "cpu"))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<traced slot {self.slot}: {self.dtype}{list(self.shape)}>"

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return self.rec.call(("ufunc", ufunc, method), getattr(ufunc, method), inputs, kwargs,
                             protocol=True)

    def __array_function__(self, func, types, args, kwargs):
        return self.rec.call(("function", func), func, args, kwargs, protocol=True)

    def __getitem__(self, index):
        return self.rec.call(("getitem",), operator.getitem, (self, index), {})

    def __setitem__(self, index, value) -> None:
        self.rec.call(("setitem",), operator.setitem, (self, index, value), {})

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # values leaving the trace
    def item(self, *args):
        return self.rec.convert(self, "item", args)

    def __bool__(self) -> bool:
        return self.rec.convert(self, "bool")

    def __float__(self) -> float:
        return self.rec.convert(self, "float")

    def __int__(self) -> int:
        return self.rec.convert(self, "int")

    def __index__(self) -> int:
        return self.rec.convert(self, "index")

    def __complex__(self) -> complex:
        return self.rec.convert(self, "complex")

    def tolist(self):
        raise self.rec.error("tolist() of a value computed from the program's inputs")

    def __array__(self, dtype=None, copy=None):
        raise self.rec.error("a value computed from the program's inputs turned into a NumPy "
                             "array (numpy.asarray, or written into an array the program does "
                             "not follow)")

    def __dlpack__(self, *args, **kwargs):
        raise self.rec.error("__dlpack__ of a value computed from the program's inputs")

    def __contains__(self, v) -> bool:
        return bool(self.rec.call(("function", numpy.any), numpy.any, (self == v,), {}))


def _binary(ufunc, reflected: bool = False, inplace: bool = False):
    def op(self, other):
        if isinstance(other, Tensor):
            return NotImplemented  # Tensor's own operator decides
        if inplace:
            return ufunc(self, other, out=(self,))
        return ufunc(other, self) if reflected else ufunc(self, other)
    return op


for _name, _uf in (("add", numpy.add), ("sub", numpy.subtract), ("mul", numpy.multiply),
                   ("truediv", numpy.true_divide), ("floordiv", numpy.floor_divide),
                   ("mod", numpy.remainder), ("pow", numpy.power), ("matmul", numpy.matmul),
                   ("and", numpy.bitwise_and), ("or", numpy.bitwise_or),
                   ("xor", numpy.bitwise_xor), ("lshift", numpy.left_shift),
                   ("rshift", numpy.right_shift)):
    setattr(Traced, f"__{_name}__", _binary(_uf))
    setattr(Traced, f"__r{_name}__", _binary(_uf, reflected=True))
    setattr(Traced, f"__i{_name}__", _binary(_uf, inplace=True))
for _name, _uf in (("lt", numpy.less), ("le", numpy.less_equal), ("gt", numpy.greater),
                   ("ge", numpy.greater_equal), ("eq", numpy.equal), ("ne", numpy.not_equal)):
    setattr(Traced, f"__{_name}__", _binary(_uf))
Traced.__neg__ = lambda self: numpy.negative(self)
Traced.__pos__ = lambda self: numpy.positive(self)
Traced.__abs__ = lambda self: numpy.absolute(self)
Traced.__invert__ = lambda self: numpy.invert(self)

_callers: dict = {}


def method_caller(name: str) -> Callable:
    """``lambda a, *args, **kw: a.name(*args, **kw)``, one per name."""
    fn = _callers.get(name)
    if fn is None:
        def fn(a, *args, **kwargs):
            return getattr(a, name)(*args, **kwargs)
        fn.__name__ = fn.__qualname__ = name
        _callers[name] = fn
    return fn


def attr_getter(name: str) -> Callable:
    return operator.attrgetter(name)


METHODS = ("astype", "reshape", "transpose", "swapaxes", "copy", "ravel", "flatten", "squeeze",
           "sum", "prod", "mean", "max", "min", "any", "all", "argmax", "argmin", "cumsum",
           "cumprod", "clip", "round", "view", "repeat", "take", "nonzero", "conj", "dot",
           "std", "var", "fill", "sort", "argsort", "diagonal", "trace", "compress", "ptp")
IN_PLACE_METHODS = {"fill": 0, "sort": 0}
for _name in METHODS:
    def _m(self, *args, _name=_name, **kwargs):
        return self.rec.call(("method", _name), method_caller(_name), (self,) + args, kwargs)
    _m.__name__ = _name
    setattr(Traced, _name, _m)
for _name in ("T", "mT", "real", "imag"):
    setattr(Traced, _name, property(lambda self, _name=_name: self.rec.call(
        ("attr", _name), attr_getter(_name), (self,), {})))


_types: dict = {}  # backend -> its Traced subclass, registered with it


def traced_type(backend: Backend) -> type:
    """The Traced subclass for arrays of ``backend``: ``backend_of`` of one is that backend."""
    tp = _types.get(backend)
    if tp is None:
        tp = _types[backend] = type(f"Traced_{backend.name}", (Traced,), {"__slots__": ()})
        register_backend(tp, backend)
    return tp


# Functions whose result describes arrays (shapes, dtypes), not their values.
METADATA = frozenset(("shape", "ndim", "size", "result_type", "can_cast", "iscomplexobj",
                      "isrealobj", "may_share_memory", "shares_memory", "min_scalar_type",
                      "isfortran", "finfo", "iinfo", "dtype", "broadcast_shapes",
                      "attention_team"))  # the last: a kernel's choice, from shapes and layout
# New buffers: made by the program on each run (the code that asked for one may
# write into it); one that nothing writes into becomes a constant (passes.py).
CREATION = frozenset(("zeros", "ones", "empty", "full", "eye", "identity", "arange", "linspace",
                      "zeros_like", "ones_like", "empty_like", "full_like", "tri"))
# Functions (and backend extras) that write into an argument: its position.
IN_PLACE = {"copyto": 0, "put": 0, "place": 0, "putmask": 0, "fill_diagonal": 0,
            "add_at": 0, "matmul_add": 2}


# -- backends that see the trace -------------------------------------------------------

class _Following(Backend):
    """The class a backend wears during a trace: each function of its namespace
    records calls that get a :class:`Traced` (and passes the others through)."""

    def __getattribute__(self, name: str):
        return _follow(self, name, Backend.__getattribute__(self, name))

    def __getattr__(self, name: str):
        return _follow(self, name, Backend.__getattr__(self, name))


def _follow(backend: Backend, name: str, value: Any) -> Any:
    if name.startswith("_") or not callable(value) or isinstance(value, type):
        return value

    fresh = name in CREATION

    def call(*args, **kwargs):
        rec = state.program
        if rec is None or rec.busy or not (fresh or _has_traced(args, kwargs)):
            return value(*args, **kwargs)
        rec.devices[backend.name] = backend.device
        return rec.call(("backend", backend.name, name), value, args, kwargs)
    return call


def _has_traced(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Traced):
            return True
        if type(a) in (tuple, list) and any(isinstance(b, Traced) for b in a):
            return True
    return False


_swap_lock = threading.Lock()
_swapped: dict = {}  # backend -> its own class, while any trace runs
_depth = 0


class _BackendsFollow:
    """While any trace runs, every registered backend records calls given Traced
    arrays (other threads' calls pass through, as they hold none)."""

    def __enter__(self):
        global _depth
        with _swap_lock:
            if _depth == 0:
                for b in set(_backend_base._registry.values()):
                    if type(b) is Backend:
                        _swapped[b] = type(b)
                        b.__class__ = _Following
            _depth += 1

    def __exit__(self, *exc):
        global _depth
        with _swap_lock:
            _depth -= 1
            if _depth == 0:
                for b, cls in _swapped.items():
                    b.__class__ = cls
                _swapped.clear()


# -- where a value leaves the trace --------------------------------------------------

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_PASS_THROUGH = (os.path.dirname(os.path.abspath(__file__)) + os.sep, _PKG + "tensor.py",
                 _PKG + "numpy_api.py", os.path.dirname(numpy.__file__) + os.sep)


def _origin() -> tuple:
    """The innermost frame that is neither this package's plumbing nor NumPy's,
    and the name of the outermost plumbing function on the way (``__bool__``)."""
    f, via = sys._getframe(1), ""
    while f is not None and f.f_code.co_filename.startswith(_PASS_THROUGH):
        via = f.f_code.co_name
        f = f.f_back
    return f, via


def _where(frame) -> str:
    if frame is None:
        return "an unknown line"
    import linecache
    code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" + (f" `{code}`" if code else "")


# -- the recorder ---------------------------------------------------------------------

class Recorder:
    """What one trace has recorded: equations, constants, the shape of every slot."""

    def __init__(self, rows=None):
        self.eqs: list = []
        self.avals: dict = {}     # slot -> (shape, dtype)
        self.values: dict = {}    # slot -> its value in this trace (a block's, see rows)
        self.consts: dict = {}    # slot -> array (a read-only view)
        self._const_of: dict = {}  # id(array) -> slot
        self._keep: list = []     # arrays whose ids _const_of holds
        self.inputs: list = []
        self.devices: dict = {}   # backend name -> device, for each backend called
        self.n = 0
        self.busy = False  # inside a recorded step: what it calls is part of it
        # On a block of rows (chunk.RowTrace): each batched slot's batch axis; the
        # other slots' values are whole.
        self.rows, self.axes = rows, {}
        self.across: dict = {}  # slot -> one of ACROSS: a block's flag, max or min
        self.mixed: set = set()  # slots whose values mix the batch's rows: not computed
        self.guessed = False  # a guard on a block's flag stands for the batch's unchecked

    # slots
    def new(self, value, axis: int | None = None) -> int:
        """A slot for ``value``; ``axis``: its batch axis, ``value`` a block of rows."""
        slot = self.n
        self.n += 1
        shape = tuple(value.shape)
        if axis == MIXED:
            self.mixed.add(slot)  # value: a stand-in of its whole shape
        elif axis in ACROSS:
            self.across[slot] = axis
        elif axis is not None:
            shape = shape[:axis] + (self.rows.size,) + shape[axis + 1:]
            self.axes[slot] = axis
        self.avals[slot] = (shape, value.dtype)
        self.values[slot] = value  # what the trace computed: constant folding reads it
        return slot

    def input(self, value) -> Traced:
        axis = 0 if self.rows is not None and self.rows.batched(value) else None
        block = value if axis is None else value[:self.rows.rows].copy(order="K")  # its layout
        slot = self.new(block, axis)
        self.inputs.append(slot)
        return traced_type(backend_of(value))(block, slot, self)

    def whole(self) -> dict:
        """The values computed whole (on a block of rows, the unbatched ones, and an
        array made of the batch's shape, made whole when constant folding reads it)."""
        return _Whole({s: v for s, v in self.values.items()
                       if s not in self.axes and s not in self.across and s not in self.mixed},
                      self)

    def const(self, a) -> tuple:
        """A constant's slot and the read-only view of it the program keeps."""
        slot = self._const_of.get(id(a))
        if slot is None:
            ro = a
            if isinstance(a, numpy.ndarray) and a.flags.writeable:
                # The value at first use: a later change to ``a`` (an optimizer's step
                # on a closed-over weight) does not reach the program, and no step of
                # it can write into its constants. Read-only arrays (broadcast views,
                # a Jacobian's basis) are kept as they are, never expanded.
                ro = a.copy(order="K")
                ro.flags.writeable = False
            slot = self.new(a)
            self.consts[slot] = ro
            self._const_of[id(a)] = slot
            self._keep.append(a)
        return slot, self.consts[slot]

    def concrete(self, t: Tensor, what: str) -> None:
        """The tape's check before a Tensor's values leave for NumPy or Python:
        on a traced value in the user's code, a TraceError naming the line."""
        if isinstance(t.data, Traced):
            frame, _ = _origin()
            if frame is None or not frame.f_code.co_filename.startswith(_PKG):
                raise self.error(f"{what} of a value computed from the program's inputs")

    def error(self, what: str) -> TraceError:
        return TraceError(f"{what} at {_where(_origin()[0])}: a program runs the same steps for "
                          f"every input. Keep to einsumgrad ops (eg.where for a choice by "
                          f"value), or pass the value as a static argument (static_argnums)")

    # arguments
    def scan(self, obj: Any) -> tuple:
        """``(values, template)``: Traced (and constant arrays) as their values
        and as Refs, through tuples, lists and dicts."""
        if isinstance(obj, Traced):
            if obj.rec is not self:
                raise TraceError("a value traced by another program met this one's")
            return obj.value, Ref(obj.slot)
        tp = type(obj)
        if tp is tuple or tp is list:
            pairs = [self.scan(o) for o in obj]
            return tp(p[0] for p in pairs), tp(p[1] for p in pairs)
        if tp is dict:
            pairs = {k: self.scan(v) for k, v in obj.items()}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        if isinstance(obj, numpy.ndarray) or (hasattr(obj, "shape") and is_backend_array(obj)):
            slot, ro = self.const(obj)
            return ro, Ref(slot)
        return obj, obj

    # the two ways work is recorded
    def bind(self, prim, inputs: tuple, params: dict):
        """Run ``prim`` on the inputs' arrays, recording it where an input (or a
        parameter) is traced; what depends on no input stays a plain array."""
        datas = [t.data for t in inputs]
        if not any(isinstance(d, Traced) for d in datas) and not _deep_traced(params):
            return prim.impl(*datas, **params)
        vals, args = self.scan(tuple(datas))
        pvals, kwargs = self.scan(params)
        op, axis = ("prim", prim.name), None
        if self.rows is None:
            out = self.run(prim.impl, vals, pvals)
        else:
            out, axis = self.rows.step(self, Eq(op, prim.impl, args, kwargs, (), prim=prim),
                                        vals, pvals)
        if prim.name == "identity" and out is vals[0]:
            return datas[0]  # the same array: the same slot
        scalar = isinstance(out, numpy.generic)
        if scalar:
            out = numpy.asarray(out)
        writes = tuple(a.slot for a, v in zip(args, vals) if v is out and type(a) is Ref)
        slot = self.new(out, axis)
        self.eqs.append(Eq(op, prim.impl, args, kwargs, (slot,), scalar=scalar,
                           writes=writes, prim=prim))
        return traced_type(backend_of(out))(out, slot, self)

    def call(self, op: tuple, fn: Callable, args: tuple, kwargs: dict, protocol: bool = False):
        """Record an array-level call that gets a Traced; returns its result, Traced."""
        if protocol and _foreign(args, kwargs):
            return NotImplemented  # a Tensor among the operands: its protocol decides
        vals, targs = self.scan(args)
        kvals, tkw = self.scan(kwargs)
        name = _op_name(op)
        if name in METADATA:
            if self.rows is not None and name in ("shape", "ndim", "size"):
                vals, kvals = self.rows.stand_ins(self, targs, vals), \
                    self.rows.stand_ins(self, tkw, kvals)
            return fn(*vals, **kvals)
        writes = self._writes(op, name, targs, tkw)
        axis = None
        if self.rows is None:
            result = self.run(fn, vals, kvals)
        else:
            result, axis = self.rows.step(self, Eq(op, fn, targs, tkw, (), writes=writes),
                                          vals, kvals)
        if writes:
            # In place: the targets' arrays changed; the result, if any, is one of them.
            self.eqs.append(Eq(op, fn, targs, tkw, (), writes=writes))
            for a in (*args, *_outs(kwargs)):
                if isinstance(a, Traced) and result is a.value:
                    return a
            if result is None:
                return None
            slot = self.new(result, axis)
            self.eqs[-1].outs = (slot,)
            return traced_type(backend_of(result))(result, slot, self)
        if type(result) in (tuple, list) and result and all(is_array(r) for r in result):
            slots = tuple(self.new(r, axis) for r in result)
            self.eqs.append(Eq(op, fn, targs, tkw, slots, seq=True))
            return type(result)(traced_type(backend_of(r))(r, s, self)
                                for r, s in zip(result, slots))
        scalar = isinstance(result, (numpy.generic, bool, int, float, complex))
        if scalar:
            result = numpy.asarray(result)
        elif not is_array(result):
            return result  # a description (a dtype, a shape): no value of the inputs
        slot = self.new(result, axis)
        self.eqs.append(Eq(op, fn, targs, tkw, (slot,), scalar=scalar))
        return traced_type(backend_of(result))(result, slot, self)

    def run(self, fn: Callable, args, kwargs):
        """Run one recorded step; what it calls itself is not recorded."""
        busy, self.busy = self.busy, True
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy = busy

    def _writes(self, op: tuple, name: str, targs: tuple, tkw: dict) -> tuple:
        """The slots an in-place call writes; refuses arrays the trace does not follow."""
        targets = list(_outs(tkw))
        if op[0] == "setitem" or (op[0] == "ufunc" and op[2] == "at"):
            targets.append(targs[0])
        elif op[0] in ("method", "function", "backend") and name in (*IN_PLACE,
                                                                     *IN_PLACE_METHODS):
            at = IN_PLACE.get(name, IN_PLACE_METHODS.get(name))
            if at < len(targs):
                targets.append(targs[at])
        writes = []
        for t in targets:
            if type(t) is not Ref or t.slot in self.consts:
                raise self.error("a value computed from the program's inputs written into "
                                 "an array the program does not follow (create it from "
                                 "the inputs' backend, or use einsumgrad ops)")
            writes.append(t.slot)
        return tuple(writes)

    def convert(self, t: Traced, kind: str, args: tuple = ()):
        """A traced value leaving for Python: an error in the user's code, a guard in
        einsumgrad's (the program then holds only for inputs giving the same value)."""
        frame, via = _origin()
        if frame is None or not frame.f_code.co_filename.startswith(_PKG):
            raise self.error(f"{_WHAT.get(via, _WHAT.get(kind, kind))} a value computed "
                             f"from the program's inputs")
        if t.slot in self.axes or t.slot in self.mixed or (t.slot in self.across and (
                kind not in ("bool", "__bool__") or self.across[t.slot] not in FLAGS)):
            raise Unproved(f"a guard on a value of the batch at {_where(frame)}")
        value = CONVERT[kind](t.value, *args)
        if t.slot in self.across and value == (self.across[t.slot] == "all"):
            # none in the block (no NaN, say): taken for the batch, which a replay checks;
            # one in the block is one in the batch
            self.guessed = True
        self.eqs.append(Eq(("guard", kind), None, (Ref(t.slot),),
                           {"args": args, "expected": value, "where": _where(frame)}, ()))
        return value


_WHAT = {"bool": "a branch on", "__bool__": "a branch on", "item": "item() of",
         "float": "float() of", "__float__": "float() of", "int": "int() of",
         "__int__": "int() of", "index": "an index from", "complex": "complex() of",
         "numpy": "numpy() of", "tolist": "tolist() of"}
CONVERT = {"bool": bool, "float": float, "int": int, "index": operator.index,
            "complex": complex, "item": lambda a, *args: a.item(*args)}


def is_array(x) -> bool:
    return isinstance(x, numpy.ndarray) or (hasattr(x, "shape") and is_backend_array(x))


def _outs(kwargs: dict) -> tuple:
    out = kwargs.get("out")
    if out is None:
        return ()
    return tuple(out) if type(out) is tuple else (out,)


def _op_name(op: tuple) -> str:
    kind = op[0]
    if kind == "function":
        return op[1].__name__
    if kind == "backend":
        return op[2]
    if kind in ("method", "attr"):
        return op[1]
    return ""


def _foreign(args: tuple, kwargs: dict) -> bool:
    """A Tensor (or another protocol type) among the operands."""
    for a in (*args, *_outs(kwargs)):
        if isinstance(a, Tensor):
            return True
    return False


def _deep_traced(obj: Any) -> bool:
    if isinstance(obj, Traced):
        return True
    tp = type(obj)
    if tp is tuple or tp is list:
        return any(_deep_traced(o) for o in obj)
    if tp is dict:
        return any(_deep_traced(o) for o in obj.values())
    return False


class tracing:
    """The context of one trace: the recorder installed (the tape's bind hook),
    every op recorded as inside a transform, and the backends following."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.follow = _BackendsFollow()

    def __enter__(self):
        if state.program is not None:
            raise TraceError("make_program inside another trace: call the function itself "
                             "(jit inlines there)")
        self.saved = (state.grad, state.tracing)
        self.follow.__enter__()
        with _swap_lock:
            _tape.PROGRAMS += 1
        state.program, state.grad, state.tracing = self.rec, True, state.tracing + 1
        return self.rec

    def __exit__(self, *exc):
        state.program = None
        state.grad, state.tracing = self.saved
        with _swap_lock:
            _tape.PROGRAMS -= 1
        self.follow.__exit__(*exc)


def compact(c):
    """A constant broadcast along some axes (stride 0: a Jacobian's basis) as
    ``("broadcast", one slice, shape)``, so it pickles at the size of its data."""
    strides = getattr(c, "strides", None)
    if strides is None or 0 not in strides or c.size <= 1:
        return c
    one = c[tuple(slice(0, 1) if st == 0 else slice(None) for st in strides)]
    return ("broadcast", one.copy(), c.shape)


def expand(c):
    """The constant :func:`compact` packed: a read-only broadcast view."""
    if type(c) is tuple:
        _, one, shape = c
        return backend_of(one).broadcast_to(one, shape)
    return c


def assignment(expr: str, eq, var, asarray: str) -> list:
    """The source line binding an equation's result ``expr`` to its outputs' names
    (``var``: value id -> name); a 0-d result made an array by ``asarray``."""
    if eq.scalar:
        expr = f"{asarray}({expr})"
    if not eq.outs:
        return [expr]
    if eq.seq:
        return [", ".join(var[s] for s in eq.outs) + ", = " + expr]
    return [f"{var[eq.outs[0]]} = {expr}"]


def template_source(t: Any, var, leaf: Callable[[Any], str]) -> str:
    """Python source for an argument template: Refs as their variables (``var``:
    value id -> name), tuples, lists and dicts rebuilt, any other value by ``leaf``."""
    tp = type(t)
    if tp is Ref:
        return var[t.slot]
    if tp is tuple:
        return "(" + "".join(template_source(x, var, leaf) + ", " for x in t) + ")"
    if tp is list:
        return "[" + ", ".join(template_source(x, var, leaf) for x in t) + "]"
    if tp is dict:
        return "{" + ", ".join(f"{k!r}: {template_source(v, var, leaf)}"
                               for k, v in t.items()) + "}"
    return leaf(t)
