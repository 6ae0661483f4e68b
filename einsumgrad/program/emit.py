"""A program as standalone Python source: NumPy and opt_einsum, nothing of einsumgrad.

Each primitive has an emitter (:data:`EMITTERS`, keyed by the primitive's
name) that writes its impl's values in plain NumPy: an expression, with
helper functions (:data:`HELPERS`) where one line cannot say it. The
array-level steps the rules recorded (ufuncs, NumPy functions, methods,
indexing) are NumPy already and print as they ran; a backend's extras (erf,
the normal CDF, MKL's GEMM, numba's layer norm) get NumPy helpers.
Constants are embedded bit for bit (base64). A primitive without an emitter
raises ``NotImplementedError`` naming it: add one with :func:`emitter`.
"""
from __future__ import annotations

import base64
import math
from typing import Callable

import numpy

from ..plan import letters_of
from ..pytree import TreeDef
from .trace import Ref, assignment, compact, template_source

EMITTERS: dict = {}
"""Primitive name -> ``fn(e, eq) -> expression`` (see :class:`Emitter`)."""


def emitter(*names: str) -> Callable:
    """Register a NumPy emitter for the primitives ``names``: ``fn(e, eq)``
    returns a Python expression for the equation's result (``e.arg(k)`` the
    source of input k, ``e.param(name)`` of a parameter, ``e.need(helper)``
    to use a helper function of :data:`HELPERS`)."""
    def register(fn: Callable) -> Callable:
        for n in names:
            EMITTERS[n] = fn
        return fn
    return register


class Emitter:
    """What an emitter writes with: sources of arguments and parameters."""

    def __init__(self, p, var: dict):
        self.p, self.var, self.helpers = p, var, []

    def need(self, name: str) -> str:
        for dep in HELPER_DEPS.get(name, ()):
            self.need(dep)
        if name not in self.helpers:
            self.helpers.append(name)
        return name

    def lit(self, t) -> str:
        """Source for a template value: Refs as variables, statics as literals."""
        return template_source(t, self.var, self._leaf)

    def _leaf(self, t) -> str:
        tp = type(t)
        if t is None or tp in (bool, int, str):
            return repr(t)
        if t is Ellipsis:
            return "..."
        if tp is float:
            return repr(t) if math.isfinite(t) else \
                ("math.nan" if t != t else ("math.inf" if t > 0 else "-math.inf"))
        if tp is slice:
            return f"slice({self.lit(t.start)}, {self.lit(t.stop)}, {self.lit(t.step)})"
        if isinstance(t, numpy.dtype):
            return f"np.dtype({t.str!r})"
        if isinstance(t, type) and issubclass(t, numpy.generic):
            return f"np.{t.__name__}"
        if t in (float, int, bool, complex):
            return t.__name__
        if isinstance(t, numpy.generic):
            return f"np.{type(t).__name__}({self.lit(t.item())})"
        raise NotImplementedError(f"a parameter of type {tp.__name__} ({t!r:.60}) has no "
                                  f"NumPy source")

    def args(self, eq) -> list:
        return [self.lit(a) for a in eq.args]

    def call(self, eq, skip: tuple = ()) -> str:
        """``args, k=v`` for the equation's arguments (keywords in ``skip`` left out)."""
        parts = self.args(eq) + [f"{k}={self.lit(v)}" for k, v in eq.kwargs.items()
                                  if k not in skip]
        return ", ".join(parts)

    def aval(self, t):
        return self.p.avals[t.slot]


# -- primitives ----------------------------------------------------------------------

_UFUNC_PRIMS = {"add": "np.add", "sub": "np.subtract", "mul": "np.multiply",
                "div": "np.true_divide", "pow": "np.power", "maximum": "np.maximum",
                "minimum": "np.minimum", "remainder": "np.remainder", "add_bias": "np.add",
                "neg": "np.negative", "exp": "np.exp", "log": "np.log", "sin": "np.sin",
                "cos": "np.cos", "tanh": "np.tanh", "sqrt": "np.sqrt", "abs": "np.abs",
                "copy": "np.copy"}


@emitter(*_UFUNC_PRIMS)
def _ufunc_prim(e, eq):
    return f"{_UFUNC_PRIMS[eq.op[1]]}({', '.join(e.args(eq))})"


