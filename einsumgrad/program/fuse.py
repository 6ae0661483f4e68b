"""Element-wise chains fused into one numba kernel.

NumPy runs a chain such as ``g * (1 - t * t)`` (tanh's VJP) as one pass over
memory per op, each with its own temporary. Where numba is installed
(``pip install einsumgrad[jit]``; ``EINSUMGRAD_JIT=0`` turns it off), a chain
of element-wise primitives (:data:`FUSED`; in float64 also exp, log, tanh and
the sigmoid, :data:`VECTOR`) of one float dtype whose intermediate results
nothing outside it reads (inside, a value may be read by several of its steps)
becomes one kernel: one loop nest over the result, in C order, each input read
where it broadcasts. Which axes broadcast where is the trace's (the lengths
are read on each call: a chunked replay runs blocks of the batch): the
result's axes merged where every input spans or broadcasts along both, an
input indexed by the merged axes it spans (a bias by the last, a scalar by
none), so the innermost loop runs over contiguous memory and LLVM makes it
SIMD code (an input laid out otherwise is read through its strides, or copied
where merging its axes needs that). exp, log, tanh and the sigmoid are
:mod:`.vecmath`'s, which vectorize where numba's call libm one element at a
time. ``out=`` (``compile.reuse_plan``) writes the result into a dead input;
a loop of its own then reads that input as the result, so that LLVM sees no
overlap to test for (its test would fall back to scalar code). A constant
broadcast along an axis (stride 0) enters with length 1 there, not merged
into a copy. A large kernel's rows may be shared among a thread per core
(:func:`einsumgrad.backends.threads.rows`): by a ``prange`` twin of its loop
on numba's OpenMP team where MKL runs on the same one, else on einsumgrad's
pool, timed both ways.

The kernel's source is written to a cache folder and compiled with numba's
disk cache (:func:`einsumgrad.backends.compiled.compile_kernel`), so a program
traced again (or unpickled) in another process does not compile it again.
On CuPy's backend a chain is one ``cupy.fuse`` of a function calling the ufuncs
the unfused program calls, in its order (:func:`_fused_gpu`): one CUDA kernel,
whose arithmetic CuPy's compiler may contract into fused multiply-adds.
Without numba on NumPy's backend, or on the strict stand-in, the chain stays
as it is.

The kernel computes the same scalar operations in the same order and dtype
(constants take the array's dtype, as NumPy's weak scalars do), so arithmetic
rounds as NumPy's does; exp, log, tanh and the sigmoid may differ from NumPy's
in the last ulps.
"""
from __future__ import annotations

import copy
import math

import numpy

from ..backends.compiled import compile_kernel
from . import vecmath
from .compile import DIRECT
from .graph import written
from .trace import Eq, Ref

# primitive -> the scalar expression (its inputs {0}, {1}, ...; T the dtype)
SCALAR = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
    "maximum": "np.maximum({0}, {1})", "minimum": "np.minimum({0}, {1})",
    "neg": "-{0}", "sqrt": "np.sqrt({0})", "abs": "np.abs({0})",
    "relu": "np.maximum({0}, T(0))",
    # NumPy's sign of a float: +0.0 at either zero (x - x), NaN at NaN
    "sign": "T(1) if {0} > T(0) else T(-1) if {0} < T(0) else {0} - {0}",
    **{prim: f"{name}({{0}})" for prim, name in vecmath.FUNCTIONS.items()},
}
# Arithmetic (and sqrt, one correctly rounded instruction) fuses in both float dtypes.
FUSED = frozenset(("add", "sub", "mul", "div", "maximum", "minimum", "neg", "abs", "relu",
                   "sqrt", "sign"))
# A rule's own backend ufunc on arrays (relu's derivative, xp.sign(out)), as the step it is:
# the backend functions the primitives' impls are (compile.DIRECT), and sign.
BACKEND = {**{name: prim for prim, (name, extra) in DIRECT.items() if not extra and prim in FUSED},
           "sign": "sign"}
