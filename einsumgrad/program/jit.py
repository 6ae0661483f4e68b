"""``make_program`` (trace once, get a Program) and ``jit`` (trace per signature, replay)."""
from __future__ import annotations

import functools
from typing import Callable

import numpy

from ..backends import backend_of
from ..plan import Bounded
from ..pytree import flatten, unflatten
from ..tensor import Tensor, state
from .chunk import RowTrace, replayer
from .core import Program, is_array, remember, signature
from .passes import optimize as run_passes
from .render import function_label, input_names
from .trace import GuardFailed, Recorder, Ref, Traced, TraceError, Unproved, tracing

JIT_CACHE_SIZE = 64
"""Programs ``jit`` keeps per function (one per signature), the oldest dropped first."""


def _static_nums(static_argnums) -> tuple:
    nums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
    if any(not isinstance(i, int) or isinstance(i, bool) for i in nums):
        raise TypeError(f"static_argnums must be ints, got {static_argnums!r}")
    return nums


def _normalized(nums: tuple, n: int) -> tuple:
    return tuple(sorted({i % n for i in nums if -n <= i < n})) if nums else ()


def trace_program(f: Callable, args: tuple, kwargs: dict, static_argnums: tuple,
                  optimize: bool = True) -> tuple:
    """Run ``f`` once on Traced stand-ins; returns ``(program, output leaves of this run)``,
    the leaves None where the trace computed a block of the batch's rows only (see
    :class:`~einsumgrad.program.chunk.RowTrace`): the program then gives them."""
    return traced(f, args, kwargs, static_argnums, optimize)[:2]


def traced(f: Callable, args: tuple, kwargs: dict, static_argnums: tuple,
           optimize: bool = True) -> tuple:
    """:func:`trace_program`'s ``(program, leaves)`` and the replay that computed the
    leaves, if one did (else None)."""
    static_argnums = _normalized(static_argnums, len(args))
    key, values = signature(args, kwargs, static_argnums)
    rows = RowTrace.of(values)
    if rows is not None:
        try:
            p, _, guessed = _trace(f, args, kwargs, static_argnums, key, values, optimize, rows)
        except Unproved:
            pass  # a step mixes rows, or a value leaves for Python: trace it whole
        else:
            if not guessed:
                return p, None, None
            run = replayer(p)
            try:  # the batch's values check the guards the block guessed
                return p, run(values), run
            except GuardFailed:
                pass  # the batch has what the block had not (a NaN, an overflow)
    return (*_trace(f, args, kwargs, static_argnums, key, values, optimize)[:2], None)


def _trace(f, args, kwargs, static_argnums, key, values, optimize, rows=None) -> tuple:
    rec = Recorder(rows)
    with tracing(rec):
        ins = [rec.input(v) for v in values]
        call_args, call_kwargs = _rebuild(args, kwargs, static_argnums, ins)
        out = f(*call_args, **call_kwargs)
    leaves, out_tree = flatten(out)
    outputs, out_tensor, now = [], [], []
    for leaf in leaves:
        is_tensor = isinstance(leaf, Tensor)
        d = leaf.data if is_tensor else leaf
        if isinstance(d, Traced):
            if d.rec is not rec:
                raise TraceError("f returned a value traced by another program")
            if d.slot in rec.mixed:
                raise Unproved("f returns a value that mixes the batch's rows")
            outputs.append(Ref(d.slot))
            now.append(d.value)
        elif hasattr(d, "shape") and hasattr(d, "dtype"):
            slot, c = rec.const(d)
            outputs.append(Ref(slot))
            now.append(c)
        else:
            outputs.append(d)
            now.append(d)
        out_tensor.append(is_tensor)
    for eq in rec.eqs:
        if eq.prim is not None:
            remember(eq.prim)
    device = backend_of(values[0]).device if values else "cpu"
    p = Program(function_label(f), rec.eqs, rec.inputs, rec.consts, rec.avals,
                outputs, out_tree, out_tensor, key, static_argnums,
                {**rec.devices, backend_of(values[0]).name: device} if values else rec.devices,
                device)
    labels = input_names(f, args, kwargs, static_argnums, _is_input)
    p.input_names = labels if labels is not None and len(labels) == len(rec.inputs) else None
    if optimize:
        run_passes(p, rec.values, rec.whole() if rows is not None else None)
    return p, (now if rows is None else None), rec.guessed