@emitter("identity")
def _identity(e, eq):
    return e.args(eq)[0]


@emitter("einsum")
def _einsum(e, eq):
    return f"{e.need('_einsum')}({letters_of(eq.kwargs['spec'])!r}, {', '.join(e.args(eq))})"


@emitter("broadcast_to", "reshape")
def _shape(e, eq):
    fn = "np.broadcast_to" if eq.op[1] == "broadcast_to" else "np.reshape"
    return f"{fn}({e.args(eq)[0]}, {e.lit(eq.kwargs['shape'])})"


@emitter("astype")
def _astype(e, eq):
    return f"{e.args(eq)[0]}.astype({e.lit(eq.kwargs['dtype'])})"


@emitter("concatenate")
def _concatenate(e, eq):
    return f"np.concatenate([{', '.join(e.args(eq))}], axis={eq.kwargs['axis']})"


@emitter("pad")
def _pad(e, eq):
    width = eq.kwargs["width"]
    full = ((0, 0),) * (len(e.aval(eq.args[0])[0]) - len(width)) + tuple(width)
    return f"np.pad({e.args(eq)[0]}, {full!r})"


def _stand_in(index, p):
    """``index`` with each Ref an array of its shape and dtype (for static analysis)."""
    if type(index) is Ref:
        shape, dtype = p.avals[index.slot]
        return numpy.lib.stride_tricks.as_strided(numpy.zeros(1, dtype), shape,
                                                  (0,) * len(shape))
    if type(index) is tuple:
        return tuple(_stand_in(i, p) for i in index)
    return index


def _index_plan(e, eq, ndim_moved: int):
    """``(full index source, perm or None, advanced)`` for getitem / scatter / assign."""
    from ..rules.shape import _advanced, _as_tuple, _numpy_lead
    index, nb = eq.kwargs["index"], eq.kwargs["nb"]
    real = _stand_in(index, e.p)
    lead = _numpy_lead(real, nb)
    full = e.lit((slice(None),) * nb + (index if type(index) is tuple else (index,)))
    return full, lead, bool(_advanced(_as_tuple(real))[0])


@emitter("getitem")
def _getitem(e, eq):
    nb = eq.kwargs["nb"]
    out_ndim = len(e.p.avals[eq.outs[0]][0])
    if not nb:
        return f"{e.args(eq)[0]}[{e.lit(eq.kwargs['index'])}]"
    full, lead, _ = _index_plan(e, eq, out_ndim)
    y = f"{e.args(eq)[0]}[{full}]"
    if not lead:
        return y
    perm = tuple(range(lead, lead + nb)) + tuple(range(lead)) + tuple(range(lead + nb, out_ndim))
    return f"np.transpose({y}, {perm!r})"


@emitter("scatter_add")
def _scatter_add(e, eq):
    nb, shape = eq.kwargs["nb"], eq.kwargs["shape"]
    g_ndim = len(e.aval(eq.args[0])[0])
    full, lead, advanced = _index_plan(e, eq, g_ndim)
    perm = None if not lead else \
        tuple(range(nb, nb + lead)) + tuple(range(nb)) + tuple(range(nb + lead, g_ndim))
    return (f"{e.need('_scatter_add')}({e.args(eq)[0]}, {shape!r}, {full}, {perm!r}, "
            f"{advanced})")


@emitter("assign")
def _assign(e, eq):
    nb = eq.kwargs["nb"]
    v_ndim = len(e.aval(eq.args[1])[0])
    full, lead, _ = _index_plan(e, eq, v_ndim)
    perm = None if not (lead and v_ndim) else \
        tuple(range(nb, nb + lead)) + tuple(range(nb)) + tuple(range(nb + lead, v_ndim))
    x, v = e.args(eq)
    return f"{e.need('_assign')}({x}, {v}, {full}, {perm!r})"


@emitter("where")
def _where(e, eq):
    x, y = e.args(eq)
    return f"np.where({e.lit(eq.kwargs['cond'])}, {x}, {y})"


@emitter("relu")
def _relu(e, eq):
    return f"np.maximum({e.args(eq)[0]}, 0)"


@emitter("softplus")
def _softplus(e, eq):
    x = e.args(eq)[0]
    return f"np.logaddexp(0, {x}).astype({x}.dtype, copy=False)"