# vecmath's functions fuse in float64 only: they compute in float64, where NumPy's own
# float32 loops have twice the lanes. A step of these joins a kernel only where its
# result is the kernel's size: a value broadcast further would be computed again for
# every element it reaches.
VECTOR = frozenset(vecmath.FUNCTIONS)
MIN_STEPS = 2       # a chain of one step is that step
MIN_SIZE = 1 << 10  # smaller outputs: the ufuncs NumPy has are as quick
VECTOR_COST = 16    # a vecmath function's cost per element, in arithmetic steps (threads.rows)


def available() -> bool:
    from ..backends import kernels
    return kernels.available()


def fuse_elementwise(p) -> None:
    """Fuse element-wise chains of ``p`` in place (see the module docstring)."""
    target = _target(p)
    if target is None:
        return
    bad, groups = written(p)
    fusable = [_fusable(eq, p, target) and groups[eq.outs[0]] not in bad
               and not any(groups.get(s) in bad for s in eq.refs()) for eq in p.eqs]
    readers: dict = {}  # slot -> the steps reading it
    for i, eq in enumerate(p.eqs):
        for s in eq.refs():
            readers.setdefault(s, set()).add(i)
    outputs = {o.slot for o in p.outputs if type(o) is Ref}
    size = lambda i: math.prod(p.avals[p.eqs[i].outs[0]][0])
    # From the last step back: a fusable step joins the kernel of the steps reading its
    # result when they are all fusable and in one kernel (a value read twice inside, as
    # t * t or a tangent used by two products, stays in a register); else it starts
    # one, as its root (the kernel's one result read outside it).
    root_of: dict = {}
    for i in range(len(p.eqs) - 1, -1, -1):
        if not fusable[i]:
            continue
        s = p.eqs[i].outs[0]
        kernels = {root_of.get(r) for r in readers.get(s, ())}
        root = kernels.pop() if len(kernels) == 1 else None
        if root is not None and step(p.eqs[i]) in VECTOR and size(i) != size(root):
            root = None
        root_of[i] = root if s not in outputs and root is not None else i
    roots: dict = {}
    for i, r in root_of.items():
        roots.setdefault(r, [])
        if i != r:
            roots[r].append(i)
    chains = {r: sorted(members + [r]) for r, members in roots.items()
              if len(members) + 1 >= MIN_STEPS and size(r) >= MIN_SIZE}
    if not chains or (target == "numba" and not available()):  # numba: imported only here
        return
    replaced = {}
    for r, steps in chains.items():
        replaced.update((i, None) for i in steps if i != r)
        chain = [p.eqs[i] for i in steps]
        replaced[r] = _fused(chain, p) if target == "numba" else _fused_gpu(chain, p, target)
    p.eqs = [replaced.get(i, eq) for i, eq in enumerate(p.eqs)
             if replaced.get(i, eq) is not None]


def step(eq: Eq) -> str | None:
    """The element-wise step ``eq`` is (a key of :data:`SCALAR`), or None."""
    if eq.op[0] == "prim":
        return eq.op[1]
    if eq.op[0] == "backend" and all(type(a) is Ref for a in eq.args):
        return BACKEND.get(eq.op[2])
    return None


def _target(p):
    """What fuses ``p``'s chains: ``"numba"`` on NumPy's backend, CuPy's module on
    CuPy's (``cupy.fuse``), None elsewhere (the strict stand-in: the chain stays)."""
    if p.device == "cpu" and "numpy" in p.devices:
        return "numba"
    if set(p.devices) == {"cupy"}:
        from ..backends import cupy_backend
        return cupy_backend().module
    return None


def _fusable(eq: Eq, p, target="numba") -> bool:
    if eq.kwargs or eq.writes or len(eq.outs) != 1:
        return False
    dtype = p.avals[eq.outs[0]][1]
    ops = (GPU if target != "numba" else FUSED | VECTOR if dtype == numpy.float64
           else FUSED)
    return step(eq) in ops and dtype in (numpy.float32, numpy.float64) and all(
        p.avals[s][1] == dtype for s in eq.refs())


