"""A traced program: its equations, how it prints, runs and pickles.

A :class:`Program` is a straight list of equations over numbered slots: the
inputs (the leaves of the arguments, in order), the constants, and each
equation's outputs. It runs as one generated Python function over arrays,
with no Tensor and no tape: each step is the rule's own implementation with
its parameters bound once (an einsum calls the plan the engine made for it),
and each buffer is dropped after its last use.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy

from ..backends import device_backend
from ..plan import Plan
from ..pytree import TreeDef, flatten, unflatten
from ..tensor import Tensor
from .compile import compile_program
from .emit import program_source
from .render import program_text
from .trace import (Eq, GuardFailed, TraceError, attr_getter, compact, expand, is_array,
                    method_caller)


# -- the signature: what must match for a program to run on these arguments --------------

def signature(args: tuple, kwargs: dict, static_argnums: tuple) -> tuple:
    """``(key, values)``: everything a trace depends on besides the arrays' values
    (the pytree structure, each array's type, shape and dtype, the static
    values), and the arrays (the inputs, in order).

    Leaves that are arrays or Tensors are inputs; any other leaf (a Python
    number, a string) is static, as the ``static_argnums`` arguments are. An
    array and a Tensor of it are the same input (a trace sees Tensors either
    way: a training loop feeds a step's Tensors back without a new trace); each
    part's first item says whether it is a Tensor that requires grad.
    """
    if not kwargs and not static_argnums:  # the common call: arrays or Tensors, no nesting
        values, parts = [], []
        for a in args:
            tp = type(a)
            d = a.data if tp is Tensor else a
            if not (tp is Tensor or tp is numpy.ndarray):
                break
            values.append(d)
            parts.append((tp is Tensor and a.requires_grad, type(d), d.shape, d.dtype))
        else:
            return (_flat_tree(len(args)), (), tuple(parts)), values
    dyn = tuple(None if i in static_argnums else a for i, a in enumerate(args))
    statics = tuple(args[i] for i in static_argnums if i < len(args))
    leaves, tree = flatten((dyn, kwargs))
    values, parts = [], []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            d = leaf.data
            values.append(d)
            parts.append((leaf.requires_grad, type(d), d.shape, d.dtype))
        elif isinstance(leaf, numpy.generic):
            values.append(numpy.asarray(leaf))
            parts.append((False, numpy.generic, (), leaf.dtype))
        elif is_array(leaf):
            values.append(leaf)
            parts.append((False, type(leaf), leaf.shape, leaf.dtype))
        else:
            parts.append(("static", type(leaf), leaf))
    return (tree, statics, tuple(parts)), values


_trees: dict = {}


def _flat_tree(n: int) -> TreeDef:
    """The structure of ``((a_1, ..., a_n), {})``, as :func:`signature` flattens it."""
    t = _trees.get(n)
    if t is None:
        t = _trees[n] = flatten(((0,) * n, {}))[1]
    return t


def describe(key: tuple) -> str:
    tree, statics, parts = key
    shown = [f"{p[3]}{list(p[2])}" if p[0] != "static" else repr(p[2]) for p in parts]
    extra = f", static {statics!r}" if statics else ""
    return f"{tree} of ({', '.join(shown)}){extra}"


# -- the program -----------------------------------------------------------------------

class Program:
    """A function traced once: equations over slots, run as straight-line code.

    Attributes:
        name: the traced function's name.
        eqs: the equations, in order (:class:`~einsumgrad.program.trace.Eq`).
        inputs: the input slots (the arguments' array leaves, in order).
        consts: constant slot -> array.
        avals: slot -> ``(shape, dtype)``.
        outputs: per output leaf, a :class:`Ref` or a static value.
        out_tree: the output's pytree structure.
        key: the signature it was traced for (see :func:`signature`).
    """

    def __init__(self, name: str, eqs: list, inputs: list, consts: dict, avals: dict,
                 outputs: list, out_tree: TreeDef, out_tensor: list, key: tuple,
                 static_argnums: tuple, devices: dict, device: str):
        self.name, self.eqs, self.inputs, self.consts = name, eqs, inputs, consts
        self.avals, self.outputs, self.out_tree, self.out_tensor = avals, outputs, out_tree, \
            out_tensor
        self.key, self.static_argnums = key, static_argnums
        self.devices, self.device = devices, device  # backend name -> device; the inputs'
        self._run = None

    # running
    def run(self, values: list) -> list:
        """The output leaves for the input arrays ``values`` (arrays, in order)."""
        run = self._run or self._compile()
        return run(*values)

    def _compile(self) -> Callable:
        self._run = compile_program(self)
        return self._run

    def __call__(self, *args, **kwargs):
        """Run on arguments of the signature it was traced for.

        Raises:
            TypeError: arguments of another signature (structure, shapes, dtypes,
                static values).
            TraceError: a value einsumgrad's rules branched on at trace time
                differs for these inputs (``jit`` traces again there).
        """
        key, values = signature(args, kwargs, self.static_argnums)
        if key != self.key:
            raise TypeError(f"program {self.name!r} was traced for {describe(self.key)}, "
                            f"called with {describe(key)}: trace it again (eg.jit does)")
        try:
            return self.outputs_of(self.run(values))
        except GuardFailed as e:
            raise TraceError(f"program {self.name!r} was traced where {self.guard_text(e.index)}; "
                             f"these inputs take the other branch: trace it again "
                             f"(eg.jit does)") from None

    def outputs_of(self, flat: list) -> Any:
        """The output pytree from the output leaves (Tensors where ``f`` gave Tensors)."""
        if self.out_tree.kind is None:  # one array: no structure to rebuild
            return Tensor(flat[0]) if self.out_tensor[0] else flat[0]
        leaves = [Tensor(v) if t else v for v, t in zip(flat, self.out_tensor)]
        return unflatten(self.out_tree, leaves)

    def guard_text(self, index: int) -> str:
        eq = self.eqs[index]
        return f"{eq.kwargs['where']} gave {eq.kwargs['expected']!r}"

    # reading
    def __str__(self) -> str:
        return program_text(self)

    def __repr__(self) -> str:
        return f"<Program {self.name}: {len(self.eqs)} equations, {len(self.inputs)} inputs>"

    def source(self) -> str:
        """Standalone Python (NumPy and opt_einsum only) defining one function,
        ``self.name``, that takes the input arrays positionally and returns the outputs.

        Raises:
            NotImplementedError: an equation with no NumPy emitter (names the op).
        """
        return program_source(self)

    # pickling: primitives by name, einsum plans made again, constants as arrays
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_run"] = None
        state["eqs"] = [_eq_state(eq) for eq in self.eqs]
        state["consts"] = {s: compact(c) for s, c in self.consts.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.consts = {s: expand(c) for s, c in state["consts"].items()}
        self.eqs = [_eq_from(s, self) for s in state["eqs"]]


def _eq_state(eq: Eq) -> tuple:
    kwargs = eq.kwargs
    if eq.op == ("prim", "einsum"):
        run = kwargs.get("run")
        kwargs = {k: v for k, v in kwargs.items() if k != "run"}
        if run is not None:
            kwargs["_path"] = tuple(run.plan.path)
    elif eq.op[0] == "prim":
        _check_picklable(eq)
    inner = None if eq.inner is None else [_eq_state(e) for e in eq.inner]
    return (eq.op, eq.args, kwargs, eq.outs, eq.seq, eq.scalar, eq.writes, inner)


def _check_picklable(eq: Eq) -> None:
    import pickle
    try:
        pickle.dumps(eq.kwargs)
    except Exception as e:
        raise TypeError(f"primitive {eq.op[1]!r}: its parameters do not pickle ({e})") from None


def _eq_from(s: tuple, program: Program) -> Eq:
    op, args, kwargs, outs, seq, scalar, writes, inner = s
    prim = None
    kind = op[0]
    if inner is not None:
        inner = [_eq_from(e, program) for e in inner]
    if kind == "fused":
        from .fuse import kernel_of
        fn = kernel_of(op[1])
    elif kind == "prim":
        prim = primitive(op[1])
        fn = prim.impl
        if "_path" in kwargs:
            kwargs = dict(kwargs)
            path = kwargs.pop("_path")
            kwargs["run"] = _replan(kwargs["spec"], args, path, program)
    elif kind == "ufunc":
        fn = getattr(op[1], op[2])
    elif kind == "function":
        fn = op[1]
    elif kind == "method":
        fn = method_caller(op[1])
    elif kind == "attr":
        fn = attr_getter(op[1])
    elif kind == "getitem":
        import operator
        fn = operator.getitem
    elif kind == "setitem":
        import operator
        fn = operator.setitem
    elif kind == "backend":
        fn = getattr(device_backend(program.devices[op[1]]), op[2])
    else:
        fn = None
    return Eq(op, fn, args, kwargs, outs, seq, scalar, writes, prim, inner)


def _replan(spec, args: tuple, path: tuple, program: Program):
    """The einsum plan the trace made, made again from the operands' shapes and dtypes."""
    shapes = [program.avals[a.slot][0] for a in args]
    dtypes = [program.avals[a.slot][1] for a in args]
    cast = numpy.result_type(*dtypes) if len(set(dtypes)) > 1 else None
    xp = device_backend(program.device)
    return Plan(spec, shapes, path, cast).bind(xp)


_primitives: dict = {}


def primitive(name: str):
    """The primitive of this name: einsumgrad's rules, or one seen in a trace."""
    if not _primitives:
        _collect()
    try:
        return _primitives[name]
    except KeyError:
        raise TypeError(f"no primitive named {name!r} in this process: import the module "
                        f"that defines it before unpickling the program") from None


def _collect() -> None:
    import importlib
    import pkgutil

    from .. import rules
    from ..tensor import Primitive
    for info in pkgutil.iter_modules(rules.__path__):
        mod = importlib.import_module(f"{rules.__name__}.{info.name}")
        for v in vars(mod).values():
            if isinstance(v, Primitive):
                _primitives.setdefault(v.name, v)


def remember(prim) -> None:
    """Note a primitive seen in a trace, so a program using it unpickles."""
    if not _primitives:
        _collect()
    _primitives.setdefault(prim.name, prim)
