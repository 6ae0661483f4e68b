"""A program as text for people: one equation per line, with shapes and dtypes.

::

    program f(x0: float64[4, 3], x1: float64[3, 2])
      c2: float64[2] = constant
      v3: float64[4, 2] = einsum 'ij,jk->ik' (x0, x1)
      v4: float64[4, 2] = tanh (v3)
      return v4
"""
from __future__ import annotations

from typing import Any

import numpy

from ..spec import Spec, render
from .trace import Ref

# Parameters not worth a line (how a plan runs, the forward's kept values).
_HIDDEN = {"run", "order", "stats", "value", "patches", "cdf"}


def names(p) -> dict:
    """slot -> its printed name: x for inputs, c for constants, v for the rest."""
    out = {s: f"x{s}" for s in p.inputs}
    out.update({s: f"c{s}" for s in p.consts})
    return out


def aval(p, s: int) -> str:
    shape, dtype = p.avals[s]
    return f"{dtype}[{', '.join(map(str, shape))}]"


def program_text(p) -> str:
    nm = names(p)
    name = lambda s: nm.get(s, f"v{s}")
    ins = ", ".join(f"{name(s)}: {aval(p, s)}" for s in p.inputs)
    lines = [f"program {p.name}({ins})"]
    for s, c in p.consts.items():
        lines.append(f"  {name(s)}: {aval(p, s)} = constant" + _peek(c))
    for eq in p.eqs:
        lines.append("  " + eq_text(eq, name, p))
    outs = [name(o.slot) if type(o) is Ref else repr(o) for o in p.outputs]
    lines.append(f"  return {', '.join(outs)}")
    return "\n".join(lines)


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