# On CuPy a chain is its steps' own ufuncs, fused by ``cupy.fuse`` into one CUDA kernel:
# each step the function the unfused program calls (compile.DIRECT), or ``sign``.
GPU = frozenset(prim for prim in FUSED | VECTOR if prim in DIRECT or prim == "sign")
GPU_MARK = "# cupy.fuse\n"  # the first line of a CuPy kernel's source


def _fused_gpu(steps: list, p, xp) -> Eq:
    """One equation running ``steps`` as ``xp.fuse`` of a function calling the same
    ufuncs in the same order (every input, constants too, an argument of it)."""
    inputs, args = _wired(steps)
    lines = []
    for k, (eq, names) in enumerate(zip(steps, args)):
        name, extra = DIRECT.get(step(eq), (step(eq), ""))
        lines.append(f"    t{k} = xp.{name}({', '.join(names)}{extra})")
    src = (GPU_MARK + f"def kernel({', '.join(f'i{k}' for k in range(len(inputs)))}):\n"
           + "\n".join(lines) + f"\n    return t{len(steps) - 1}\n")
    shape = p.avals[steps[-1].outs[0]][0]
    return Eq(("fused", src, tuple(step(eq) for eq in steps)), gpu_kernel(src, xp),
              tuple(Ref(s) for s in inputs), {}, (steps[-1].outs[0],), scalar=shape == (),
              inner=list(steps))


def _wired(steps: list) -> tuple:
    """A chain's inputs from outside (slots, in the order first read) and, per step,
    its arguments' names in the kernel: ``i<k>`` input k, ``t<j>`` step j's result."""
    inside = {eq.outs[0] for eq in steps}
    inputs: list = []
    names: dict = {}
    args = []
    for k, eq in enumerate(steps):
        row = []
        for a in eq.args:
            s = a.slot
            if s in inside:
                row.append(names[s])
            else:
                if s not in inputs:
                    inputs.append(s)
                row.append(f"i{inputs.index(s)}")
        names[eq.outs[0]] = f"t{k}"
        args.append(row)
    return inputs, args


_gpu_kernels: dict = {}  # (source, module) -> kernel


def gpu_kernel(src: str, xp=None):
    """The kernel of a CuPy chain's source: ``kernel(*inputs, out=None)``, the chain's
    function under ``xp.fuse`` (a module without ``fuse`` runs it as it is)."""
    if xp is None:
        from ..backends import cupy_backend
        xp = cupy_backend().module
    kernel = _gpu_kernels.get((src, xp))
    if kernel is None:
        ns = {"xp": xp}
        exec(compile(src, "einsumgrad_fused_gpu", "exec"), ns)
        fused = xp.fuse()(ns["kernel"]) if hasattr(xp, "fuse") else ns["kernel"]

        def kernel(*inputs, out=None):
            result = fused(*inputs)
            if out is None:
                return result
            out[...] = result
            return out
        kernel = _gpu_kernels[(src, xp)] = kernel
    return kernel


def kernel_of(src: str):
    """A fused step's kernel from its source (a program unpickled)."""
    return gpu_kernel(src) if src.startswith(GPU_MARK) else compile_kernel(src)


def _fused(steps: list, p) -> Eq:
    """One equation running ``steps`` (in order, the last its root) as one kernel."""
    inputs, args = _wired(steps)
    lines = [f"t{k} = {SCALAR[step(eq)].format(*names)}"
             for k, (eq, names) in enumerate(zip(steps, args))]
    root = steps[-1].outs[0]
    shape, dtype = p.avals[root]
    steps = _compact_constants(steps, inputs, shape, p)
    consts = {k: _literal(p.consts[s]) for k, s in enumerate(inputs)
              if s in p.consts and numpy.shape(p.consts[s]) == ()}
    src = kernel_source(numpy.dtype(dtype).name, tuple(shape),
                        [p.avals[s][0] for s in inputs], lines, consts,
                        sorted({step(eq) for eq in steps} & VECTOR))
    kernel = compile_kernel(src)
    return Eq(("fused", src, tuple(step(eq) for eq in steps)), kernel,
              tuple(Ref(s) for s in inputs), {}, (root,), scalar=shape == (),
              inner=list(steps))


