"""Element-wise chains fused into one numba kernel.

NumPy runs a chain such as ``g * (1 - t * t)`` (tanh's VJP) as one pass over
memory per op, each with its own temporary. Where numba is installed
(``pip install einsumgrad[jit]``; ``EINSUMGRAD_JIT=0`` turns it off), a chain
of element-wise arithmetic primitives (:data:`FUSED`) of one float dtype whose
intermediate results nothing outside it reads (inside, a value may be read by
several of its steps) becomes one ``numba.vectorize`` ufunc:
one pass, inputs broadcast as NumPy broadcasts them. The kernel's source is written to a
cache folder and compiled with numba's disk cache, so a program traced again
(or unpickled) in another process does not compile it again. Without numba,
or on another backend than NumPy's, the chain stays as it is.

The kernel computes the same scalar operations in the same order and dtype
(constants in the kernel take the array's dtype, as NumPy's weak scalars do);
transcendental functions may differ from NumPy's vectorized ones in the last
ulp.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile

import numpy

from .graph import written
from .trace import Eq, Ref

# primitive -> the scalar expression (its inputs {0}, {1}, ...; T the dtype)
SCALAR = {
    "add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
    "pow": "{0} ** {1}", "maximum": "np.maximum({0}, {1})", "minimum": "np.minimum({0}, {1})",
    "neg": "-{0}", "exp": "np.exp({0})", "log": "np.log({0})", "sin": "np.sin({0})",
    "cos": "np.cos({0})", "tanh": "np.tanh({0})", "sqrt": "np.sqrt({0})", "abs": "np.abs({0})",
    "relu": "np.maximum({0}, T(0))",
    # the rule's stable form: exp of a non-positive number only
    "sigmoid": "(T(1) / (T(1) + np.exp(-np.abs({0})))) if {0} >= 0 else "
               "(np.exp(-np.abs({0})) / (T(1) + np.exp(-np.abs({0}))))",
}
# Only arithmetic is fused: it is memory-bound, one pass instead of several pays.
# exp, log, tanh, sin, cos, sqrt and the sigmoid run as NumPy's (with MKL, VML's
# vectorized kernels on MKL's threads), where numba would call scalar libm in a loop:
# measured 2x slower on seed 000's 4096x64 chains. They stay steps of their own.
FUSED = frozenset(("add", "sub", "mul", "div", "maximum", "minimum", "neg", "abs", "relu"))
MIN_STEPS = 2       # a chain of one step is that step
MIN_SIZE = 1 << 10  # smaller outputs: the ufuncs NumPy has are as quick


def available() -> bool:
    from ..backends import kernels
    return kernels.available()


def fuse_elementwise(p) -> None:
    """Fuse element-wise chains of ``p`` in place (see the module docstring)."""
    if p.device != "cpu" or not available() or "numpy" not in p.devices:
        return
    bad, groups = written(p)
    fusable = [_fusable(eq, p) and groups[eq.outs[0]] not in bad
               and not any(groups.get(s) in bad for s in eq.refs()) for eq in p.eqs]
    readers: dict = {}  # slot -> the steps reading it
    for i, eq in enumerate(p.eqs):
        for s in eq.refs():
            readers.setdefault(s, set()).add(i)
    outputs = {o.slot for o in p.outputs if type(o) is Ref}
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
        root_of[i] = (kernels.pop() if s not in outputs and len(kernels) == 1
                      and None not in kernels else i)
    roots: dict = {}
    for i, r in root_of.items():
        roots.setdefault(r, [])
        if i != r:
            roots[r].append(i)
    replaced = {}
    for r, members in roots.items():
        steps = sorted(members + [r])
        if len(steps) < MIN_STEPS or numpy.prod(p.avals[p.eqs[r].outs[0]][0]) < MIN_SIZE:
            continue
        replaced[r] = _fused([p.eqs[i] for i in steps], p)
        for i in members:
            replaced[i] = None
    if replaced:
        p.eqs = [replaced.get(i, eq) for i, eq in enumerate(p.eqs) if replaced.get(i, eq)
                 is not None]


def _fusable(eq: Eq, p) -> bool:
    if eq.op[0] != "prim" or eq.op[1] not in FUSED or eq.kwargs or eq.writes or not eq.outs:
        return False
    dtype = p.avals[eq.outs[0]][1]
    return dtype in (numpy.float32, numpy.float64) and all(
        p.avals[s][1] == dtype for s in eq.refs())


def _fused(steps: list, p) -> Eq:
    """One equation running ``steps`` (in order, the last its root) as one kernel."""
    inside = {eq.outs[0] for eq in steps}
    inputs: list = []
    names: dict = {}
    lines = []
    for k, eq in enumerate(steps):
        args = []
        for a in eq.args:
            s = a.slot
            if s in inside:
                args.append(names[s])
            else:
                if s not in inputs:
                    inputs.append(s)
                args.append(f"i{inputs.index(s)}")
        names[eq.outs[0]] = f"t{k}"
        lines.append(f"    t{k} = {SCALAR[eq.op[1]].format(*args)}")
    root = steps[-1].outs[0]
    dtype = numpy.dtype(p.avals[root][1]).name
    src = kernel_source(dtype, len(inputs), lines)
    kernel = compile_kernel(src)
    return Eq(("fused", src, tuple(eq.op[1] for eq in steps)), kernel,
              tuple(Ref(s) for s in inputs), {}, (root,), scalar=p.avals[root][0] == (),
              inner=list(steps))


def kernel_source(dtype: str, n_inputs: int, lines: list) -> str:
    params = ", ".join(f"i{j}" for j in range(n_inputs))
    sig = f"{dtype}({', '.join([dtype] * n_inputs)})"
    return "\n".join([
        '"""An element-wise chain of an einsumgrad program, fused (generated)."""',
        "import numba", "import numpy as np", "", f"T = np.{dtype}", "", "",
        f"@numba.vectorize([{sig!r}], cache=CACHE)",
        f"def kernel({params}):", *lines, f"    return {lines[-1].split('=')[0].strip()}", ""])


_kernels: dict = {}


def cache_dir() -> str:
    """Where kernel sources (and numba's cache beside them) live:
    ``$EINSUMGRAD_CACHE/fused``, else ``~/.cache/einsumgrad/fused``."""
    base = os.environ.get("EINSUMGRAD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "einsumgrad")
    return os.path.join(base, "fused")


def compile_kernel(src: str):
    """The kernel of this source: loaded from the cache folder (numba's disk cache
    beside it), or compiled in memory where the folder cannot be written."""
    kernel = _kernels.get(src)
    if kernel is not None:
        return kernel
    digest = hashlib.sha1(src.encode()).hexdigest()[:20]
    name = f"einsumgrad_fused_{digest}"
    try:
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name + ".py")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(src.replace("cache=CACHE", "cache=True"))
            os.replace(tmp, path)  # atomic: another process may be writing the same
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # numba's cache finds the kernel's module by name
        spec.loader.exec_module(mod)
    except OSError:
        mod = type(sys)(name)
        exec(compile(src.replace("cache=CACHE", "cache=False"), name, "exec"), mod.__dict__)
    kernel = _kernels[src] = mod.kernel
    return kernel