def _rebuild(args: tuple, kwargs: dict, static_argnums: tuple, ins: list) -> tuple:
    """The arguments with each array leaf replaced by a Tensor of its Traced stand-in."""
    dyn = tuple(None if i in static_argnums else a for i, a in enumerate(args))
    leaves, tree = flatten((dyn, kwargs))
    it = iter(ins)
    new = [Tensor(next(it)) if _is_input(leaf) else leaf for leaf in leaves]
    dyn, kwargs = unflatten(tree, new)
    return tuple(args[i] if i in static_argnums else a for i, a in enumerate(dyn)), kwargs


def _is_input(leaf) -> bool:
    return isinstance(leaf, (Tensor, numpy.generic)) or is_array(leaf)


def make_program(f: Callable, static_argnums=()) -> Callable:
    """``make_program(f)(*args)``: trace ``f`` once on these arguments into a :class:`Program`.

    ``f`` may be any composition of einsumgrad's transforms and ops; its
    arguments and result pytrees of arrays or Tensors (other leaves, and the
    ``static_argnums`` arguments, are static: part of the signature). A long
    batch is traced on a block of its rows, and again whole where a step mixes
    rows (see :func:`jit`); where a rule's check of the batch (for a NaN, say)
    took the block's answer for the batch's, the program runs once on the
    arguments to check it.

    Raises:
        TraceError: ``f`` branches on a value computed from its inputs (names the line).
    """
    nums = _static_nums(static_argnums)

    @functools.wraps(f)
    def build(*args, **kwargs) -> Program:
        return trace_program(f, args, kwargs, nums)[0]
    return build


class Jit:
    """``f`` traced once per signature and replayed: see :func:`jit`."""

    def __init__(self, f: Callable, static_argnums=()):
        functools.update_wrapper(self, f)
        self.f, self.static_argnums = f, _static_nums(static_argnums)
        self.programs = Bounded(JIT_CACHE_SIZE)
        self.traces = 0  # how many times f was traced (a test reads it)

    def __call__(self, *args, **kwargs):
        if state.program is not None or state.tracing:
            return self.f(*args, **kwargs)  # inside a trace or a transform: f itself, on the tape
        nums = _normalized(self.static_argnums, len(args))
        key, values = signature(args, kwargs, nums)
        if any(part[0] is True for part in key[2]):  # a Tensor that requires grad
            return self.f(*args, **kwargs)  # a graph is wanted: the tape records f
        hit = self.programs.get(key)  # [program, its replay (made at the first replay)]
        if hit is not None:
            p, run = hit
            if run is None:
                run = hit[1] = replayer(p)
            try:
                return p.outputs_of(run(values))
            except GuardFailed:
                pass  # a rule's branch goes the other way here: trace again
        self.traces += 1
        p, now, run = traced(self.f, args, kwargs, nums)
        hit = self.programs[key] = [p, run]
        if now is None:  # traced on a block of rows: the program computes them all
            run = hit[1] = replayer(p)
            now = run(values)
        return p.outputs_of(now)

    def program(self, *args, **kwargs) -> Program:
        """The program these arguments run (traced if need be)."""
        nums = _normalized(self.static_argnums, len(args))
        key, _ = signature(args, kwargs, nums)
        hit = self.programs.get(key)
        if hit is None:
            hit = self.programs[key] = [trace_program(self.f, args, kwargs, nums)[0], None]
        return hit[0]


def jit(f: Callable, static_argnums=()) -> Jit:
    """``f`` traced on its first call per signature, then replayed as a :class:`Program`.

    The signature is the arguments' pytree structure, each array's type
    (backend), shape and dtype, and the static values (``static_argnums``
    arguments and non-array leaves, which must be hashable); programs are kept
    per signature (the last :data:`JIT_CACHE_SIZE`). A replay runs no Tensor
    and no tape. A long batch (from ``chunk.TRACE_MIN_ROWS`` rows) is traced on a
    block of its rows, every shape ``f`` sees the batch's, and its first call's
    results come from the program; where a step mixes rows, ``f`` is traced again
    on the whole batch (its Python side effects then happen twice). Inside a
    transform, inside another trace, or with an input that requires grad, ``f``
    itself runs (its ops must be on the tape).

    Raises:
        TraceError: at trace time, ``f`` branches on a value computed from its
            inputs (names the line).
    """
    return Jit(f, static_argnums)