def _compact_constants(steps: list, inputs: list, shape: tuple, p) -> list:
    """A constant input broadcast along an axis (stride 0: a Jacobian's basis times a
    weight, the same for every sample) becomes one of length 1 there, where another
    input spans that axis of the result: the kernel then reads it as broadcast, where
    merging its axes with their neighbours would copy it whole on every call.
    ``inputs`` is updated; returns ``steps`` reading the new constants."""
    spanned = lambda d, skip: any(  # noqa: E731  result axis d spanned by another input
        s != skip and s not in p.consts and d - len(shape) + len(p.avals[s][0]) >= 0
        and p.avals[s][0][d - len(shape) + len(p.avals[s][0])] != 1 for s in inputs)
    new = {}
    for s in inputs:
        c = p.consts.get(s)
        if type(c) is not numpy.ndarray:
            continue
        lead = len(shape) - c.ndim
        cut = tuple(slice(0, 1) if st == 0 and n > 1 and spanned(lead + d, s) else slice(None)
                    for d, (st, n) in enumerate(zip(c.strides, c.shape)))
        if cut != (slice(None),) * c.ndim:
            slot = max(p.avals) + 1
            p.consts[slot] = c[cut]
            p.avals[slot] = (p.consts[slot].shape, p.avals[s][1])
            new[s] = slot
    if not new:
        return steps
    inputs[:] = [new.get(s, s) for s in inputs]
    moved = []
    for eq in steps:
        eq = copy.copy(eq)
        eq.args = type(eq.args)(Ref(new[a.slot]) if type(a) is Ref and a.slot in new else a
                                for a in eq.args)
        moved.append(eq)
    return moved


def _literal(c) -> str:
    """A 0-d constant as a source literal of the kernel's dtype (``repr`` round-trips)."""
    v = float(c)
    if math.isfinite(v):
        return f"T({v!r})"
    return "T(np.nan)" if v != v else "T(np.inf)" if v > 0 else "T(-np.inf)"


def layout(shape: tuple, shapes: list) -> tuple:
    """The loops of a kernel of result shape ``shape`` over inputs of ``shapes``
    (each broadcasting to it): ``(axes, spans)``, per loop the result's axes it
    runs over (those of length > 1, neighbours merged where every input spans both
    or neither), and per input the loops it spans (``()`` for a scalar)."""
    keep = [d for d, n in enumerate(shape) if n != 1]
    pads = [(1,) * (len(shape) - len(s)) + tuple(s) for s in shapes]
    pats = [[s[d] != 1 for d in keep] for s in pads]
    groups: list = []
    for k in range(len(keep)):
        if groups and all(pt[k] == pt[k - 1] for pt in pats):
            groups[-1].append(k)
        else:
            groups.append([k])
    axes = [tuple(keep[k] for k in g) for g in groups]
    spans = [tuple(g for g, ks in enumerate(groups) if pt[ks[0]]) for pt in pats]
    return axes, spans


