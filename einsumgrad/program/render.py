"""A program as text for people: one equation per line, with shapes and dtypes.

::

    program grad(loss)(w: float64[3, 2], x: float64[4, 3])
      v1: float64[4, 2] = einsum 'ij,jk->ik' (x, w)
      v2: float64[4, 2] = tanh (v1)
      v3: float64[4, 2] = mul (v2, v2)
      v4: float64[4, 2] = sub (1.0, v3)
      v5: float64[3, 2] = einsum 'ik,ij->jk' (v4, x)
      return v5

Inputs take the traced function's parameter names (a pytree's leaves its
paths: ``params[0]``, ``p['w']``), values are numbered in order, and
one-element constants are written in place.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable

import numpy

from ..spec import Spec, render
from .trace import Ref

# Parameters not worth a line (how a plan runs, the forward's kept values).
_HIDDEN = {"run", "order", "stats", "value", "patches", "cdf"}


def names(p) -> dict:
    """slot -> its printed name: the parameter names (or x0, x1, ...) for inputs, a
    one-element constant's value, c1, c2, ... for other constants, v1, v2, ... for the
    rest in order of definition."""
    labels = getattr(p, "input_names", None) or [f"x{i}" for i in range(len(p.inputs))]
    out = dict(zip(p.inputs, labels))
    shown = [s for s, c in p.consts.items() if _inline(c) is None]
    out.update({s: _inline(c) for s, c in p.consts.items()})
    out.update({s: f"c{i}" for i, s in enumerate(shown, 1)})
    n = 0
    for eq in p.eqs:
        for s in eq.outs:
            if s not in out:
                n += 1
                out[s] = f"v{n}"
    return out


def aval(p, s: int) -> str:
    shape, dtype = p.avals[s]
    return f"{dtype}[{', '.join(map(str, shape))}]"


def program_text(p) -> str:
    nm = names(p)
    name = lambda s: nm.get(s, f"v?{s}")
    ins = ", ".join(f"{name(s)}: {aval(p, s)}" for s in p.inputs)
    lines = [f"program {p.name}({ins})"]
    for s, c in p.consts.items():
        if _inline(c) is None:
            lines.append(f"  {name(s)}: {aval(p, s)} = constant" + _peek(c))
    for eq in p.eqs:
        lines.append("  " + eq_text(eq, name, p))
    outs = [name(o.slot) if type(o) is Ref else repr(o) for o in p.outputs]
    lines.append(f"  return {', '.join(outs)}")
    return "\n".join(lines)


def _inline(c) -> str | None:
    """A 0-d constant of a float, int or bool dtype as its value (``1.0``), else None."""
    if getattr(c, "ndim", None) != 0 or getattr(c, "dtype", None) is None \
            or c.dtype.kind not in "fiub":
        return None
    return repr(c.item())


# -- the names a function and its inputs are printed with ------------------------------------

def _closure(f: Callable) -> dict:
    code = getattr(f, "__code__", None)
    cells = getattr(f, "__closure__", None) or ()
    if code is None:
        return {}
    return {k: c.cell_contents for k, c in zip(code.co_freevars, cells)
            if _has_contents(c) and callable(c.cell_contents)}


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _is_transform(f: Callable) -> bool:
    return (getattr(f, "__module__", "") or "").startswith("einsumgrad.") \
        and ".<locals>." in getattr(f, "__qualname__", "")


def _unwrap(f: Callable) -> tuple:
    """``(transform names, the user's function)``: einsumgrad's transforms are closures
    over the function they take (a cell named ``f``; another cell, ``grad``'s ``vg``,
    is the same transform's own machinery)."""
    names, new = [], True
    for _ in range(16):
        if not _is_transform(f):
            break
        if new:
            names.append(f.__qualname__.split(".<locals>")[0].lstrip("_"))
        cells = _closure(f)
        if "f" in cells:
            f, new = cells["f"], True
        elif len(cells) == 1:
            f, new = next(iter(cells.values())), False
        else:
            break
    return names, f


def function_label(f: Callable) -> str:
    """``grad(loss)`` for ``eg.grad(loss)``; the function's own name otherwise."""
    names, inner = _unwrap(f)
    label = getattr(inner, "__name__", "program")
    for n in reversed(names):
        label = f"{n}({label})"
    return label


def input_names(f: Callable, args: tuple, kwargs: dict, static_argnums: tuple,
                is_input: Callable) -> list | None:
    """The printed name of each input leaf, from the user's function's parameter names
    (``params[0]``, ``batch['x']`` for pytree leaves); None where they do not line up."""
    _, inner = _unwrap(f)
    try:
        params = list(inspect.signature(inner).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [q.name for q in params
                  if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(args):
        return None
    out: list = []
    for i, a in enumerate(args):
        if i not in static_argnums:
            _paths(a, positional[i], out)
    _paths(kwargs, "", out)
    return [label for label, leaf in out if is_input(leaf)]


def _paths(x: Any, label: str, out: list) -> None:
    """(label, leaf) pairs in the order :func:`einsumgrad.pytree.flatten` takes the leaves."""
    from ..pytree import _dict_keys
    kind = type(x)
    if kind is list or kind is tuple or (isinstance(x, tuple) and hasattr(kind, "_fields")):
        for i, c in enumerate(x):
            _paths(c, f"{label}[{i}]", out)
    elif kind is dict or kind is OrderedDict:
        for k in (_dict_keys(x) if kind is dict else tuple(x)):
            _paths(x[k], f"{label}[{k!r}]" if label else str(k), out)
    elif x is not None:
        out.append((label, x))


def _peek(c) -> str:
    """A small constant's values (a scalar, a short vector), else nothing."""
    try:
        if c.size <= 4:
            return " " + numpy.array2string(numpy.asarray(c), separator=", ")
    except Exception:
        pass
    return ""


def eq_text(eq, name, p) -> str:
    op = eq.op
    outs = ", ".join(f"{name(s)}: {aval(p, s)}" for s in eq.outs)
    head = f"{outs} = " if outs else ""
    show = lambda t: _arg(t, name)
    if op[0] == "prim":
        what = op[1]
        params = {k: v for k, v in eq.kwargs.items() if k not in _HIDDEN and k != "spec"}
        if "spec" in eq.kwargs:
            what += f" '{render(eq.kwargs['spec'])}'"
        text = f"{what} ({', '.join(show(a) for a in eq.args)})"
        if params:
            text += " " + ", ".join(f"{k}={show(v)}" for k, v in params.items())
        extra = [k for k in eq.kwargs if k in ("stats", "value", "cdf", "patches")
                 and _has_ref(eq.kwargs[k])]
        if extra:
            text += " using " + ", ".join(f"{k}={show(eq.kwargs[k])}" for k in extra)
    elif op[0] == "fused":
        text = f"fused[{', '.join(op[2])}] ({', '.join(show(a) for a in eq.args)})"
    elif op[0] == "guard":
        text = (f"guard {op[1]}({show(eq.args[0])}) == {eq.kwargs['expected']!r}"
                f"  # {eq.kwargs['where']}")
    elif op[0] == "getitem":
        text = f"{show(eq.args[0])}[{_index(eq.args[1], name)}]"
    elif op[0] == "setitem":
        text = f"{show(eq.args[0])}[{_index(eq.args[1], name)}] = {show(eq.args[2])}"
    elif op[0] in ("method", "attr"):
        args = ", ".join([show(a) for a in eq.args[1:]] +
                         [f"{k}={show(v)}" for k, v in eq.kwargs.items()])
        text = f"{show(eq.args[0])}.{op[1]}" + (f"({args})" if op[0] == "method" else "")
    else:
        text = f"{op_name(op)}({', '.join([show(a) for a in eq.args] + [f'{k}={show(v)}' for k, v in eq.kwargs.items()])})"
    if eq.writes:
        text += f"  # writes {', '.join(name(s) for s in eq.writes)}"
    return head + text


def op_name(op: tuple) -> str:
    if op[0] == "ufunc":
        return f"{_module(op[1])}.{op[1].__name__}" + ("" if op[2] == "__call__" else f".{op[2]}")
    if op[0] == "function":
        return f"{_module(op[1])}.{op[1].__name__}"
    if op[0] == "backend":
        return f"{op[1]}.{op[2]}"
    return str(op)


def _module(fn) -> str:
    mod = getattr(fn, "__module__", None) or "numpy"
    return "numpy" if mod.startswith("numpy") else mod


def _has_ref(t: Any) -> bool:
    if type(t) is Ref:
        return True
    if type(t) in (tuple, list):
        return any(_has_ref(x) for x in t)
    return False


def _index(t: Any, name) -> str:
    items = t if type(t) is tuple else (t,)
    return ", ".join(_slice(x) if type(x) is slice else _arg(x, name) for x in items)


def _slice(s: slice) -> str:
    a = "" if s.start is None else str(s.start)
    b = "" if s.stop is None else str(s.stop)
    return f"{a}:{b}" + ("" if s.step is None else f":{s.step}")


def _arg(t: Any, name) -> str:
    tp = type(t)
    if tp is Ref:
        return name(t.slot)
    if tp is tuple:
        return "(" + ", ".join(_arg(x, name) for x in t) + ("," if len(t) == 1 else "") + ")"
    if tp is list:
        return "[" + ", ".join(_arg(x, name) for x in t) + "]"
    if tp is dict:
        return "{" + ", ".join(f"{k!r}: {_arg(v, name)}" for k, v in t.items()) + "}"
    if tp is Spec:
        return repr(render(t))
    if tp is slice:
        return _slice(t)
    if isinstance(t, numpy.dtype):
        return str(t)
    if isinstance(t, type):
        return t.__name__
    text = repr(t)
    return text if len(text) <= 40 else text[:37] + "..."