@emitter("sigmoid", "erf", "normal_pdf")
def _unary_helper(e, eq):
    return f"{e.need('_' + eq.op[1])}({e.args(eq)[0]})"


@emitter("gelu")
def _gelu(e, eq):
    return f"np.multiply(np.maximum({e.args(eq)[0]}, -40.0), {e.lit(eq.kwargs['cdf'])})"


@emitter("gelu_d")
def _gelu_d(e, eq):
    return f"{e.need('_gelu_d')}({e.args(eq)[0]}, {e.lit(eq.kwargs['cdf'])})"


@emitter("max", "prod")
def _reduce(e, eq):
    fn = "np.max" if eq.op[1] == "max" else "np.prod"
    return f"{fn}({e.args(eq)[0]}, axis={eq.kwargs['axes']!r})"


@emitter("var")
def _var(e, eq):
    return f"np.var({e.args(eq)[0]}, axis={eq.kwargs['axes']!r}, ddof={eq.kwargs['ddof']!r})"


@emitter("scan")
def _scan(e, eq):
    return f"{e.need('_scan')}({', '.join(e.args(eq))})"


@emitter("batch_norm")
def _batch_norm(e, eq):
    stats = eq.kwargs.get("stats")
    if stats is not None:
        return f"{e.lit(stats)}[0]"
    x, w, b = e.args(eq)
    return f"{e.need('_layer_norm')}({x}, {w}, {b}, {eq.kwargs['axes']!r}, {eq.kwargs['eps']!r})"


@emitter("cumsum")
def _cumsum(e, eq):
    return f"np.cumsum({e.args(eq)[0]}, axis={eq.kwargs['axis']!r})"


@emitter("spread")
def _spread(e, eq):
    axes = eq.kwargs["axes"]
    return f"np.multiply(np.expand_dims({e.args(eq)[0]}, {axes!r}), {e.lit(eq.kwargs['mask'])})"


@emitter("softmax", "log_softmax")
def _softmax(e, eq):
    return f"{e.need('_' + eq.op[1])}({e.args(eq)[0]}, {eq.kwargs['axis']!r})"


@emitter("attention")
def _attention(e, eq):
    q, k, v = e.args(eq)
    return f"{e.need('_attention')}({q}, {k}, {v}, {eq.kwargs['scale']!r})"


@emitter("normalize")
def _normalize(e, eq):
    stats = eq.kwargs.get("stats")
    if stats is not None:
        return f"{e.lit(stats)}[0]"
    return f"{e.need('_normalize')}({e.args(eq)[0]}, {eq.kwargs['axes']!r}, {eq.kwargs['eps']!r})"


@emitter("inv_std")
def _inv_std(e, eq):
    value = eq.kwargs.get("value")
    if value is not None:
        return e.lit(value)
    return f"{e.need('_inv_std')}({e.args(eq)[0]}, {eq.kwargs['axes']!r}, {eq.kwargs['eps']!r})"


@emitter("layer_norm")
def _layer_norm(e, eq):
    stats = eq.kwargs.get("stats")
    if stats is not None:
        return f"{e.lit(stats)}[0]"
    x, w, b = e.args(eq)
    return (f"{e.need('_layer_norm')}({x}, {w}, {b}, {eq.kwargs['axes']!r}, "
            f"{eq.kwargs['eps']!r})")


def _window(eq, *names) -> str:
    return ", ".join(f"{eq.kwargs.get(n, (1, 1))!r}" for n in names)


@emitter("patches")
def _patches(e, eq):
    x = e.args(eq)[0]
    return f"{e.need('_patches')}({x}, {_window(eq, 'kernel', 'stride', 'padding', 'dilation')})"


@emitter("unpatch")
def _unpatch(e, eq):
    g = e.args(eq)[0]
    return (f"{e.need('_unpatch')}({g}, {eq.kwargs['size']!r}, "
            f"{_window(eq, 'kernel', 'stride', 'padding', 'dilation')})")


@emitter("patch_einsum")
def _patch_einsum(e, eq):
    x, o = e.args(eq)
    kept = eq.kwargs.get("patches")
    pat = e.lit(kept) if kept is not None else \
        f"{e.need('_patches')}({x}, {_window(eq, 'kernel', 'stride', 'padding', 'dilation')})"
    return f"{e.need('_einsum')}({letters_of(eq.kwargs['spec'])!r}, {pat}, {o})"


