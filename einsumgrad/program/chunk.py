"""Chunked replay: a row-independent program run a cache-sized block of rows at a time.

A program over a large batch writes every intermediate as a full-batch array:
each step streams its operands from memory and its result back. When every
output row depends only on the same row of the batched inputs, ``eg.jit``
replays the program block by block along the batch axis instead: each block's
intermediates stay in the L2 cache, and each block's results are written into
output arrays allocated once for the whole batch.

Whether a program is row-independent is proved per equation (:func:`batch_axes`),
never assumed from shapes: each slot gets its batch axis, or ``None`` where it
does not depend on the batch (the same for every block). Only these steps pass:

- a primitive, by its own batch rule (the one ``batch_jacobian`` proves rows
  apart with): einsums whose batched operands share one batch label that the
  output keeps and no unbatched operand has; element-wise primitives (add_bias,
  GELU, ``where``: their array parameters broadcast as operands do, a result
  written into its batched operand in place); reductions, scans, softmax, layer
  norm and attention along other axes; an index, padding or join leaving the
  batch axis whole; casts and copies (:data:`BY_RULE`); a reshape keeping the
  batch axis an axis of its own; ``broadcast_to`` (a batched value keeps its axis,
  an unbatched one broadcast along one new axis of the batch's length is batched
  there: a Jacobian's basis);
- NumPy's element-wise ufuncs, called directly or by a rule through the backend
  (also writing into their operand with ``out=``), fused element-wise kernels,
  ``where``, ``erf``, ``normal_cdf``; the backend's reductions, transposes,
  ``moveaxis``, ``expand_dims``, ``repeat``, reshapes, basic indexing (reading,
  and ``x[index] = v``) and matrix products that keep the batch axis; its
  layer-norm kernel on rows that are the batch's; ``astype`` and same-size
  ``view`` (:data:`ARRAY_STEPS`);
- a new array (``zeros``, ``empty``, ...) with one axis of the batch's length,
  batched there (a buffer a block writes its rows into), else unbatched;
  ``as_strided`` over such a buffer whose rows are the batch's, each window
  within a row (a convolution's patches);
- a guard (a branch a rule took) on an unbatched value, or on ``any()`` /
  ``all()`` over a batched value, or a comparison of its largest or smallest
  entry with a number, where it expects none (no NaN, no tie in the batch: then
  none in each block, checked block by block).

Any other step (a guard on the batch's values, a reshape moving rows, an index
or a reduction along the batch, anything unknown) keeps the program on its
whole-batch replay.

A block runs a program derived from the traced one, not a trace at the block's
shape (a function may branch on its shape in Python): the same equations, the
batched slots' shapes cut to the block, each einsum planned again on the same
contraction path, batched constants cut to the block. Results equal the
whole-batch replay up to the rounding of BLAS at another size.

Blocks run one after another, or shared among a thread per core (NumPy's
ufuncs, BLAS and the fused kernels release the GIL), BLAS held at one thread
meanwhile (threadpoolctl; without it, programs replay whole): a block's
products are too small for a thread pool to pay, and a pool waiting on a core
another process holds stalls every product. Chunking changes how ``jit`` replays
(and how much a trace holds, below), never the program: a program's text,
source and pickle are the same with it or without.
It runs on NumPy's backend only, for programs whose batched slots total at least
:data:`MIN_BYTES` (:data:`SERIAL_MIN_BYTES` on one core), split in blocks of
about :data:`SERIAL_BLOCK_BYTES` of live intermediates in turn, or
:data:`BLOCK_BYTES` shared among threads; smaller ones replay whole. Whether
the blocks pay also depends on the machine (a product-bound program loses
BLAS's second thread): the first calls run the whole replay, the chunked one
and, on several cores, the chunked one on a thread per core in turns, and the
fastest stays, a slower one timed again now and then in case the machine
changed (:class:`Raced`); the whole replay only where its live intermediates fit
:data:`WHOLE_BYTES`.

The same proof, step by step as a trace runs, lets a trace over a long batch
compute each step on a block of rows only (:class:`RowTrace`): the program
is the batch's, its trace holds a block's intermediates, not the batch's.

``EINSUMGRAD_CHUNK=0`` turns chunking off (and traces on a block);
``EINSUMGRAD_CHUNK=<rows>`` fixes the rows per block (for tests and measurement;
the size heuristics are skipped).
"""
from __future__ import annotations

import concurrent.futures
import copy
import math
import os
import time
from typing import Callable

import numpy

from ..plan import AUTO, Plan
from ..rules.elementwise import elementwise_batch
from ..rules.shape import getitem_p
from .passes import ELEMENTWISE  # the result broadcasts the operands
from .passes import shape_only
from ..backends.threads import Timed, cores, one_thread, pool as thread_pool
from .graph import is_ufunc
from .trace import ACROSS, FLAGS, MIXED, Eq, Ref, Unproved, refs_in

CACHE_BYTES = 1 << 21
"""The per-core L2 cache the blocks are sized for."""
BLOCK_BYTES = 2 * CACHE_BYTES
"""Bytes of intermediates live at once that one block may hold where the blocks
are shared among a thread per core. Not all of them are read in every step (a
step's operands and result fit), and fewer rows spend more per row in Python."""
SERIAL_BLOCK_BYTES = CACHE_BYTES // 2
""":data:`BLOCK_BYTES` for the blocks in turn on one thread, each block's steps
then in that core's cache (measured at one core: seed 000 at B = 4096 ran
fastest in blocks of 512 rows, its live intermediates 0.6 MB; seed 002 at 10^5
points 108 ms against 139 in blocks for 4 MB; on two threads shared, those
small blocks lost to the larger ones)."""
MIN_ROWS = 64
"""Fewer rows per block spend more in Python per step than the cache saves."""
MIN_BYTES = 8 * CACHE_BYTES
"""Programs whose batched slots hold less than this in total (all of them, not the
live ones: they are allocated and freed through the same memory) run whole; a
larger one runs in two blocks at least. On several cores the race's trials of the
slower ways cost the smaller programs more than blocks save (each block loop
rests MKL's team, which the next product starts again)."""
SERIAL_MIN_BYTES = 2 * CACHE_BYTES
""":data:`MIN_BYTES` where the process has one core (seed 000 at B = 4096, 4.8 MB
in all: 0.80 ms in blocks against 0.87-0.95 whole)."""
WHOLE_BYTES = 256 << 20
"""The most bytes of intermediates live at once that the whole replay may hold to
enter the race: a larger program runs in blocks only, as the eager path keeps a
Jacobian's passes within ``transforms.JACOBIAN_MEMORY_BUDGET``."""


def enabled() -> bool:
    """Whether chunked replay is on (``EINSUMGRAD_CHUNK`` is not ``0``)."""
    return os.environ.get("EINSUMGRAD_CHUNK", "").strip() != "0"