def kernel_source(dtype: str, shape: tuple, shapes: list, lines: list, consts: dict,
                  vector: list) -> str:
    """A kernel module's source: ``kernel(i0, i1, ..., out=None)`` computing ``lines``
    (``t0 = ...``, the last the result) over inputs of ``shapes`` broadcast to
    ``shape`` (``consts``: input index -> the literal it is, not read). Lengths are
    read from the inputs on each call (a chunked replay runs a block of the batch);
    which axes broadcast where is the trace's.

    Where the result has two axes or more, a second loop nest runs over the
    reversed axes: a call whose ``out`` (without one, whose first input of the
    result's shape) is laid out in Fortran order, as a product written
    transposed is (:func:`einsumgrad.program.layouts.transposed_products`),
    runs there on the transposed views, so that its innermost loop still runs
    over contiguous memory."""
    n = len(shapes)
    # operations per element, a vecmath function counted as the arithmetic it runs
    cost = len(lines) + VECTOR_COST * sum(
        f"{vecmath.FUNCTIONS[prim]}(" in line for line in lines for prim in vector)
    live = [k for k in range(n) if k not in consts]
    params = ", ".join(f"i{k}" for k in range(n))
    chain = ['@numba.njit(inline="always", error_model="numpy")',
             f"def _chain({', '.join(f'i{k}' for k in live)}):"]
    chain += [f"    i{k} = {lit}" for k, lit in consts.items()]
    chain += ["    " + line for line in lines] + [f"    return {lines[-1].split('=')[0].strip()}"]
    parts = ['"""An element-wise chain of an einsumgrad program, fused (generated)."""\n'
             "import numba\nimport numpy as np\n\n"
             "from einsumgrad.backends.threads import rows as _rows\n\nT = np.%s" % dtype,
             vecmath.source(vector), "\n".join(chain)]
    full = [k for k in live if tuple(shapes[k]) == tuple(shape)]
    if sum(d != 1 for d in shape) < 2:
        return "\n\n\n".join(parts + _frame(shape, shapes, live, cost, params, "")) + "\n"
    # the reversed frame: each input padded to the result's rank, its axes reversed
    pad = lambda s: (1,) * (len(shape) - len(s)) + tuple(s)  # noqa: E731
    back = [() if k in consts or shapes[k] == () else pad(shapes[k])[::-1] for k in range(n)]
    parts += _frame(shape[::-1], back, live, cost, params, "_f")

    def flipped(k, into):  # input k as the reversed frame takes it (into out.T: o_t)
        if k in consts or shapes[k] == ():
            return f"i{k}"
        if len(shapes[k]) == len(shape):  # the same view where it is out: the alias loop
            return f"(o_t if i{k} is out else i{k}.T)" if into and k in full else f"i{k}.T"
        return f"i{k}.reshape({(1,) * (len(shape) - len(shapes[k]))!r} + i{k}.shape).T"
    lead = f"(i{full[0]} if out is None else out)" if full else "out"
    fresh, into = (", ".join(flipped(k, into) for k in range(n)) for into in (False, True))
    dispatch = [f"    if {'' if full else 'out is not None and '}{lead}.flags.f_contiguous"
                f" and not {lead}.flags.c_contiguous:", "        if out is None:",
                f"            return _kernel_f({fresh}).T", "        o_t = out.T",
                f"        _kernel_f({into}, out=o_t)", "        return out"]
    own = _frame(shape, shapes, live, cost, params, "")
    run = own[-1].split("\n")
    own[-1] = "\n".join(run[:1] + dispatch + run[1:])
    return "\n\n\n".join(parts + own) + "\n"