@emitter("unpatch_einsum")
def _unpatch_einsum(e, eq):
    a, b = e.args(eq)
    r = f"{e.need('_einsum')}({letters_of(eq.kwargs['spec'])!r}, {a}, {b})"
    return (f"{e.need('_unpatch')}({r}, {eq.kwargs['size']!r}, "
            f"{_window(eq, 'kernel', 'stride', 'padding', 'dilation')})")


# -- helpers: plain NumPy ---------------------------------------------------------------

HELPERS = {
    "_einsum": '''
def _einsum(spec, *ops):
    return np.asarray(oe.contract(spec, *ops))
''',
    "_same": '''
def _same(a, b):
    return a == b or (a != a and b != b)
''',
    "_erf": '''
_erf_each = np.vectorize(math.erf, otypes=[np.float64])


def _erf(x):
    x = np.asarray(x)
    return _erf_each(x).astype(x.dtype, copy=False)
''',
    "_normal_cdf": '''
def _normal_cdf(x):
    return (0.5 * (1.0 + _erf(x * math.sqrt(0.5)))).astype(x.dtype, copy=False)
''',
    "_normal_pdf": '''
def _normal_pdf(x):
    return (np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)).astype(x.dtype, copy=False)
''',
    "_sigmoid": '''
def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)
''',
    "_gelu_d": '''
def _gelu_d(x, cdf):
    xc = np.clip(x, -40.0, 40.0)
    return _normal_pdf(xc) * xc + cdf
''',
    "_softmax": '''
def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(m == -math.inf, 0, m))
    return e / np.sum(e, axis=axis, keepdims=True)
''',
    "_log_softmax": '''
def _log_softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    r = x - np.where(m == -math.inf, 0, m)
    r = r.astype(np.result_type(r.dtype, 1.0), copy=False)
    return r - np.log(np.sum(np.exp(r), axis=axis, keepdims=True))
''',
    "_attention": '''
def _attention(q, k, v, scale):
    return np.matmul(_softmax(np.matmul(q, np.swapaxes(k, -1, -2)) * scale, -1), v)
''',
    "_inv_std": '''
def _inv_std(x, axes, eps):
    d = x - np.mean(x, axis=axes, keepdims=True)
    return 1.0 / np.sqrt(np.mean(d * d, axis=axes, keepdims=True) + eps)
''',
    "_normalize": '''
def _normalize(x, axes, eps):
    return (x - np.mean(x, axis=axes, keepdims=True)) * _inv_std(x, axes, eps)
''',
    "_layer_norm": '''
def _layer_norm(x, w, b, axes, eps):
    return _normalize(x, axes, eps) * w + b
''',
    "_layer_norm_kernel": '''
def _layer_norm_kernel(x, n, eps, weight=None, bias=None):
    rows = x.reshape(-1, n)
    d = rows - rows.mean(axis=1, keepdims=True)
    s = 1.0 / np.sqrt((d * d).mean(axis=1) + eps)
    xhat = (d * s[:, None]).astype(x.dtype, copy=False).reshape(x.shape)
    s = s.astype(x.dtype, copy=False)
    if weight is None:
        return xhat, s
    y = (xhat.reshape(-1, n) * weight.reshape(-1) + bias.reshape(-1)).reshape(x.shape)
    return y, xhat, s
''',
    "_batch_norm_kernel": '''
def _batch_norm_kernel(x, weight, bias, eps, relu=False):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, dtype=np.float64)
    d = x - mean.astype(x.dtype).reshape(shape)
    var = (d * d).mean(axis=axes, dtype=np.float64).astype(x.dtype)
    s = (1 / np.sqrt(var + eps)).astype(x.dtype)
    y = d * (s * weight.reshape(-1)).reshape(shape) + bias.reshape(shape)
    if relu:
        y = np.maximum(y, 0)
    return y.astype(x.dtype), mean.astype(x.dtype), var, s
''',
    "_scatter_add": '''
def _scatter_add(g, shape, index, perm, advanced):
    z = np.zeros(shape, dtype=g.dtype)
    if perm is not None:
        g = np.transpose(g, perm)
    if advanced:
        np.add.at(z, index, g)
    else:
        z[index] = g
    return z
''',
    "_assign": '''
def _assign(x, v, index, perm):
    out = x.copy()
    out[index] = np.transpose(v, perm) if perm is not None else v
    return out
''',
    "_patches": '''
def _patches(x, kernel, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = np.pad(x, ((0, 0),) * (x.ndim - 2) + ((ph, ph), (pw, pw)))
    h, w = x.shape[-2:]
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    *lead, s_h, s_w = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, x.shape[:-2] + (oh, ow, kh, kw), tuple(lead) + (s_h * sh, s_w * sw, s_h * dh, s_w * dw))
    return view.copy()
''',
    "_unpatch": '''
def _unpatch(g, size, kernel, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    (h, w), (oh, ow) = size, g.shape[-4:-2]
    z = np.zeros(g.shape[:-4] + (h + 2 * ph, w + 2 * pw), dtype=g.dtype)
    for k in range(kh):
        for l in range(kw):
            i, j = k * dh, l * dw
            z[..., i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += g[..., k, l]
    return z[..., ph:ph + h, pw:pw + w]
''',
    "_scan": '''
def _scan(a, b):
    dtype = np.result_type(a, b)
    a, b = np.broadcast_arrays(a, b)
    h = np.moveaxis(b, -1, 0).astype(dtype)
    a = np.moveaxis(a, -1, 0)
    for k in range(1, h.shape[0]):
        h[k] += a[k] * h[k - 1]
    return np.moveaxis(h, 0, -1)
''',
    "_matmul_add": '''
def _matmul_add(a, b, c):
    c += a @ b
''',
}
HELPER_DEPS = {"_normal_cdf": ("_erf",), "_gelu_d": ("_normal_pdf",), "_attention": ("_softmax",),
               "_normalize": ("_inv_std",), "_layer_norm": ("_normalize",)}