def forced_rows() -> int | None:
    """The rows per block ``EINSUMGRAD_CHUNK`` fixes, if it holds a positive number."""
    v = os.environ.get("EINSUMGRAD_CHUNK", "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else None


# -- the proof: which slots carry the batch, on which axis --------------------------------

def batch_axes(p, size: int, inputs: dict) -> dict | None:
    """Each slot's batch axis (``None``: it does not depend on the batch), or ``None``
    where some output row may depend on another row of the batched inputs.

    Args:
        p: the program.
        size: the batch size (the batched slots' length on their batch axis).
        inputs: the batched input and constant slots and their batch axes; every
            other input and constant is unbatched.
    """
    axes: dict = {s: inputs.get(s) for s in (*p.inputs, *p.consts)}
    seen = Seen(p.eqs)
    for eq in p.eqs:
        out = _step_axis(eq, axes, p.avals, size, seen)
        if out is False:
            return None
        for o in eq.outs:
            if out in ACROSS:
                seen.across[o] = out
            else:
                axes[o] = out
    if any(type(o) is Ref and o.slot in seen.across for o in p.outputs):
        return None
    return axes


class Seen:
    """What the proof knows besides each slot's batch axis: the values over the whole
    batch (slot -> one of :data:`ACROSS`), which only a comparison or a guard may
    read, the steps so far (where a buffer came from) and, on a block trace, every
    slot's batch axis (a step's proof is given its operands' only)."""

    def __init__(self, eqs: list, across: dict | None = None, axes: dict | None = None):
        self.eqs, self.across, self.axes = eqs, {} if across is None else across, axes

    def producer(self, slot: int) -> Eq | None:
        for eq in reversed(self.eqs):
            if slot in eq.outs:
                return eq
        return None


def _step_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen | None = None):
    """The batch axis of the step's one result, ``None`` (unbatched), one of
    :data:`ACROSS` (a value over the whole batch: ``any()``, the largest entry, a
    flag from comparing it), or ``False``: the step is not known to keep rows apart."""
    seen = seen or Seen([])
    kind = eq.op[0]
    name = eq.op[1] if kind in ("prim", "method") else eq.op[2] if kind == "backend" else None
    if kind == "guard":
        return _guard_axis(eq, axes, seen.across)
    if kind in ("method", "backend") and name in OVER_ALL and len(eq.args) == 1 \
            and eq.kwargs.get("axis", None) is None and set(eq.kwargs) <= {"axis"}:
        x = eq.args[0]  # over every entry
        return False if type(x) is not Ref or x.slot not in axes else \
            None if axes[x.slot] is None else OVER_ALL[name]
    if kind == "ufunc" and any(type(a) is Ref and a.slot in seen.across for a in eq.args):
        return _compared(eq, seen.across)
    if kind == "setitem":
        return _setitem_axis(eq, axes, avals, size)
    if kind == "backend" and name == "layer_norm":  # a row kernel of two results
        return _layer_norm_axis(eq, axes, avals, size)
    if eq.seq or eq.scalar:
        return False
    if eq.writes and len(eq.outs) <= 1 and (
            (kind == "backend" and is_ufunc(name))
            or (kind == "ufunc" and eq.op[2] == "__call__" and _numpys(eq.op[1]))):
        return _in_place_axis(eq, axes, avals, size)
    if kind == "prim" and _elementwise(eq):
        # array parameters (where's condition, GELU's CDF) broadcast as operands do
        got = _broadcast_axis(eq, axes, avals, size, eq.outs[0], (*eq.args, *eq.kwargs.values()))
        if eq.writes and not all(axes.get(w) == got and avals[w][0] == avals[eq.outs[0]][0]
                                 for w in eq.writes):
            return False  # written in place (a bias added to its product): rows stay put
        return got
    if len(eq.outs) != 1 or eq.writes:
        return False
    if kind == "prim":
        return PRIM_STEPS.get(name, _rule_axis)(eq, axes, avals, size, seen)
    if kind in ("method", "backend") and name in ARRAY_STEPS:
        return ARRAY_STEPS[name](eq, axes, avals, size, seen)
    if kind == "fused":
        ok = not eq.kwargs
    elif kind == "ufunc":
        ok = eq.op[2] == "__call__" and not eq.kwargs and _numpys(eq.op[1])
    elif kind == "getitem":
        return _index_axis(eq, axes, avals)
    elif kind == "backend":
        # a rule's own call of the backend (relu's derivative): NumPy's element-wise
        # ufuncs, where, and the extras every backend has element-wise
        ok = (is_ufunc(name) or name in ("asarray", "where", "erf", "normal_cdf")) \
            and not eq.kwargs
    else:
        return False  # views, anything unknown
    return _broadcast_axis(eq, axes, avals, size, eq.outs[0]) if ok else False


OVER_ALL = {"any": "any", "all": "all", "max": "max", "min": "min", "amax": "max",
            "amin": "min"}
"""A method or backend reduction over every entry (no axis): a value over the batch."""