def _frame(shape: tuple, shapes: list, live: list, cost: int, params: str,
           suffix: str) -> list:
    """The loops of a kernel over ``shape`` (:func:`kernel_source`) and the function
    that calls them, ``kernel`` (``_kernel{suffix}`` for another frame): sources."""
    axes, spans = layout(shape, shapes)
    loops = [f"j{g}" for g in range(len(axes))] or ["j0"]
    name = f"_kernel{suffix}" if suffix else "kernel"

    def element(k, alias):  # input k's element in the loop body
        if k == alias:
            return f"o[{', '.join(loops)}]"
        return f"i{k}[{', '.join(loops[g] for g in spans[k])}]" if spans[k] else f"s{k}"

    def loop(fn, alias=None):  # the loop and its prange twin {fn}_team (threads.openmp)
        args = ", ".join(["o"] + [f"i{k}" for k in live if k != alias])
        defs = []
        for team in (False, True):
            body = ['@numba.njit(error_model="numpy", nogil=True, cache=CACHE'
                    + (", parallel=True)" if team else ")"),
                    f"def {fn}{'_team' if team else ''}({args}):", "    _wide()"]
            body += [f"    s{k} = T(i{k})" for k in live if not spans[k] and k != alias]
            for g, j in enumerate(loops):
                over = "numba.prange" if team and g == 0 else "range"
                body.append("    " * (g + 1) + f"for {j} in {over}(o.shape[{g}]):")
                if team and g == 0:
                    # numba compiles a prange's body as a function of its own: the
                    # 512-bit vectors wide() allows must be asked for there too
                    # (without, a vecmath chain ran no faster on two threads than on one)
                    body.append("    " * (g + 2) + "_wide()")
            body.append("    " * (len(loops) + 1) + f"o[{', '.join(loops)}] = _chain("
                        + ", ".join(element(k, alias) for k in live) + ")")
            defs.append("\n".join(body))
        return "\n\n\n".join(defs)

    def length(d):  # the result's axis d, read from an input spanning it
        if shape[d] == 1:
            return "1"
        k = next(k for k in live if len(shapes[k]) + d >= len(shape)
                 and shapes[k][d - len(shape) + len(shapes[k])] != 1)
        return f"i{k}.shape[{d - len(shape) + len(shapes[k])}]"

    def dims(span):
        return "(" + "".join(f"d{g}, " for g in span) + ")"

    def as_is(k):  # input k's own axes are its loops already: passed without a reshape
        own = [d - len(shape) + len(shapes[k]) for g in spans[k] for d in axes[g]]
        return all(len(axes[g]) == 1 for g in spans[k]) and own == list(range(len(shapes[k])))

    def pass_(k):  # input k as the loop takes it
        if not spans[k]:
            return f"float(i{k})" if shapes[k] == () else f"float(i{k}.reshape(()))"
        return f"i{k}" if as_is(k) else f"i{k}.reshape({dims(spans[k])})"

    def call(fn, alias=None):  # the loop, its rows shared among threads where that pays
        args = [k for k in live if k != alias]
        return (f"_rows({fn}, v, (" + "".join(pass_(k) + ", " for k in args) + "), ("
                + "".join(f"{bool(spans[k]) and spans[k][0] == 0}, " for k in args)
                + f"), v.size * {cost}, team={fn}_team)")

    # the result may be written into an input (compile.reuse_plan): the loop then reads
    # it as the result, so that LLVM sees one array and no overlap to test for
    aliases = [k for k in live if spans[k] and tuple(shapes[k]) == tuple(shape)]
    flat = axes and len(axes) == len(shape) and all(len(ax) == 1 for ax in axes)
    run = [f"def {name}({params}, out=None):"]
    run += [f"    n{d} = {length(d)}" for d in range(len(shape))]
    run += [f"    d{g} = {' * '.join(f'n{d}' for d in ax)}" for g, ax in enumerate(axes)]
    shape_src = "(" + "".join(f"n{d}, " for d in range(len(shape))) + ")"
    run += ["    if out is None:", f"        o = np.empty({shape_src}, T)",
            "    elif out.flags.c_contiguous:", "        o = out", "    else:",
            f"        out[...] = {name}({params})", "        return out",
            f"    v = o.reshape({dims(range(len(axes))) if axes else (1,)})" if not flat else
            "    v = o"]
    for k in aliases:
        run += [f"    if o is i{k}:", f"        {call(f'_loop{suffix}_{k}', k)}",
                "        return o"]
    run += [f"    {call(f'_loop{suffix}')}", "    return o"]
    return [loop(f"_loop{suffix}")] + [loop(f"_loop{suffix}_{k}", k) for k in aliases] + [
        "\n".join(run)]