# A backend's functions that are not NumPy's, in NumPy.
BACKEND = {"erf": "_erf", "normal_cdf": "_normal_cdf", "matmul_add": "_matmul_add",
           "layer_norm": "_layer_norm_kernel", "batch_norm": "_batch_norm_kernel"}
BACKEND_EXPR = {"add_at": "np.add.at", "as_strided": "np.lib.stride_tricks.as_strided",
                "to_numpy": "np.asarray"}


# -- the whole program ------------------------------------------------------------------

def _step(e: Emitter, eq, i: int) -> list:
    op, kind = eq.op, eq.op[0]
    if kind == "fused":  # the steps the kernel runs, one NumPy line each
        return [line for inner in eq.inner for line in _step(e, inner, i)]
    if kind == "prim":
        fn = EMITTERS.get(op[1])
        if fn is None:
            raise NotImplementedError(f"primitive {op[1]!r} has no NumPy emitter: register one "
                                      f"with einsumgrad.program.emit.emitter({op[1]!r})")
        expr = fn(e, eq)
    elif kind == "guard":
        conv = {"bool": "bool", "float": "float", "int": "int", "index": "int",
                "complex": "complex"}.get(op[1])
        x = e.lit(eq.args[0])
        got = f"{conv}({x})" if conv else f"{x}.item({', '.join(map(e.lit, eq.kwargs['args']))})"
        return [f"if not {e.need('_same')}({got}, {e.lit(eq.kwargs['expected'])}):",
                f"    raise ValueError({'traced where ' + eq.kwargs['where']!r} "
                f"' gave {eq.kwargs['expected']!r}; these inputs take another branch')"]
    elif kind == "setitem":
        x, index, v = eq.args
        return [f"{e.lit(x)}[{e.lit(index)}] = {e.lit(v)}"]
    elif kind == "getitem":
        expr = f"{e.lit(eq.args[0])}[{e.lit(eq.args[1])}]"
    elif kind == "method":
        rest = [e.lit(a) for a in eq.args[1:]] + [f"{k}={e.lit(v)}" for k, v in eq.kwargs.items()]
        expr = f"{e.lit(eq.args[0])}.{op[1]}({', '.join(rest)})"
    elif kind == "attr":
        expr = f"{e.lit(eq.args[0])}.{op[1]}"
    else:
        expr = f"{_callee(e, op)}({e.call(eq)})"
    return assignment(expr, eq, e.var, "np.asarray")


