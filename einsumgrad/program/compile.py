"""A program as one generated Python function over arrays.

Each equation becomes one line calling what the trace called (a rule's
impl, a ufunc, a backend function), its static parameters bound once as
names of the function's globals; slots are local variables, deleted after
their last use so each buffer is freed as early as the trace allows. Large
intermediate results are written into a workspace the function keeps between
calls (:class:`Workspace`), not into memory allocated anew on each one.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy

from ..backends import device_backend
from ..plan import AUTO, Plan
from .trace import CONVERT, GuardFailed, Ref, assignment, template_source


# Element-wise primitives whose impl is one backend function: (its name, extra arguments).
DIRECT = {"add": ("add", ""), "sub": ("subtract", ""), "mul": ("multiply", ""),
          "div": ("true_divide", ""), "pow": ("power", ""), "maximum": ("maximum", ""),
          "minimum": ("minimum", ""), "remainder": ("remainder", ""), "neg": ("negative", ""),
          "exp": ("exp", ""), "log": ("log", ""), "sin": ("sin", ""), "cos": ("cos", ""),
          "tanh": ("tanh", ""), "sqrt": ("sqrt", ""), "abs": ("abs", ""),
          "relu": ("maximum", ", 0")}


def last_uses(p) -> dict:
    """Equation index -> the slots read (or made) there for the last time (outputs kept)."""
    keep = {o.slot for o in p.outputs if type(o) is Ref}
    last: dict = {}
    for i, eq in enumerate(p.eqs):
        for s in (*eq.refs(), *eq.outs):
            last[s] = i
    gone: dict = {}
    for s, i in last.items():
        if s not in keep and s not in p.consts:
            gone.setdefault(i, []).append(s)
    return gone


def same(a, b) -> bool:
    """Guard comparison: equal, NaN equal to NaN."""
    return a == b or (a != a and b != b)


class Names:
    """Names for the objects generated code refers to (its globals)."""

    def __init__(self, p, ns: dict):
        self.ns, self.ids = ns, {}
        self.var = {s: f"a{s}" for s in range(max(p.avals, default=-1) + 1)}
        for s, c in p.consts.items():
            self.var[s] = f"c{s}"
            ns[f"c{s}"] = c

    def obj(self, x: Any) -> str:
        name = self.ids.get(id(x))
        if name is None:
            name = self.ids[id(x)] = f"_k{len(self.ids)}"
            self.ns[name] = x
        return name

    def lit(self, t: Any) -> str:
        """Python source for an argument template (Refs as variables)."""
        return template_source(t, self.var, self._leaf)

    def _leaf(self, t: Any) -> str:
        tp = type(t)
        if t is None or t is Ellipsis or tp in (bool, int, str) or (
                tp is float and math.isfinite(t)):
            return repr(t)
        return self.obj(t)

    def call(self, args: tuple, kwargs: dict) -> str:
        parts = [self.lit(a) for a in args] + [f"{k}={self.lit(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)


# Results smaller than this (elements) take a new buffer: a small one comes from the
# allocator's free lists as cheaply, and MKL's in-place bias add (a rank-1 GEMM) pays a
# ctypes call that NumPy's add does not.
REUSE_MIN = 1 << 15


def reuse_plan(p, gone: dict) -> dict:
    """Equation index -> the slot an element-wise step writes its result into (``out=``).

    The slot is an argument of the step read there for the last time, of the
    result's shape and dtype, a buffer the program owns (``p.owned``: made by a
    step, sharing memory with nothing the caller holds), and every slot that may
    share its memory is dead by then. The ufunc computes the same values into
    it; the buffer, still in cache, is not allocated again.
    """
    owned = getattr(p, "owned", frozenset())
    if not owned:
        return {}
    from .graph import _fresh
    # slot -> the owned buffers it may be a view of (through reshapes, indexing, writes)
    views: dict = {}
    for eq in p.eqs:
        if _fresh(eq) or (eq.outs and eq.outs[0] in owned):
            continue
        over = set()
        for r in (*eq.refs(), *eq.writes):
            over |= views.get(r, set()) | ({r} if r in owned else set())
        for o in eq.outs:
            views.setdefault(o, set()).update(over)
    viewers: dict = {}
    for v, bases in views.items():
        for b in bases:
            viewers.setdefault(b, []).append(v)
    last = {s: i for i, dead in gone.items() for s in dead}
    out: dict = {}
    for i, eq in enumerate(p.eqs):
        if not _writes_out(eq) or i not in gone:
            continue
        aval = p.avals[eq.outs[0]]
        if math.prod(aval[0]) < REUSE_MIN:
            continue
        for a in eq.args:
            s = a.slot if type(a) is Ref else None
            if (s in owned and s in gone[i] and p.avals[s] == aval and s not in out.values()
                    and all(last.get(m, len(p.eqs)) <= i for m in viewers.get(s, ()))):
                out[i] = s
                break
    return out


def _writes_out(eq) -> bool:
    """An element-wise ufunc step taking ``out=`` (a DIRECT primitive, a fused kernel)."""
    if len(eq.outs) != 1 or eq.scalar or eq.writes or eq.seq:
        return False
    kind = eq.op[0]
    if kind == "fused":
        return True
    return kind == "prim" and eq.op[1] in DIRECT and not eq.kwargs


# Results of at least this many bytes go to the workspace: glibc serves smaller blocks
# from memory it keeps, and maps larger ones afresh (its mmap threshold starts at 128 KiB)
# or returns them to the system when freed, so each call page-faults them in again.
WORKSPACE_MIN = 1 << 17
WORKSPACE_MAX = 64 << 20  # bytes of workspace a compiled program keeps at most


class Workspace:
    """The buffers a compiled program writes its large intermediate results into,
    kept between calls.

    One set per call in flight: :meth:`take` hands out a free set (a new one when
    none is free: calls on several threads, a chunked replay's blocks), :meth:`give`
    takes it back; a call that raises just drops its set. Results whose lives
    do not overlap share a buffer.
    """

    KEEP = 4  # free sets kept at most

    def __init__(self, buffers: list, views: list):
        self.buffers = buffers  # (elements, dtype) of each flat buffer
        self.views = views      # (buffer index, shape, order) of each result written here
        self.free: list = []

    def take(self) -> list:
        try:
            return self.free.pop()
        except IndexError:
            flats = [numpy.empty(n, dtype) for n, dtype in self.buffers]
            return [flats[b][:math.prod(shape)].reshape(shape) if order is None else
                    numpy.transpose(flats[b][:math.prod(shape)].reshape(
                        tuple(shape[i] for i in order)), numpy.argsort(order))
                    for b, shape, order in self.views]

    def give(self, arrays: list) -> None:
        if len(self.free) < self.KEEP:
            self.free.append(arrays)


def _takes_out(eq, run: Callable | None) -> bool:
    """A step that computes its result into an ``out=`` of its shape and dtype where
    given: an element-wise ufunc or fused kernel, an einsum (``run``) run as one matmul."""
    if _writes_out(eq):
        return True
    return (run is not None and len(eq.outs) == 1 and not (eq.writes or eq.scalar or eq.seq)
            and getattr(getattr(run, "func", None), "takes_out", False))


def workspace_plan(p, gone: dict, into: dict, runners: dict) -> tuple:
    """Which results go to the workspace: ``({equation index: view index}, Workspace)``.

    A result goes there when its step takes ``out=`` (:func:`_takes_out`), its
    buffer is the program's own (``p.owned``) and of at least
    :data:`WORKSPACE_MIN` bytes, and no output may share its memory (through
    views, or a step that writes into it in place, ``into``): the caller never
    holds workspace memory. A buffer serves a new result once every slot that
    may share its memory is dead, up to :data:`WORKSPACE_MAX` bytes in all.
    """
    owned = getattr(p, "owned", frozenset())
    if not owned or p.device != "cpu" or set(p.devices) != {"numpy"}:
        return {}, None
    layouts = getattr(p, "layouts", {})  # layouts.transposed_products
    from .graph import alias_groups
    group = alias_groups(p, owned, into)
    held = {group[o.slot] for o in p.outputs if type(o) is Ref}
    last = {s: i for i, dead in gone.items() for s in dead}
    end: dict = {}  # alias group -> the step after which all its slots are dead
    for s, g in group.items():
        end[g] = max(end.get(g, -1), last.get(s, len(p.eqs)))
    plan, buffers, views, busy, total = {}, [], [], [], 0  # busy: buffer -> group using it
    for i, eq in enumerate(p.eqs):
        if i in into or not _takes_out(eq, runners.get(i)) or eq.outs[0] not in owned:
            continue
        shape, dtype = p.avals[eq.outs[0]][:2]
        dtype = numpy.dtype(dtype)
        size = math.prod(shape)
        g = group[eq.outs[0]]
        if size * dtype.itemsize < WORKSPACE_MIN or g in held:
            continue
        b = next((b for b, (n, dt) in enumerate(buffers) if dt == dtype and n >= size
                  and end[busy[b]] < i), None)
        if b is None:
            if total + size * dtype.itemsize > WORKSPACE_MAX:
                continue
            b = len(buffers)
            buffers.append((size, dtype))
            busy.append(g)
            total += size * dtype.itemsize
        busy[b] = g
        plan[i] = len(views)
        # an element-wise result of a transposed component in a buffer of its layout
        # (an einsum's plan lays out its own: it takes the buffer's memory as it is)
        order = layouts.get(eq.outs[0]) if eq.op != ("prim", "einsum") else None
        views.append((b, tuple(shape), order))
    return plan, (Workspace(buffers, views) if plan else None)


def compile_program(p) -> Callable:
    """The program as ``run(*input_arrays) -> [output leaves]``."""
    ns: dict = {"_GuardFailed": GuardFailed, "_same": same, "_asarray": numpy.asarray}
    n = Names(p, ns)
    lines = [f"def run({', '.join(n.var[s] for s in p.inputs)}):"]
    gone = last_uses(p)
    into = reuse_plan(p, gone)
    runners = {i: einsum_runner(eq, p) for i, eq in enumerate(p.eqs)
               if eq.op == ("prim", "einsum")}
    kept, workspace = workspace_plan(p, gone, into, runners)
    if workspace is not None:
        ns["_workspace"] = workspace
        lines.append("    _w = _workspace.take()")
    for i, eq in enumerate(p.eqs):
        out = n.var[into[i]] if i in into else f"_w[{kept[i]}]" if i in kept else None
        lines += ["    " + line for line in replay_lines(eq, i, n, p, out, runners.get(i))]
        if i in gone:
            lines.append("    del " + ", ".join(n.var[s] for s in gone[i]))
    if workspace is not None:
        lines.append("    _workspace.give(_w)")
    outs = [n.var[o.slot] if type(o) is Ref else n.obj(o) for o in p.outputs]
    lines.append(f"    return [{', '.join(outs)}]")
    text = "\n".join(lines)
    exec(compile(text, f"<program {p.name}>", "exec"), ns)
    ns["run"].source = text
    return ns["run"]


def replay_lines(eq, i: int, n: Names, p, into: str | None = None,
                 runner: Callable | None = None) -> list:
    """The source lines of equation ``i``; ``into``: where to write the result (the
    variable of a dead slot, a workspace buffer); ``runner``: an einsum's plan."""
    op, kind = eq.op, eq.op[0]
    out = "" if into is None else f", out={into}"
    if kind == "guard":
        conv = n.obj(CONVERT[op[1]])
        extra = "".join(", " + n.lit(a) for a in eq.kwargs["args"])
        return [f"if not _same({conv}({n.lit(eq.args[0])}{extra}), "
                f"{n.obj(eq.kwargs['expected'])}):",
                f"    raise _GuardFailed({i})"]
    if kind == "setitem":
        x, index, v = eq.args
        return [f"{n.lit(x)}[{n.lit(index)}] = {n.lit(v)}"]
    if kind == "getitem":
        expr = f"{n.lit(eq.args[0])}[{n.lit(eq.args[1])}]"
    elif kind == "method":
        expr = f"{n.lit(eq.args[0])}.{op[1]}({n.call(eq.args[1:], eq.kwargs)})"
    elif kind == "attr":
        expr = f"{n.lit(eq.args[0])}.{op[1]}"
    elif op == ("prim", "einsum"):
        expr = _einsum(eq, n, runner or einsum_runner(eq, p), out)
    elif kind == "prim" and op[1] in DIRECT and not eq.kwargs:
        # The impl looks its backend up on every call; here it is known: bound once.
        name, extra = DIRECT[op[1]]
        fn = getattr(device_backend(p.device), name)
        expr = f"{n.obj(fn)}({n.call(eq.args, {})}{extra}{out})"
    elif kind == "fused":
        expr = f"{n.obj(eq.fn)}({n.call(eq.args, {})}{out})"
    else:
        expr = f"{n.obj(eq.fn)}({n.call(eq.args, eq.kwargs)})"
    return assignment(expr, eq, n.var, "_asarray")


def _einsum(eq, n: Names, run: Callable, out: str = "") -> str:
    """An einsum calls its plan directly (:func:`einsum_runner`)."""
    arrays = "(" + "".join(n.lit(a) + ", " for a in eq.args) + ")"
    order = eq.kwargs.get("order") if "run" not in eq.kwargs else None
    return f"{n.obj(run)}({arrays}" + (f", {n.lit(order)}" if order is not None else "") + f"{out})"


def einsum_runner(eq, p) -> Callable:
    """What an einsum step calls: the plan the engine made (``run``), else the one
    ``contract`` would look up, made here once."""
    run = eq.kwargs.get("run")
    return run if run is not None else auto_plan(eq.kwargs["spec"], eq.args, p)


def auto_plan(spec, args: tuple, p):
    shapes = [p.avals[a.slot][0] for a in args]
    dtypes = [p.avals[a.slot][1] for a in args]
    cast = numpy.result_type(*dtypes) if len(set(dtypes)) > 1 else None
    return Plan(spec, shapes, AUTO, cast).bind(device_backend(p.device))