def _einsum_step(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    if set(eq.kwargs) - {"spec", "run", "order"}:
        return False
    return _einsum_axis(eq, axes, avals, size)


def _reshape_step(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    if _target(eq) is not None:
        return _reshape_axis(eq, axes, avals, size)
    x = eq.args[0]  # the method's other spelling (dims one by one): of an unbatched value
    return None if eq.op[0] == "method" and type(x) is Ref and axes.get(x.slot, False) is None \
        and not eq.kwargs and len(eq.refs()) == 1 else False


def _view_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    """``x.view(dtype)``: the same bytes as another dtype of one size (a mask counted
    as bytes)."""
    x, dt = (eq.args + (None, None))[:2]
    ok = eq.op[0] == "method" and type(x) is Ref and x.slot in axes and len(eq.args) == 2 \
        and not eq.kwargs and isinstance(dt, (type, numpy.dtype)) \
        and numpy.dtype(dt).itemsize == numpy.dtype(avals[x.slot][1]).itemsize
    return axes[x.slot] if ok else False


def _astype_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    x = eq.args[0]
    ok = eq.op[0] == "method" and set(eq.kwargs) <= {"copy"} and len(eq.args) == 2 \
        and type(eq.args[1]) is not Ref and type(x) is Ref
    return axes.get(x.slot, False) if ok else False


def _eye_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    # an array from static values (a Jacobian's basis): the same in every block
    return None if eq.op[0] == "backend" and not eq.refs() and set(eq.kwargs) <= {"dtype"} \
        else False


def _repeat_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    """``repeat(x, n, axis)`` along another axis (max's mask lined up with its input)."""
    x, along = eq.args[0], eq.kwargs.get("axis")
    if type(x) is not Ref or x.slot not in axes or len(eq.args) != 2 \
            or type(eq.args[1]) is not int or set(eq.kwargs) != {"axis"} or type(along) is not int:
        return False
    ax = axes[x.slot]
    return ax if ax is None or along % len(avals[x.slot][0]) != ax else False


def _guard_axis(eq: Eq, axes: dict, across: dict):
    """A guard (a value a rule branched on, no result): on an unbatched value, the same
    in every block; on a flag over the batch where it expects none (``any``: False,
    ``all``: True), as every block's is then, checked block by block."""
    x = eq.args[0]
    if type(x) is not Ref:
        return False
    if axes.get(x.slot, False) is None:
        return None
    flag = across.get(x.slot)
    expected = eq.kwargs.get("expected")
    return None if flag in FLAGS and eq.op[1] in ("bool", "__bool__") \
        and type(expected) is bool and expected == (flag == "all") else False


CREATE = frozenset(("zeros", "empty", "ones", "full"))
"""The backend's functions making an array of a shape they are given."""


def _shape_at(eq: Eq):
    """Where a step names the shape it gives: ``("arg", i)``, ``("kw", name)``, or None
    (a reshape's or broadcast's target, a new array's shape, a strided view's)."""
    op = eq.op
    if (op[0] == "backend" and op[2] in ("broadcast_to", "reshape")) \
            or op == ("method", "reshape"):
        return ("arg", 1) if len(eq.args) == 2 and not eq.kwargs else None
    if op in (("prim", "broadcast_to"), ("prim", "reshape")):
        return ("kw", "shape") if len(eq.args) == 1 and set(eq.kwargs) == {"shape"} else None
    if op == ("prim", "scatter_add"):  # an index's VJP: its cotangent into zeros of a shape
        return ("kw", "shape") if len(eq.args) == 1 and "shape" in eq.kwargs else None
    if op[0] == "backend" and op[2] in CREATE:
        return ("arg", 0) if 1 <= len(eq.args) <= (2 if op[2] == "full" else 1) \
            and set(eq.kwargs) <= {"dtype"} else None
    if op[0] == "backend" and op[2] == "as_strided":
        return ("kw", "shape") if len(eq.args) == 1 and set(eq.kwargs) == {"shape", "strides"} \
            else None
    return None


def _target(eq: Eq):
    """The shape a step names (see :func:`_shape_at`), or None."""
    at = _shape_at(eq)
    if at is None:
        return None
    shape = eq.args[at[1]] if at[0] == "arg" else eq.kwargs[at[1]]
    shape = (shape,) if type(shape) is int else shape  # zeros(n)
    return shape if type(shape) is tuple and all(type(n) is int for n in shape) else None


def _retargeted(eq: Eq, shape: tuple) -> Eq:
    """The step naming ``shape`` instead (see :func:`_shape_at`)."""
    where, key = _shape_at(eq)
    args, kwargs = eq.args, eq.kwargs
    if where == "arg":
        args = args[:key] + (shape,) + args[key + 1:]
    else:
        kwargs = {**kwargs, key: shape}
    return Eq(eq.op, eq.fn, args, kwargs, eq.outs, eq.seq, eq.scalar, eq.writes, eq.prim,
              eq.inner)


def _made_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen | None = None):
    """A new array of a static shape: batched along its one axis of the batch's length
    (the same values in every row: a buffer a block writes its rows into, a Jacobian's
    basis), else unbatched."""
    shape = _target(eq)
    if shape is None or any(type(a) is Ref for a in eq.args):
        return False
    on = [i for i, n in enumerate(shape) if n == size]
    return on[0] if len(on) == 1 else None


def _strided_axis(eq: Eq, axes: dict, avals: dict, size: int, seen: Seen):
    """``as_strided(x, shape, strides)`` over a new C-ordered buffer whose rows are the
    batch's (its axis 0, as a block's are; ``x`` may be a transpose of it): batched
    where one axis of the view steps a row at a time and the others stay within a
    row (a convolution's patches)."""
    x, shape, strides = eq.args[0], _target(eq), eq.kwargs.get("strides")
    if type(x) is not Ref or x.slot not in axes or shape is None or type(strides) is not tuple \
            or len(strides) != len(shape) or not all(type(n) is int and n >= 0 for n in strides):
        return False
    if axes[x.slot] is None:
        return None
    xshape, dtype = avals[x.slot]
    if not _fresh(x.slot, axes, seen):
        return False
    row = numpy.dtype(dtype).itemsize * math.prod(xshape) // size
    on = [i for i, (n, st) in enumerate(zip(shape, strides)) if n == size and st == row]
    if len(on) != 1:
        return False
    reach = sum((n - 1) * st for i, (n, st) in enumerate(zip(shape, strides)) if i != on[0])
    return on[0] if reach < row else False


def _fresh(slot: int, axes: dict, seen: Seen) -> bool:
    """Whether ``slot`` holds a new C-ordered array batched along its axis 0, or a
    transpose of one: a block's then is laid out as the batch's, a row less or more."""
    eq = seen.producer(slot)
    while eq is not None and eq.op[:1] == ("backend",) and eq.op[2] == "transpose" \
            and len(eq.args) == 2 and type(eq.args[0]) is Ref:
        eq = seen.producer(eq.args[0].slot)
    return eq is not None and eq.op[0] == "backend" and eq.op[2] in CREATE \
        and _shape_at(eq) is not None and (seen.axes or axes).get(eq.outs[0]) == 0


def _setitem_axis(eq: Eq, axes: dict, avals: dict, size: int):
    """``x[index] = v``, a basic index: ``v`` lines up with the batch axis of the region
    it is written to (or is unbatched and broadcast there), the batch taken whole."""
    if len(eq.args) != 3 or eq.kwargs or eq.writes != (getattr(eq.args[0], "slot", None),):
        return False
    x, index, v = eq.args
    if x.slot not in axes or (type(v) is Ref and v.slot not in axes):
        return False
    ax = axes[x.slot]
    vax = axes[v.slot] if type(v) is Ref else None
    if ax is None:
        return None if vax is None else False
    shape = _indexed_shape(avals[x.slot][0], index)
    region = _index_axis(Eq(("getitem",), None, (x, index), {}, (_PENDING,)), axes,
                         {**avals, _PENDING: (shape, None)})
    if type(region) is not int:
        return False
    if vax is None:
        vshape = avals[v.slot][0] if type(v) is Ref else numpy.shape(v)
        i = len(vshape) - len(shape) + region
        return ax if i < 0 or vshape[i] == 1 else False
    return ax if len(shape) - len(avals[v.slot][0]) + vax == region else False


def _indexed_shape(shape: tuple, index) -> tuple:
    """The shape of ``x[index]`` for an array of ``shape`` (a basic index), read off a
    view of one element broadcast to it."""
    return numpy.broadcast_to(numpy.empty((), numpy.bool_), shape)[index].shape


def _moveaxis_axis(eq: Eq, axes: dict, avals: dict, *_):
    """``moveaxis(x, source, destination)``: the batch axis where NumPy's order puts it."""
    if len(eq.args) != 3 or eq.kwargs or type(eq.args[0]) is not Ref \
            or eq.args[0].slot not in axes:
        return False
    x, src, dst = eq.args
    ax = axes[x.slot]
    if ax is None:
        return None
    n = len(avals[x.slot][0])
    src, dst = ((a,) if type(a) is int else a for a in (src, dst))
    if type(src) not in (tuple, list) or type(dst) not in (tuple, list) or len(src) != len(dst):
        return False
    src, dst = [a % n for a in src], [a % n for a in dst]
    order = [a for a in range(n) if a not in src]
    for d, s_ in sorted(zip(dst, src)):
        order.insert(d, s_)
    return order.index(ax)


def _compared(eq: Eq, across: dict):
    """A comparison of the batch's largest (smallest) entry with a number: a flag,
    ``any`` where it holds for the batch once it holds for one block, else ``all``."""
    if eq.op[2] != "__call__" or eq.kwargs or len(eq.args) != 2:
        return False
    names = {numpy.greater: ">", numpy.greater_equal: ">", numpy.less: "<", numpy.less_equal: "<"}
    side = names.get(eq.op[1])
    a, b = eq.args
    if type(b) is Ref:  # the number first: c < max is max > c
        a, b, side = b, a, {">": "<", "<": ">"}.get(side)
    if side is None or type(a) is not Ref or type(b) not in (int, float) \
            or across.get(a.slot) not in ("max", "min"):
        return False
    return "any" if (side == ">") == (across[a.slot] == "max") else "all"


def _broadcast_to_axis(eq: Eq, axes: dict, avals: dict, size: int, *_):
    """``broadcast_to(x, shape)``: a batched ``x`` keeps its batch axis (aligned at the
    end); an unbatched one broadcast along exactly one new axis of the batch's length
    is uniform along it, batched there (a block takes that axis cut to its rows, see
    :func:`block_program`); otherwise it stays unbatched and whole."""
    shape = _target(eq)
    if shape is None or type(eq.args[0]) is not Ref or eq.args[0].slot not in axes:
        return False
    x = avals[eq.args[0].slot][0]
    lead = len(shape) - len(x)
    ax = axes[eq.args[0].slot]
    if ax is not None:
        return lead + ax if x[ax] == size and shape[lead + ax] == size else False
    new = [i for i, n in enumerate(shape) if n == size and (i < lead or x[i - lead] == 1)]
    return new[0] if len(new) == 1 else None


def _elementwise(eq: Eq) -> bool:
    """An element-wise primitive (its batch rule the element-wise one: add_bias, GELU,
    any defined so through ``einsumgrad.extend``), its parameters arrays if any."""
    return (eq.op[1] in ELEMENTWISE
            or (eq.prim is not None and eq.prim.batch is elementwise_batch)) \
        and len(eq.outs) == 1 and all(type(v) is Ref for v in eq.kwargs.values())


BY_RULE = frozenset(("identity", "copy", "astype", "getitem", "scatter_add", "concatenate",
                     "pad", "max", "spread", "var", "prod", "scan", "cumsum", "softmax",
                     "log_softmax", "normalize", "inv_std", "layer_norm", "batch_norm",
                     "attention", "patch_einsum", "unpatch_einsum", "patches", "unpatch"))
"""Primitives whose own batch rule (the one ``batch_jacobian`` proves rows apart with)
gives the step's batch axis: a reduction, scan or softmax along other axes, an index
or padding leaving the batch axis whole, a join along another axis, a layer norm, a
convolution's products with its patches."""


def _rule_axis(eq: Eq, axes: dict, avals: dict, size: int, *_):
    """A primitive of :data:`BY_RULE`: its batch rule's axis for the operands' batch
    axes, where every array it reads whole (unbatched) has no axis of the batch's
    length (a block reads it whole), each batched array parameter lines up with the
    result (a mask or statistics of the same rows), and no other parameter holds the
    batch's length (a shape, which a block would need cut)."""
    prim, out = eq.prim, eq.outs[0]
    if prim is None or prim.batch is None or eq.op[1] not in BY_RULE \
            or not all(type(a) is Ref and a.slot in axes for a in eq.args):
        return False
    arrays = refs_in(eq.kwargs)
    named = {k: v for k, v in eq.kwargs.items() if k != "shape" or _shape_at(eq) is None}
    if any(s not in axes for s in arrays) or _holds(named, size):
        return False  # a shape of the batch's length other than one a block retargets
    bdims = [axes[a.slot] for a in eq.args]
    if all(b is None for b in bdims):
        return None if all(axes[s] is None for s in arrays) else False
    try:
        got = prim.batch(bdims, [avals[a.slot][0] for a in eq.args], avals[out][0], **eq.kwargs)
    except Exception:  # BatchMixingError: rows mix
        return False
    shape = avals[out][0]
    if type(got) is not int or not 0 <= got < len(shape) or shape[got] != size:
        return False
    for s in [a.slot for a in eq.args] + arrays:
        sh, ax = avals[s][0], axes[s]
        if ax is None and size in sh:
            return False  # read whole by a block: along the rows, its length is the batch's
        if s in arrays and ax is not None and ax != got and len(sh) - ax != len(shape) - got:
            return False  # an array parameter's rows elsewhere than the result's
    return got


def _holds(obj, size: int) -> bool:
    """Whether a parameter holds the integer ``size`` (a shape's length), or an array
    with an axis of that length."""
    if type(obj) is int:
        return obj == size
    if type(obj) in (tuple, list):
        return any(_holds(v, size) for v in obj)
    if type(obj) is dict:
        return any(_holds(v, size) for v in obj.values())
    return isinstance(obj, numpy.ndarray) and size in obj.shape


def _layer_norm_axis(eq: Eq, axes: dict, avals: dict, size: int):
    """The backend's layer-norm kernel ``(x, n, eps[, weight, bias])``: each row of ``n``
    entries on its own, its results (``x``'s shape, and one entry per row) batched
    along axis 0 where ``x``'s rows are the batch's (its other axes all normalized)."""
    x, rest = eq.args[0], eq.args[1:]
    if type(x) is not Ref or x.slot not in axes or eq.kwargs or len(rest) not in (2, 4) \
            or type(rest[0]) is not int or type(rest[1]) is not float:
        return False
    ax, shape = axes[x.slot], avals[x.slot][0]
    params = [a for a in rest[2:] if type(a) is Ref]
    if len(params) != len(rest) - 2 or any(axes.get(a.slot, False) is not None
                                           or size in avals[a.slot][0] for a in params):
        return False
    if ax is None:
        return None
    return 0 if ax == 0 and shape[0] == size and math.prod(shape[1:]) == rest[0] else False


REDUCING = frozenset(("max", "min", "amax", "amin", "sum", "mean", "prod", "any", "all"))
"""The backend's reductions a rule calls (logsumexp's maximum): rows apart over other axes."""


def _reducing_axis(eq: Eq, axes: dict, avals: dict, *_):
    """``xp.max(x, axis=..., keepdims=...)`` over axes that are not the batch's."""
    x, axis = (eq.args + (None,))[0], eq.kwargs.get("axis")
    if len(eq.args) != 1 or set(eq.kwargs) - {"axis", "keepdims"} or type(x) is not Ref \
            or x.slot not in axes or type(eq.kwargs.get("keepdims", False)) is not bool:
        return False
    ax, ndim = axes[x.slot], len(avals[x.slot][0])
    if ax is None:
        return None
    if type(axis) is int:
        axis = (axis,)
    if type(axis) is not tuple or not all(type(a) is int for a in axis):
        return False  # None: over every axis, the batch's among them
    gone = {a % ndim for a in axis}
    if ax in gone:
        return False
    return ax if eq.kwargs.get("keepdims") else ax - sum(1 for a in gone if a < ax)


def _transpose_axis(eq: Eq, axes: dict, *_):
    """``transpose(x, order)``: the batch axis goes where ``order`` puts it."""
    x, order = (eq.args + (None, None))[:2]
    if type(x) is not Ref or x.slot not in axes or len(eq.args) != 2 or eq.kwargs \
            or type(order) not in (tuple, list) or not all(type(a) is int for a in order):
        return False
    ax = axes[x.slot]
    return None if ax is None else order.index(ax) if ax in order else False


def _matmul_axis(eq: Eq, axes: dict, avals: dict, size: int, *_):
    """``matmul(a, b)`` where one side is an unbatched matrix (or vector) and the other's
    batch axis is one it keeps: a row of ``a``, a stack axis, or a column of ``b``."""
    if len(eq.args) != 2 or eq.kwargs or not all(type(v) is Ref and v.slot in axes
                                                  for v in eq.args):
        return False
    (a, b), out = (axes[v.slot] for v in eq.args), avals[eq.outs[0]][0]
    sa, sb = (avals[v.slot][0] for v in eq.args)
    if a is None and b is None:
        return None
    if a is not None and b is None and len(sb) <= 2 and size not in sb and a < len(sa) - 1:
        return a  # out is a's shape without its last axis, then b's columns
    if b is not None and a is None and len(sa) == 2 and size not in sa and b != len(sb) - 2 \
            and len(sb) >= 2:
        return b  # out has b's axes, its rows a's
    return False


def _index_axis(eq: Eq, axes: dict, avals: dict):
    """``x[index]`` with a basic index (slices, integers, None, ``...``): the batch
    axis where the getitem primitive's batch rule puts it (taken whole, or else False)."""
    x, index = (eq.args + (None, None))[:2]
    items = index if type(index) is tuple else (index,)
    if type(x) is not Ref or x.slot not in axes or len(eq.args) != 2 or eq.kwargs or not all(
            type(e) in (slice, int) or e is None or e is Ellipsis for e in items):
        return False
    ax = axes[x.slot]
    if ax is None:
        return None
    try:
        return getitem_p.batch([ax], [avals[x.slot][0]], avals[eq.outs[0]][0], index=index, nb=0)
    except Exception:  # BatchMixingError: it selects along the batch axis
        return False


def _expand_dims_axis(eq: Eq, axes: dict, avals: dict, *_):
    """``expand_dims(x, axis)``: the batch axis among ``x``'s, new ones around it."""
    x, axis = (eq.args + (None, None))[:2]
    if type(axis) is int:
        axis = (axis,)
    if type(x) is not Ref or x.slot not in axes or len(eq.args) != 2 or eq.kwargs \
            or type(axis) is not tuple or not all(type(a) is int for a in axis):
        return False
    ax = axes[x.slot]
    if ax is None:
        return None
    n = len(avals[x.slot][0]) + len(axis)
    new = {a % n for a in axis}
    return [i for i in range(n) if i not in new][ax]


def _reshape_axis(eq: Eq, axes: dict, avals: dict, size: int, *_):
    """``reshape(x, shape)`` (C order): a batched ``x``'s batch axis stays an axis of its
    own, the axes before it reshaped among themselves and those after among
    themselves (a Hessian's tangents given a new axis of length 1)."""
    x = eq.args[0]
    if _target(eq) is None or type(x) is not Ref or x.slot not in axes:
        return False
    ax = axes[x.slot]
    if ax is None:
        return None
    before, out = math.prod(avals[x.slot][0][:ax]), avals[eq.outs[0]][0]
    for j, n in enumerate(out):
        if n == size and math.prod(out[:j]) == before:
            return j
    return False


def _numpys(u) -> bool:
    """Whether ``u`` is one of NumPy's element-wise ufuncs of one result."""
    return is_ufunc(u.__name__) and getattr(numpy, u.__name__) is u


def _in_place_axis(eq: Eq, axes: dict, avals: dict, size: int):
    """``ufunc(..., out=s)`` writing into ``s`` (and returning it, on some backends): the
    values written must keep ``s``'s rows where they were (the axis stays ``s``'s)."""
    out = eq.kwargs.get("out")
    if type(out) is tuple and len(out) == 1:
        out = out[0]
    if set(eq.kwargs) != {"out"} or type(out) is not Ref or eq.writes != (out.slot,) \
            or out.slot not in axes:
        return False
    got = _broadcast_axis(eq, axes, avals, size, out.slot)
    return got if got is not False and got == axes[out.slot] else False


def _einsum_axis(eq: Eq, axes: dict, avals: dict, size: int):
    spec = eq.kwargs["spec"]
    if not all(type(a) is Ref and a.slot in axes for a in eq.args):
        return False
    labels = set()
    for a, term in zip(eq.args, spec.inputs):
        ax = axes[a.slot]
        if ax is not None:
            labels.add(term[ax])
    if not labels:
        return None
    if len(labels) != 1:
        return False  # the rows of one operand meet another index of another
    label = labels.pop()
    for a, term in zip(eq.args, spec.inputs):
        ax = axes[a.slot]
        # an unbatched operand indexed by the batch label, or the label on a second
        # axis of a batched one (a diagonal), pairs rows with something else
        if any(l == label and i != ax for i, l in enumerate(term)):
            return False
    if spec.output.count(label) != 1:
        return False  # summed over the batch, or spread onto two axes
    out = spec.output.index(label)
    return out if avals[eq.outs[0]][0][out] == size else False


def _broadcast_axis(eq: Eq, axes: dict, avals: dict, size: int, result: int,
                    operands: tuple | None = None):
    """NumPy broadcasting of the operands (the step's arguments unless given) onto
    ``result``'s shape: they align at their last axes."""
    shape = avals[result][0]
    found, unbatched = set(), []
    for a in eq.args if operands is None else operands:
        if type(a) is Ref:
            if a.slot not in axes:
                return False
            sh = avals[a.slot][0]
            ax = axes[a.slot]
            if ax is None:
                unbatched.append(sh)
            else:
                found.add(len(shape) - len(sh) + ax)
        elif not isinstance(a, (bool, int, float, complex, numpy.generic)):
            return False
    if not found:
        return None
    if len(found) != 1:
        return False  # two batch axes meet as an outer product
    out = found.pop()
    if shape[out] != size:
        return False
    for sh in unbatched:  # broadcast along the batch: only a length-1 axis there, or none
        i = len(sh) - len(shape) + out
        if i >= 0 and sh[i] != 1:
            return False
    return out


PRIM_STEPS = {"einsum": _einsum_step, "reshape": _reshape_axis,
              "broadcast_to": _broadcast_to_axis}
"""The proof of a primitive's step: these, else its own batch rule (:func:`_rule_axis`)."""

ARRAY_STEPS = {
    **dict.fromkeys(CREATE, _made_axis), "eye": _eye_axis, "as_strided": _strided_axis,
    "broadcast_to": _broadcast_to_axis, "reshape": _reshape_step, "transpose": _transpose_axis,
    "moveaxis": _moveaxis_axis, "expand_dims": _expand_dims_axis, "repeat": _repeat_axis,
    "matmul": _matmul_axis, **dict.fromkeys(REDUCING, _reducing_axis), "view": _view_axis,
    "astype": _astype_axis,
}
"""The proof of a call of the backend or of an array's method, by name: the array
calls rules make (a convolution's patches, max's mask, a layer norm's statistics)."""


def resized(shape: tuple, axis: int | None, n: int) -> tuple:
    """``shape`` with ``n`` on the batch ``axis`` (as it is where None)."""
    return shape if axis is None else shape[:axis] + (n,) + shape[axis + 1:]


def rows_along(axis: int, start: int, stop: int) -> tuple:
    """The index of rows ``start:stop`` of the batch along ``axis``."""
    return (slice(None),) * axis + (slice(start, stop),)


def batching(p) -> tuple | None:
    """``(size, axes, constants)`` for a program whose outputs are row-independent along
    axis 0 of its inputs of the batch size (the largest leading length tried first),
    or ``None``. ``constants``: batched constant slot -> (axis, uniform along it).

    The inputs tried as batched: all those of that leading length, then those of
    them of the highest rank, then the first. A constant with one axis of the
    batch's length is tried as batched along it (a folded broadcast of the batch,
    as a Jacobian's basis), then as unbatched.
    """
    firsts = sorted({p.avals[s][0][0] for s in p.inputs if p.avals[s][0]}, reverse=True)
    used = {r for eq in p.eqs for r in eq.refs()} | {o.slot for o in p.outputs if type(o) is Ref}
    for size in firsts[:3]:
        if size < 2:
            break
        lead = [s for s in p.inputs if p.avals[s][0][:1] == (size,)]
        rank = max(len(p.avals[s][0]) for s in lead)
        choices = dict.fromkeys((tuple(lead), tuple(s for s in lead if len(p.avals[s][0]) == rank),
                                 tuple(lead[:1])))
        consts = {}
        for s, c in p.consts.items():
            on = [i for i, n in enumerate(numpy.shape(c)) if n == size]
            if len(on) == 1 and s in used:
                consts[s] = on[0]
        for given in choices:
            for tried in ([consts, {}] if consts else [{}]):
                axes = batch_axes(p, size, {**dict.fromkeys(given, 0), **tried})
                if axes is not None and any(type(o) is Ref and axes.get(o.slot) is not None
                                            for o in p.outputs):
                    return size, axes, {s: (ax, _uniform(p.consts[s], ax))
                                        for s, ax in tried.items()}
    return None


def _uniform(c, axis: int) -> bool:
    """Whether every slice of ``c`` along ``axis`` equals the first (a broadcast)."""
    c = numpy.asarray(c)
    first = numpy.take(c, [0], axis=axis)
    return bool(numpy.array_equal(c, numpy.broadcast_to(first, c.shape)))


# -- a trace on a block of rows --------------------------------------------------------------

TRACE_MIN_ROWS = 1 << 14
"""Batches from this many rows are traced on a block of :data:`TRACE_ROWS` rows."""
TRACE_ROWS = 61
"""Rows a trace on a block computes (a length no other axis is likely to have)."""
_PENDING = -1  # the slot a step's result is proved on before it has one


class RowTrace:
    """What a trace computes of a long batch: each step on a block of its rows.

    The inputs of the batch's length (the longest leading axis among the arrays)
    are batched along axis 0. A step that reads a batched value runs on the
    block, where :func:`_step_axis` proves it keeps rows apart (as the chunked
    replay proves it of the program), a whole value with one axis of the
    batch's length cut to the block there (a Jacobian's basis); its result is
    batched. A step that reads none runs whole. A rule's branch on ``any()`` or
    ``all()`` of a batched value (a NaN check) takes the block's flag where it
    has one (a NaN in the block is one in the batch), else the batch is taken to
    have none, which the program's first replay checks (``jit.traced``; where it
    has one after all, the trace runs again whole). An einsum summing over the
    batch (a loss) is recorded uncomputed (:data:`~einsumgrad.program.trace.MIXED`):
    a gradient never reads it; a step, a guard or an output reading it raises
    :class:`~einsumgrad.program.trace.Unproved`, as does anything else not
    proved: the trace starts again whole.
    The program is the same: every shape the function sees is the batch's.
    """

    def __init__(self, size: int, rows: int | None = None):
        self.size, self.rows = size, rows or TRACE_ROWS

    @staticmethod
    def of(values: list) -> "RowTrace | None":
        """The trace on a block for these inputs, or None where the batch is short
        (or the arrays are not NumPy's, or chunking is off)."""
        arrays = [v for v in values if hasattr(v, "shape")]
        if not enabled() or any(type(v) is not numpy.ndarray and not isinstance(v, numpy.generic)
                                for v in arrays):
            return None
        lead = max((v.shape[0] for v in arrays if v.ndim), default=0)
        return RowTrace(lead) if lead >= TRACE_MIN_ROWS else None

    def batched(self, value) -> bool:
        """Whether an input is batched (along axis 0)."""
        return value.ndim > 0 and value.shape[0] == self.size

    def stand_ins(self, rec, template, values):
        """``values`` with each batched array as a stand-in of its whole shape (a
        broadcast view): what a shape's query reads."""
        return _at_refs(template, values, lambda slot, v: v if slot not in rec.axes else
                        numpy.broadcast_to(numpy.zeros((), v.dtype), rec.avals[slot][0]))

    def step(self, rec, eq: Eq, vals, kvals) -> tuple:
        """``(result, its batch axis)``: the step run whole where it reads no batched
        value (axis None), else on the block: the whole values with one axis of the
        batch's length batched there, else (where that proves nothing) unbatched."""
        refs = eq.refs()
        if any(s in rec.mixed for s in refs):
            raise Unproved(f"{eq.op[:3]} reads a value that mixes the batch's rows")
        made = eq.op[0] == "backend" and eq.op[2] in CREATE and _made_axis(eq, {}, {}, self.size)
        if not any(s in rec.axes or s in rec.across for s in refs) and type(made) is not int:
            return rec.run(eq.fn, vals, kvals), None
        if shape_only(eq) and type(eq.args[0]) is Ref and eq.args[0].slot in rec.axes \
                and not any(s in rec.axes for s in refs if s != eq.args[0].slot):
            # ones_like(x): x's shape, not its values; whole, as a whole trace folds it
            return rec.run(eq.fn, self.stand_ins(rec, eq.args, vals), kvals), None
        if any(s not in rec.axes for s in eq.writes):
            raise Unproved("a value of the batch written into a whole one")
        long = {}
        for s in refs:
            on = [i for i, n in enumerate(rec.avals[s][0]) if n == self.size]
            if s not in rec.axes and len(on) == 1:
                long[s] = on[0]
        for cuts in ([long, {}] if long else [{}]):
            # a block's flag over the batch (ACROSS) is not among them: no step reads it
            axes = {s: rec.axes.get(s, cuts.get(s)) for s in refs if s not in rec.across}
            got = self._on_block(rec, eq, vals, kvals, axes, cuts)
            if got is not None:
                return got
        if eq.op == ("prim", "einsum") and not eq.writes:
            # a sum over the batch (a loss): left uncomputed, an error only where read
            shapes = [rec.avals[a.slot][0] for a in eq.args]
            spec = eq.kwargs["spec"]
            sizes = {l: n for term, shape in zip(spec.inputs, shapes) for l, n in zip(term, shape)}
            dtype = numpy.result_type(*(rec.avals[a.slot][1] for a in eq.args))
            shape = tuple(sizes[l] for l in spec.output)
            return numpy.broadcast_to(numpy.zeros((), dtype), shape), MIXED
        raise Unproved(f"{eq.op[:3]} is not known to keep the batch's rows apart")

    def _on_block(self, rec, eq: Eq, vals, kvals, axes: dict, cuts: dict):
        """The step on the block, ``axes`` its operands' batch axes (``cuts``: the whole
        ones cut to the block): ``(result, axis)``, or None where not proved."""
        vals, kvals = self._cut(eq.args, vals, cuts), self._cut(eq.kwargs, kvals, cuts)
        seen = Seen(rec.eqs, rec.across, rec.axes)

        def proof(outs=(_PENDING,), aval=None, **flags):
            """The step's batch axis (:func:`_step_axis`) as a step of these results,
            ``aval`` the pending one's whole shape and dtype."""
            if aval is not None:
                rec.avals[_PENDING] = aval
            try:
                return _step_axis(Eq(eq.op, eq.fn, eq.args, eq.kwargs, outs, **flags), axes,
                                  rec.avals, self.size, seen)
            finally:
                rec.avals.pop(_PENDING, None)
        shape = _target(eq)
        if shape is not None:  # the batch's shape it gives, cut to the block where batched
            at = proof(aval=(shape, None), prim=eq.prim)
            if at is not False and at is not None:
                where, key = _shape_at(eq)
                cut = resized(shape, at, self.rows)
                if where == "arg":
                    vals = vals[:key] + (cut,) + vals[key + 1:]
                else:
                    kvals = {**kvals, key: cut}
        if eq.op == ("prim", "einsum"):
            kvals = {k: v for k, v in kvals.items() if k != "run"}  # planned for the batch
        try:
            result = rec.run(eq.fn, vals, kvals)
        except Exception:  # the block's rows meet another axis
            return None
        if eq.op == ("prim", "identity") and result is vals[0]:
            return result, None  # its operand's slot again: nothing recorded
        if result is None and eq.writes:  # x[index] = v: written in place, no result
            done = proof((), writes=eq.writes)
            return None if done is False else (None, None)
        if type(result) in (tuple, list) and result \
                and all(type(r) is numpy.ndarray for r in result):
            at = proof((), seq=True)  # a row kernel's results: one axis for all
            ok = at is not False and at is not None \
                and all(r.ndim > at and r.shape[at] == self.rows for r in result)
            return (result, at) if ok else None
        if isinstance(result, (numpy.ndarray, numpy.generic)) and result.ndim == 0:
            flag = proof()
            if flag in ACROSS:  # any() or all() of the block: a guard alone may read it
                return result, flag
        if type(result) is not numpy.ndarray:
            return None
        for i, n in enumerate(result.shape):
            if n == self.rows:
                got = proof(aval=(resized(result.shape, i, self.size), result.dtype),
                            writes=eq.writes, prim=eq.prim)
                if got is not False and got == i:  # False == 0 holds
                    return result, i
        return None

    def _cut(self, template, values, cuts: dict):
        """``values`` with the whole arrays ``cuts`` names (slot -> axis) cut to the block."""
        return _at_refs(template, values, lambda slot, v: v if cuts.get(slot) is None
                        else v[rows_along(cuts[slot], 0, self.rows)])


def _at_refs(template, values, fn):
    """``values`` (laid out as ``template``) with each value where the template holds a
    Ref replaced by ``fn(slot, value)``."""
    if type(template) is Ref:
        return fn(template.slot, values)
    if type(template) in (tuple, list):
        return type(template)(_at_refs(t, v, fn) for t, v in zip(template, values))
    if type(template) is dict:
        return {k: _at_refs(template[k], values[k], fn) for k in template}
    return values


# -- sizing -----------------------------------------------------------------------------------

def row_bytes(p, axes: dict, size: int) -> tuple:
    """``(live, total)``: bytes per batch row of the batched slots alive at once (the
    most over the steps), and of all batched slots."""
    def per_row(s):
        shape, dtype = p.avals[s]
        return math.prod(shape) // size * numpy.dtype(dtype).itemsize
    batched = {s for s, ax in axes.items() if ax is not None and s in p.avals}
    last: dict = {}
    for i, eq in enumerate(p.eqs):
        for s in (*eq.refs(), *eq.outs):
            last[s] = i
    outs = {o.slot for o in p.outputs if type(o) is Ref}
    live_now = sum(per_row(s) for s in batched if s in p.inputs or s in p.consts)
    live = live_now
    for i, eq in enumerate(p.eqs):
        live_now += sum(per_row(o) for o in eq.outs if o in batched)
        live = max(live, live_now)
        for s in set(eq.refs()) | set(eq.outs):
            if s in batched and last.get(s) == i and s not in outs \
                    and s not in p.inputs and s not in p.consts:
                live_now -= per_row(s)
    return live, sum(per_row(s) for s in batched)


def block_rows(p, axes: dict, size: int, budget: int = BLOCK_BYTES) -> int | None:
    """Rows per block, their live intermediates within ``budget`` bytes, or ``None``
    where the whole batch runs as one."""
    forced = forced_rows()
    if forced is not None:
        return forced if forced < size else None
    live, total = row_bytes(p, axes, size)
    if total * size < (MIN_BYTES if cores() > 1 else SERIAL_MIN_BYTES) or size < 2 * MIN_ROWS:
        return None
    return max(MIN_ROWS, min(budget // max(live, 1), -(-size // 2)))


def split(size: int, rows: int) -> list:
    """Block lengths covering ``size``: ``ceil(size / rows)`` blocks as even as can be
    (at most two lengths, so at most two derived programs)."""
    n = -(-size // rows)
    q, r = divmod(size, n)
    return [q + 1] * r + [q] * (n - r)


# -- the derived program at a block's length ------------------------------------------------

def block_program(p, axes: dict, size: int, rows: int, consts: dict):
    """``p`` over ``rows`` rows of the batch: batched slots' shapes cut, einsums planned
    again on their paths, uniform batched constants cut to the block; other batched
    constants become trailing inputs (cut per block by the caller)."""
    from .core import Program
    from ..backends import device_backend

    avals = {s: (resized(shape, axes.get(s), rows), dt) for s, (shape, dt) in p.avals.items()}
    new_consts, extra = dict(p.consts), []
    for s, (ax, uniform) in consts.items():
        if uniform:
            index = rows_along(ax, 0, rows)
            new_consts[s] = numpy.ascontiguousarray(numpy.asarray(p.consts[s])[index])
        else:
            del new_consts[s]
            extra.append(s)
    xp = device_backend(p.device)
    eqs = []
    for eq in p.eqs:
        if eq.op == ("prim", "einsum"):
            eq = _replanned(eq, p, avals, xp)
        elif _target(eq) is not None and axes.get(eq.outs[0]) is not None:
            eq = _retargeted(eq, avals[eq.outs[0]][0])
        eqs.append(eq)
    q = Program(p.name, eqs, list(p.inputs) + extra, new_consts, avals, p.outputs, p.out_tree,
                p.out_tensor, p.key, p.static_argnums, p.devices, p.device)
    # A buffer a step writes over must be the program's own at this length too: an
    # einsum of one operand may return a view of it, which its plan may decide by size.
    q.owned = frozenset(s for s in getattr(p, "owned", ()) if not _maybe_view(p, s))
    return q, extra


def _maybe_view(p, slot: int) -> bool:
    for eq in p.eqs:
        if slot in eq.outs:
            return eq.op == ("prim", "einsum") and len(eq.args) < 2
    return True


def _replanned(eq: Eq, p, avals: dict, xp) -> Eq:
    """The einsum on the block's shapes, on the contraction path it took for the batch."""
    spec, run, order = eq.kwargs["spec"], eq.kwargs.get("run"), eq.kwargs.get("order")
    dtypes = [avals[a.slot][1] for a in eq.args]
    cast = numpy.result_type(*dtypes) if len(set(dtypes)) > 1 else None
    if run is not None:
        path = tuple(run.plan.path)
    else:
        path = tuple(Plan(spec, [p.avals[a.slot][0] for a in eq.args], AUTO, cast).path)
    bound = Plan(spec, [avals[a.slot][0] for a in eq.args], path, cast).bind(xp)
    if run is None and order is not None:  # the replay passes the order only without a plan
        plain = bound
        bound = lambda arrays: plain(arrays, order)  # noqa: E731
    kwargs = {"spec": spec, "run": bound}
    return Eq(eq.op, eq.fn, eq.args, kwargs, eq.outs, eq.seq, eq.scalar, eq.writes, eq.prim,
              eq.inner)


# -- the replay ----------------------------------------------------------------------------------

class Chunked:
    """A program's replay block by block (see the module docstring); with
    ``workers`` > 1, the blocks shared among that many threads (the calling one
    among them), each block's results written into its own rows."""

    def __init__(self, p, size: int, axes: dict, consts: dict, rows: int, workers: int = 1):
        self.size, self.lengths = size, split(size, rows)
        self.starts = [sum(self.lengths[:i]) for i in range(len(self.lengths))]
        self.workers = workers
        self.cut = [axes.get(s) == 0 for s in p.inputs]
        self.runs: dict = {}
        for n in set(self.lengths):
            q, extra = block_program(p, axes, size, n, consts)
            self.runs[n] = q._compile()
        self.extra = [(numpy.asarray(p.consts[s]), consts[s][0]) for s in extra]
        # per output leaf: ("batched", slot, axis), ("slot", slot) or ("static", value)
        self.outs, self.alloc = [], {}
        for o in p.outputs:
            if type(o) is not Ref:
                self.outs.append(("static", o))
            elif axes.get(o.slot) is not None:
                self.outs.append(("batched", o.slot, axes[o.slot]))
                self.alloc[o.slot] = (p.avals[o.slot], axes[o.slot])
            else:
                self.outs.append(("slot", o.slot))  # the same in every block: the first's

    def on_threads(self, workers: int) -> "Chunked":
        """The same blocks (the same compiled block programs) shared among ``workers``."""
        twin = copy.copy(self)
        twin.workers = workers
        return twin

    def __call__(self, values: list) -> list:
        """The output leaves for the input arrays ``values``."""
        full = {s: numpy.empty(shape, dtype) for s, ((shape, dtype), _) in self.alloc.items()}
        whole: dict = {}
        k = self.workers
        with one_thread:
            if k == 1:
                self._blocks(values, full, whole, range(len(self.lengths)))
            else:  # block 0, whose unbatched results are kept, is the caller's
                pool = thread_pool(k - 1)
                futures = [pool.submit(self._blocks, values, full, whole,
                                       range(w, len(self.lengths), k)) for w in range(1, k)]
                try:
                    self._blocks(values, full, whole, range(0, len(self.lengths), k))
                finally:
                    concurrent.futures.wait(futures)
                for f in futures:
                    f.result()  # a worker's error, raised here
        return [full[o[1]] if o[0] == "batched" else whole[o[1]] if o[0] == "slot" else o[1]
                for o in self.outs]

    def _blocks(self, values: list, full: dict, whole: dict, which: range) -> None:
        for i in which:
            start = self.starts[i]
            n = self.lengths[i]
            stop = start + n
            args = [v[start:stop] if c else v for v, c in zip(values, self.cut)]
            for c, ax in self.extra:
                args.append(c[rows_along(ax, start, stop)])
            res = self.runs[n](*args)
            for j, o in enumerate(self.outs):
                if o[0] == "batched":
                    full[o[1]][rows_along(o[2], start, stop)] = res[j]
                elif o[0] == "slot" and i == 0:
                    whole[o[1]] = res[j]


class Raced:
    """The whole replay, the chunked one and (on several cores) the chunked one on a
    thread per core, each timed as it runs, the fastest kept
    (:class:`einsumgrad.backends.threads.Timed`: in turns for the first calls, then
    the fastest, a slower one tried now and then): which pays depends on the
    machine (its cores, its caches, how busy it is) more than a size threshold can
    say. Each call's result is a real one; they agree up to BLAS rounding (the two
    chunked ones run the same blocks). ``whole`` None: the blocks' two ways only
    (a whole replay whose intermediates would not fit :data:`WHOLE_BYTES`)."""

    TRIES = Timed.TRIES  # calls timed per side before the first pick
    EVERY = 32  # then a slower side every this many calls

    def __init__(self, whole: Callable | None, chunked: Chunked,
                 parallel: Chunked | None = None):
        self.whole, self.chunked, self.parallel = whole, chunked, parallel
        self.sides = [name for name in ("whole", "chunked", "parallel")
                      if getattr(self, name) is not None]
        self.timed = Timed(len(self.sides), self.EVERY)

    def __call__(self, values: list) -> list:
        side = self.timed.pick()
        name = self.sides[side]
        t = time.perf_counter()
        out = self.whole(*values) if name == "whole" else getattr(self, name)(values)
        self.timed.record(side, time.perf_counter() - t)
        return out


def plan_replay(p) -> Callable | None:
    """How ``jit`` replays ``p``: ``run(values) -> output leaves``, or ``None`` for its
    whole-batch run (``p.run``). Block by block where that is proved exact and may pay:
    raced against the whole replay (:class:`Raced`) over the first calls, or always
    where ``EINSUMGRAD_CHUNK`` fixes the rows."""
    if not enabled() or p.device != "cpu" or set(p.devices) != {"numpy"}:
        # the full outputs are NumPy arrays: other backends keep their whole replay
        return None
    found = batching(p)
    if found is None:
        return None
    size, axes, consts = found
    rows = block_rows(p, axes, size, SERIAL_BLOCK_BYTES)
    if rows is None or not one_thread.available():
        return None
    chunked = Chunked(p, size, axes, consts, rows)
    if forced_rows() is not None:
        return chunked
    shared = block_rows(p, axes, size)  # larger: a thread's share of a block costs Python
    parallel = None
    if cores() > 1:
        parallel = (chunked if shared == rows else
                    Chunked(p, size, axes, consts, shared)).on_threads(cores())
        parallel = parallel if len(parallel.lengths) > 1 else None
    live = row_bytes(p, axes, size)[0] * size
    if live > WHOLE_BYTES:
        return Raced(None, chunked, parallel) if parallel is not None else chunked
    return Raced(p._run or p._compile(), chunked, parallel)


def replayer(p) -> Callable:
    """How ``jit`` replays ``p``: ``run(values) -> output leaves`` (:func:`plan_replay`'s,
    or the whole-batch run). It holds what it runs, not ``p``."""
    run = plan_replay(p)
    if run is not None:
        return run
    whole = p._run or p._compile()
    return lambda values: whole(*values)