def _callee(e: Emitter, op: tuple) -> str:
    kind = op[0]
    if kind == "ufunc":
        uf, method = op[1], op[2]
        if getattr(numpy, uf.__name__, None) is uf:
            name = f"np.{uf.__name__}"
        elif uf.__name__ == "erf":
            name = e.need("_erf")
        else:
            raise NotImplementedError(f"ufunc {uf.__name__!r} is not NumPy's")
        return name if method == "__call__" else f"{name}.{method}"
    if kind == "function":
        fn = op[1]
        for mod, prefix in ((numpy, "np"), (numpy.linalg, "np.linalg"), (numpy.fft, "np.fft")):
            if getattr(mod, fn.__name__, None) is fn:
                return f"{prefix}.{fn.__name__}"
        raise NotImplementedError(f"function {fn.__module__}.{fn.__name__} is not NumPy's")
    if kind == "backend":
        attr = op[2]
        if attr in BACKEND:
            return e.need(BACKEND[attr])
        if attr in BACKEND_EXPR:
            return BACKEND_EXPR[attr]
        if callable(getattr(numpy, attr, None)):
            return f"np.{attr}"
        raise NotImplementedError(f"backend function {op[1]}.{attr} has no NumPy source")
    raise NotImplementedError(f"no NumPy source for {op!r}")


def _returned(tree: TreeDef, leaves: list) -> str:
    it = iter(leaves)

    def build(t: TreeDef) -> str:
        if t.kind is None:
            return next(it)
        if t.kind is type(None):
            return "None"
        kids = [build(c) for c in t.children]
        if t.keys is not None:
            return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(t.keys, kids)) + "}"
        if t.kind is list:
            return "[" + ", ".join(kids) + "]"
        return "(" + "".join(k + ", " for k in kids) + ")"  # tuples, namedtuples as tuples
    return build(tree)


def _identifier(name: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_") or "program"
    return "program" if text[0].isdigit() or text == "lambda" else text


def program_source(p) -> str:
    """See :meth:`einsumgrad.program.Program.source`."""
    from .compile import last_uses
    var = {s: f"x{s}" for s in p.inputs}
    var.update({s: f"C{s}" for s in p.consts})
    for s in p.avals:
        var.setdefault(s, f"v{s}")
    e = Emitter(p, var)
    name = _identifier(p.name)
    body = []
    gone = last_uses(p)
    for i, eq in enumerate(p.eqs):
        body += _step(e, eq, i)
        if i in gone:
            body.append("del " + ", ".join(var[s] for s in gone[i]))
    outs = [var[o.slot] if type(o) is Ref else e.lit(o) for o in p.outputs]
    body.append(f"return {_returned(p.out_tree, outs)}")
    consts = []
    for s, c in p.consts.items():
        packed = compact(c)  # a broadcast constant: its one slice, broadcast back
        one = packed[1] if type(packed) is tuple else c
        host = one.view(numpy.ndarray) if isinstance(one, numpy.ndarray) else backend_numpy(one)
        a = numpy.array(host, order="C")  # ascontiguousarray would make a 0-d array 1-d
        data = base64.b64encode(a.tobytes()).decode()
        text = f"_const({data!r}, {a.dtype.str!r}, {a.shape!r})"
        if type(packed) is tuple:
            text = f"np.broadcast_to({text}, {packed[2]!r})"
        consts.append(f"C{s} = {text}")
    lines = [f'"""{name}: generated by einsumgrad from a traced program (NumPy and opt_einsum',
             'only). Inputs: ' + ", ".join(f"{var[s]} {p.avals[s][1]}{list(p.avals[s][0])}"
                                           for s in p.inputs) + '."""',
             "import base64", "import math", "", "import numpy as np", "import opt_einsum as oe",
             "", "", "def _const(data, dtype, shape):",
             "    return np.frombuffer(base64.b64decode(data), dtype=dtype).reshape(shape)", ""]
    lines += consts
    for h in e.helpers:
        lines += ["", HELPERS[h].strip("\n"), ""]
    lines += ["", f"def {name}({', '.join(var[s] for s in p.inputs)}):"]
    lines += ["    " + line for line in body]
    return "\n".join(lines) + "\n"


def backend_numpy(a):
    from ..backends import backend_of
    return backend_of(a).to_numpy(a)
