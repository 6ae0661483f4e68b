"""eg.vmap: JAX's semantics (against jax.vmap in float64), every primitive's batching
rule (against a loop over the examples, hypothesis over the mapped axes), composition
with the transforms in either order, and its errors.

Inputs are built with ``xb`` and results read with ``npy``, so the suite runs on
each backend under test (``EINSUMGRAD_BACKEND=strict`` too).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einsumgrad as eg
from backends import npy, xb
from einsumgrad import rules
import importlib

from einsumgrad.rules import elementwise, norm, reductions, shape
from einsumgrad.rules.shape import bind
from einsumgrad.tensor import Primitive, TracerConversionError
from einsumgrad.vmap import vmap

# rules/__init__ re-exports functions named as these modules: import them by name
einsum_mod, patches, convolution, batch_norm = (
    importlib.import_module(f"einsumgrad.rules.{m}")
    for m in ("einsum", "patches", "convolution", "batch_norm"))

TOL = dict(rtol=1e-9, atol=1e-9)


def rand(seed: int, shape, positive=False) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal(shape)
    return np.abs(a) + 0.5 if positive else a


def loop(f, args, in_axes, out_axes=0):
    """``vmap``'s meaning: ``f`` on each example, results stacked at ``out_axes``."""
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    size = next(np.shape(a)[ax] for a, ax in zip(args, axes) if ax is not None)
    outs = [npy(f(*[T(a) if ax is None else T(np.take(a, b, axis=ax))
                    for a, ax in zip(args, axes)])) for b in range(size)]
    return np.stack(outs, axis=out_axes)


def T(a) -> eg.Tensor:
    """A NumPy array as a Tensor on the backend under test."""
    return eg.tensor(xb(a))


COMPARED = []  # one entry per vmap result compared with the loop (a case must make one)


def check(f, args, in_axes=0, out_axes=0, tol=TOL):
    got = vmap(f, in_axes, out_axes)(*[T(a) for a in args])
    np.testing.assert_allclose(npy(got), loop(f, args, in_axes, out_axes), **tol)
    COMPARED.append(got.shape)


# -- every primitive's batching rule --------------------------------------------------------

def _mapped(data, shape, size, may_skip=True, seed=None):
    """An input of one example's ``shape``: mapped at a drawn axis (the examples'
    axis inserted there), or not mapped (None)."""
    seed = data.draw(st.integers(0, 2 ** 16)) if seed is None else seed
    if may_skip and data.draw(st.booleans()):
        return rand(seed, shape), None
    ax = data.draw(st.integers(0, len(shape)))
    full = list(shape)
    full.insert(ax, size)
    return rand(seed, full), ax - (len(shape) + 1) * data.draw(st.booleans())  # negative too


def _run(data, f, shapes, positive=(), tol=TOL):
    """``vmap(f)`` against the loop, each input mapped at a drawn axis or not mapped
    (one at least mapped), the output's mapped axis at a drawn place."""
    size = data.draw(st.integers(1, 3))
    drawn = [_mapped(data, s, size) for s in shapes]
    if all(ax is None for _, ax in drawn):
        drawn[0] = _mapped(data, shapes[0], size, may_skip=False)
    args = [np.abs(a) + 0.5 if k in positive else a for k, (a, _) in enumerate(drawn)]
    axes = tuple(ax for _, ax in drawn)
    ref = loop(f, args, axes)
    out_axis = data.draw(st.integers(-ref.ndim, ref.ndim - 1))
    got = vmap(f, axes, out_axis)(*[T(a) for a in args])
    np.testing.assert_allclose(npy(got), np.moveaxis(ref, 0, out_axis), **tol)
    COMPARED.append(got.shape)


EINSUMS = ["ij,jk->ik", "i,i->", "bij,bjk->bik", "ii->i", "ij->", "ij,j->i", "i,j->ij",
           "ij->ji", "iij->ji"]


def _einsum_shapes(spec):
    sizes = {c: 2 + (ord(c) % 3) for c in spec}
    ins = spec.split("->")[0].split(",")
    return [tuple(sizes[c] for c in t) for t in ins]


def case_einsum(data):
    spec = data.draw(st.sampled_from(EINSUMS))
    _run(data, lambda *xs: eg.einsum(spec, *xs), _einsum_shapes(spec))


def case_broadcast_to(data):
    _run(data, lambda x: rules.broadcast_to(x, (2, 3, 4)),
         [data.draw(st.sampled_from([(4,), (3, 1), ()]))])


def case_identity(data):
    _run(data, lambda x: bind(shape.identity_p, x), [(2, 3)])


def case_reshape(data):
    target = data.draw(st.sampled_from([(6, 2), (12,), (3, 4), (2, 1, 6)]))
    _run(data, lambda x: x.reshape(target), [(2, 3, 2)])


INDEXES = [(slice(1, None),), (0,), (slice(None, None, -1), 1), (Ellipsis, 0),
           (None, slice(0, 2)), ([0, 2, 2],), (slice(None), [1, 0]), ([0, 1], [2, 0]),
           ([1, 0], slice(None), 0), (1, Ellipsis, [0, 0, 1])]


def _index(idx):
    return tuple(xb(np.array(e)) if isinstance(e, list) else e for e in idx)


def case_getitem(data):
    idx = data.draw(st.sampled_from(INDEXES))
    _run(data, lambda x: x[_index(idx)], [(3, 4, 3)])


def case_getitem_batched_index(data):
    # index arrays that are mapped: each example gathers with its own indices
    size = data.draw(st.integers(1, 3))
    x, xa = _mapped(data, (4, 5), size)
    i = np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, 4, (size, 3))
    pick = data.draw(st.sampled_from(["rows", "cols", "both"]))
    if pick == "rows":
        f = lambda x, i: x[i]  # noqa: E731
    elif pick == "cols":
        f = lambda x, i: x[:, i % 5]  # noqa: E731
    else:
        f = lambda x, i: x[i, i + 1]  # noqa: E731
    check(f, [x, i], (xa, 0), 0)


def case_scatter_add(data):
    idx = data.draw(st.sampled_from([(slice(1, None),), ([0, 2, 2],), (slice(None), [1, 0])]))
    region = np.zeros((3, 4))[tuple(np.array(e) if isinstance(e, list) else e for e in idx)].shape
    _run(data, lambda g: shape.scatter_add(g, (3, 4), _index(idx)), [region])


def case_assign(data):
    idx = data.draw(st.sampled_from([(slice(1, None),), (0,), (slice(None), [1, 3]), (0, 1)]))
    region = np.zeros((3, 4))[tuple(np.array(e) if isinstance(e, list) else e for e in idx)].shape

    def f(x, v):
        y = eg.exp(x) + eg.sum(v) * 0.0  # mapped where x or v is (x may be an array)
        y[_index(idx)] = v
        return y
    _run(data, f, [(3, 4), region])


def case_astype(data):
    _run(data, lambda x: x.astype(np.float32).astype(np.float64) * 1.0, [(3, 2)],
         tol=dict(rtol=1e-6, atol=1e-6))


def case_concatenate(data):
    axis = data.draw(st.integers(-2, 1))
    _run(data, lambda x, y, z: eg.concatenate([x, y, z], axis=axis), [(2, 3)] * 3)


def case_stack(data):
    axis = data.draw(st.integers(-3, 2))
    _run(data, lambda x, y: eg.stack([x, y], axis=axis), [(2, 3)] * 2)


def case_copy(data):
    _run(data, lambda x: x.copy(), [(2, 3)])


def case_pad(data):
    width = data.draw(st.sampled_from([1, (1, 2), ((0, 1), (2, 0))]))
    _run(data, lambda x: eg.pad(x, width), [(2, 3)])


BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "maximum": eg.maximum,
          "minimum": eg.minimum, "remainder": lambda a, b: a % b,
          "add_bias": lambda a, b: elementwise.add_bias(eg.exp(a), b)}


def case_binary(data, name):
    ranks = data.draw(st.sampled_from([((2, 3), (3,)), ((3,), (2, 3)), ((2, 3), (2, 3)),
                                       ((2, 1), (1, 3)), ((), (3,))]))
    if name == "add_bias":
        ranks = ((2, 3), (3,))
    _run(data, BINARY[name], list(ranks), positive=(0, 1) if name in ("pow", "remainder")
         else (1,) if name == "div" else ())


def case_where(data):
    mask = np.random.default_rng(data.draw(st.integers(0, 99))).random((2, 3)) > 0.5
    _run(data, lambda a, b: eg.where(xb(mask), a, b), [(2, 3), (3,)])


def case_where_mapped_mask(data):
    # a mask per example (a comparison inside vmap): the front end batches it
    _run(data, lambda a, b: eg.where(a > 0.2, a, b * 2), [(2, 3), (3,)])


UNARY = {"neg": lambda x: -x, "exp": eg.exp, "log": eg.log, "sin": eg.sin, "cos": eg.cos,
         "tanh": eg.tanh, "sqrt": eg.sqrt, "erf": eg.erf, "sigmoid": eg.sigmoid,
         "softplus": eg.softplus, "relu": eg.relu, "abs": eg.abs,
         "normal_pdf": elementwise.normal_pdf, "gelu": eg.gelu,
         "gelu_tanh": lambda x: eg.gelu(x, approximate="tanh"),
         "gelu_d": lambda x: bind(elementwise.gelu_d_p, x,
                                  cdf=elementwise._normal_cdf_impl(shape.bottom(x).data))}


def case_unary(data, name):
    _run(data, UNARY[name], [(2, 3)], positive=(0,) if name in ("log", "sqrt") else ())


def _axis(data, ndim, allow_none=True):
    choices = [None] if allow_none else []
    choices += list(range(-ndim, ndim)) + [(0, ndim - 1)]
    return data.draw(st.sampled_from(choices))


def case_max(data):
    axis = _axis(data, 3)
    _run(data, lambda x: eg.max(x, axis=axis), [(2, 3, 2)])


def case_spread(data):
    mask = np.random.default_rng(data.draw(st.integers(0, 99))).random((2, 3, 2)) > 0.5
    _run(data, lambda g: bind(reductions.spread_p, g, mask=xb(mask), axes=(1,)), [(2, 2)])


def case_softmax(data):
    axis = data.draw(st.integers(-2, 1))
    fn = data.draw(st.sampled_from([eg.softmax, eg.log_softmax]))
    _run(data, lambda x: fn(x, axis=axis), [(2, 3)])


def case_var(data):
    axis, ddof = _axis(data, 2), data.draw(st.integers(0, 1))
    _run(data, lambda x: eg.var(x, axis=axis, ddof=ddof), [(3, 4)])


def case_prod(data):
    axis = _axis(data, 2)
    _run(data, lambda x: eg.prod(x, axis=axis), [(3, 4)])


def case_scan(data):
    _run(data, lambda a, b: reductions._scan(a, b), [(2, 4), (4,)])


def case_cumsum(data):
    axis = data.draw(st.sampled_from([None, 0, 1, -1]))
    _run(data, lambda x: eg.cumsum(x, axis=axis), [(3, 4)])


def case_normalize(data):
    n = data.draw(st.integers(1, 2))
    _run(data, lambda x: norm.layer_norm(x, (3, 4)[2 - n:]), [(2, 3, 4)])


def case_inv_std(data):
    _run(data, lambda x: bind(norm.inv_std_p, x, axes=(-1,), eps=1e-5), [(2, 3)])


def case_layer_norm(data):
    _run(data, lambda x, w, b: norm.layer_norm(x, 3, w, b), [(2, 3), (3,), (3,)])


# Other modules' primitives, bound through the batching bind (their rules live in
# einsumgrad.vmap until their modules bind through it).
def case_patches(data):
    _run(data, lambda x: bind(patches.patches_p, x, kernel=(2, 2), stride=(1, 2),
                              padding=(1, 0), contiguous=False, dilation=(1, 1)), [(2, 4, 5)])


def case_unpatch(data):
    _run(data, lambda g: bind(patches.unpatch_p, g, size=(4, 5), kernel=(2, 2), stride=(1, 1),
                              padding=(0, 0), dilation=(1, 1)), [(2, 3, 4, 2, 2)])


def _conv_spec():
    from einsumgrad.rules.convolution import _parse
    return _parse("chwkl,fckl->fhw", 0), _parse("fhw,fckl->chwkl", 2)


def case_patch_einsum(data):
    spec, _ = _conv_spec()
    _run(data, lambda x, w: bind(convolution.patch_einsum_p, x, w, spec=spec, kernel=(2, 2),
                                 stride=(1, 1), padding=(1, 1), patches=None,
                                 dilation=(1, 1)), [(2, 4, 4), (3, 2, 2, 2)])


def case_unpatch_einsum(data):
    _, spec = _conv_spec()
    _run(data, lambda g, w: bind(convolution.unpatch_einsum_p, g, w, spec=spec, size=(4, 4),
                                 kernel=(2, 2), stride=(1, 1), padding=(0, 0),
                                 dilation=(1, 1)), [(3, 3, 3), (3, 2, 2, 2)])


def case_batch_norm(data):
    w, b = rand(1, (3, 1)), rand(2, (3, 1))
    _run(data, lambda x: bind(batch_norm.batch_norm_p, x, T(w), T(b), axes=(-3, -1), eps=1e-5),
         [(4, 3, 2)])


CASES = {"einsum": case_einsum, "broadcast_to": case_broadcast_to, "identity": case_identity,
         "reshape": case_reshape, "getitem": case_getitem, "scatter_add": case_scatter_add,
         "assign": case_assign, "astype": case_astype, "concatenate": case_concatenate,
         "copy": case_copy, "pad": case_pad, "where": case_where, "max": case_max,
         "spread": case_spread, "softmax": case_softmax, "log_softmax": case_softmax,
         "var": case_var, "prod": case_prod, "scan": case_scan, "cumsum": case_cumsum,
         "normalize": case_normalize, "inv_std": case_inv_std, "layer_norm": case_layer_norm,
         "patches": case_patches, "unpatch": case_unpatch, "patch_einsum": case_patch_einsum,
         "unpatch_einsum": case_unpatch_einsum, "batch_norm": case_batch_norm,
         **{n: (lambda n: lambda data: case_binary(data, n))(n) for n in BINARY},
         **{n: (lambda n: lambda data: case_unary(data, n))(n) for n in UNARY
            if n != "gelu_tanh"}}
EXTRA = {"getitem (batched index)": case_getitem_batched_index, "stack": case_stack,
         "where (mapped mask)": case_where_mapped_mask,
         "gelu (tanh)": lambda data: case_unary(data, "gelu_tanh")}


def all_primitives() -> dict:
    found = {}
    for m in (einsum_mod, shape, elementwise, reductions, norm, patches, convolution,
              batch_norm):
        for v in vars(m).values():
            if isinstance(v, Primitive):
                found[v.name] = v
    return found


def test_every_primitive_has_a_batching_rule_and_a_case():
    prims = all_primitives()
    assert [n for n, p in prims.items() if p.vmap is None] == []
    assert sorted(set(prims) - set(CASES)) == []


@pytest.mark.parametrize("name", sorted(CASES) + sorted(EXTRA))
@settings(max_examples=8)
@given(data=st.data())
def test_batching_rule_against_a_loop(name, data):
    before = len(COMPARED)
    (CASES.get(name) or EXTRA[name])(data)
    assert len(COMPARED) > before, f"case {name!r} compared no vmap result with the loop"


def test_a_case_runs_its_primitives_rule():
    # The table's cases reach the rule of the primitive they are named after.
    prims = all_primitives()
    ran = set()
    saved = {n: p.vmap for n, p in prims.items()}
    try:
        for n, p in prims.items():
            p.vmap = (lambda n, rule: lambda *a, **k: (ran.add(n), rule(*a, **k))[1])(n, saved[n])

        @settings(max_examples=3, database=None)
        @given(data=st.data())
        def go(name, data):
            CASES[name](data)
        for name in CASES:
            ran.discard(name)
            go(name)
            assert name in ran, name
    finally:
        for n, p in prims.items():
            p.vmap = saved[n]


# -- JAX's semantics ----------------------------------------------------------------------------

jax = pytest.importorskip("jax")
jnp = jax.numpy
jax.config.update("jax_enable_x64", True)


def same(ours, theirs):
    a, b = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(npy(x), np.asarray(y), **TOL)


W, X, V = rand(0, (3, 4)), rand(1, (5, 4)), rand(2, (5, 3))


def f_ours(w, x):
    return eg.tanh(eg.einsum("oi,i->o", w, x)) * eg.sum(x * x)


def f_jax(w, x):
    return jnp.tanh(jnp.einsum("oi,i->o", w, x)) * jnp.sum(x * x)


@pytest.mark.parametrize("in_axes,out_axes,args", [
    ((None, 0), 0, (W, X)),
    ((None, 0), 1, (W, X)),
    ((None, 0), -1, (W, X)),
    ((None, 1), 0, (W, X.T)),
    ((None, -1), 0, (W, X.T)),
    ([None, 0], 0, (W, X)),
    ((0, 0), 0, (np.stack([W] * 5) * rand(3, (5, 1, 1)), X)),
    ((2, None), 0, (np.moveaxis(np.stack([W, 2 * W]), 0, 2), X[0])),
])
def test_in_axes_and_out_axes_as_jax(in_axes, out_axes, args):
    ours = vmap(f_ours, in_axes, out_axes)(*[xb(a) for a in args])
    same(ours, jax.vmap(f_jax, in_axes, out_axes)(*args))


def test_pytree_in_axes_out_axes_and_keyword_arguments_as_jax():
    p = {"w": W, "b": rand(4, (5, 3))}

    def ours(p, x, *, scale):
        y = eg.einsum("oi,i->o", p["w"], x) + p["b"]
        return {"y": y * scale, "n": (eg.sum(y), x)}

    def theirs(p, x, *, scale):
        y = jnp.einsum("oi,i->o", p["w"], x) + p["b"]
        return {"y": y * scale, "n": (jnp.sum(y), x)}
    in_axes = ({"w": None, "b": 0}, 0)
    out_axes = {"y": 1, "n": (0, -1)}
    pe = {"w": xb(p["w"]), "b": xb(p["b"])}
    got = vmap(ours, in_axes, out_axes)(pe, xb(X), scale=xb(rand(5, (5,))))
    same(got, jax.vmap(theirs, in_axes, out_axes)(p, X, scale=rand(5, (5,))))


def test_unmapped_outputs_broadcast_or_pass_as_jax():
    f = lambda w, x: (eg.sum(w), x * 2)  # noqa: E731
    got = vmap(f, (None, 0), (None, 0))(xb(W), xb(X))
    same(got, jax.vmap(lambda w, x: (jnp.sum(w), x * 2), (None, 0), (None, 0))(W, X))
    got = vmap(f, (None, 0))(xb(W), xb(X))  # an unmapped output broadcast along the examples
    same(got, jax.vmap(lambda w, x: (jnp.sum(w), x * 2), (None, 0))(W, X))


def test_nested_vmap_as_jax():
    A, C = rand(6, (2, 3, 4)), rand(7, (3, 4))
    ours = vmap(vmap(lambda a, c: a * c + eg.sin(a).sum(), in_axes=(0, None)), in_axes=(0, None))
    ours2 = vmap(vmap(lambda a, c: eg.einsum("i,i->", a, c), in_axes=(1, 0), out_axes=0),
                 in_axes=(0, None), out_axes=1)
    same(ours(xb(A), xb(C[0])), jax.vmap(jax.vmap(lambda a, c: a * c + jnp.sin(a).sum(),
                                                  (0, None)), (0, None))(A, C[0]))
    same(ours2(xb(A.transpose(0, 2, 1)), xb(C)),
         jax.vmap(jax.vmap(lambda a, c: jnp.einsum("i,i->", a, c), (1, 0), 0),
                  (0, None), 1)(A.transpose(0, 2, 1), C))


def loss_ours(w, x):
    return eg.sum(eg.tanh(eg.einsum("oi,i->o", w, x)) ** 2) + eg.sum(eg.softmax(x) * x)


def loss_jax(w, x):
    return jnp.sum(jnp.tanh(jnp.einsum("oi,i->o", w, x)) ** 2) + jnp.sum(jax.nn.softmax(x) * x)


def _torch_vmap_hessian():
    # torch.func here: jax.hessian's tracing alone takes seconds
    torch = pytest.importorskip("torch")
    w = torch.tensor(W)

    def loss(x):
        return (torch.tanh(w @ x) ** 2).sum() + (torch.softmax(x, 0) * x).sum()
    return torch.func.vmap(torch.func.hessian(loss))(torch.tensor(X)).numpy()


COMPOSED = {
    "vmap(grad)": (lambda: vmap(eg.grad(loss_ours), (None, 0))(xb(W), xb(X)),
                   lambda: jax.vmap(jax.grad(loss_jax), (None, 0))(W, X)),
    "vmap(grad argnums)": (lambda: vmap(eg.grad(loss_ours, (0, 1)), (None, 0))(xb(W), xb(X)),
                           lambda: jax.vmap(jax.grad(loss_jax, (0, 1)), (None, 0))(W, X)),
    "grad(vmap)": (lambda: eg.grad(lambda w: vmap(loss_ours, (None, 0))(w, xb(X)).sum())(xb(W)),
                   lambda: jax.grad(lambda w: jax.vmap(loss_jax, (None, 0))(w, X).sum())(W)),
    "jacrev(vmap)": (lambda: eg.jacrev(lambda x: vmap(f_ours, (None, 0))(xb(W), x))(xb(X)),
                     lambda: jax.jacrev(lambda x: jax.vmap(f_jax, (None, 0))(W, x))(X)),
    "jacfwd(vmap)": (lambda: eg.jacfwd(lambda w: vmap(f_ours, (None, 0))(w, xb(X)))(xb(W)),
                     lambda: jax.jacfwd(lambda w: jax.vmap(f_jax, (None, 0))(w, X))(W)),
    "vmap(jacrev)": (lambda: vmap(eg.jacrev(f_ours), (None, 0))(xb(W), xb(X)),
                     lambda: jax.vmap(jax.jacrev(f_jax), (None, 0))(W, X)),
    "vmap(jacfwd) out_axes=1": (lambda: vmap(eg.jacfwd(f_ours, 1), (None, 0), 1)(xb(W), xb(X)),
                                lambda: jax.vmap(jax.jacfwd(f_jax, 1), (None, 0), 1)(W, X)),
    "vmap(hessian)": (lambda: vmap(eg.hessian(lambda x: loss_ours(xb(W), x)))(xb(X)),
                      lambda: _torch_vmap_hessian()),
    "vmap(jvp)": (lambda: vmap(lambda x, t: eg.jvp(lambda x: f_ours(xb(W), x), (x,), (t,)))(
                      xb(X), xb(2 * X)),
                  lambda: jax.vmap(lambda x, t: jax.jvp(lambda x: f_jax(W, x), (x,), (t,)))(
                      X, 2 * X)),
    "vmap(jvp) tangent unmapped": (
        lambda: vmap(lambda x, t: eg.jvp(lambda x: f_ours(xb(W), x), (x,), (t,))[1],
                     (0, None))(xb(X), xb(X[1])),
        lambda: jax.vmap(lambda x, t: jax.jvp(lambda x: f_jax(W, x), (x,), (t,))[1],
                         (0, None))(X, X[1])),
    "vmap(vjp)": (lambda: vmap(lambda x, g: eg.vjp(lambda x: f_ours(xb(W), x), x)[1](g))(
                      xb(X), xb(V)),
                  lambda: jax.vmap(lambda x, g: jax.vjp(lambda x: f_jax(W, x), x)[1](g))(X, V)),
    "vmap(vmap(grad))": (
        lambda: vmap(vmap(eg.grad(loss_ours), (None, 0)), (0, None))(
            xb(np.stack([W, 2 * W])), xb(X)),
        lambda: jax.vmap(jax.vmap(jax.grad(loss_jax), (None, 0)), (0, None))(
            np.stack([W, 2 * W]), X)),
    "grad(vmap(grad))": (
        lambda: eg.grad(lambda w: vmap(eg.grad(loss_ours, 1), (None, 0))(w, xb(X)).sum())(xb(W)),
        lambda: jax.grad(lambda w: jax.vmap(jax.grad(loss_jax, 1), (None, 0))(w, X).sum())(W)),
    "vmap(grad(vmap))": (
        lambda: vmap(eg.grad(lambda w, xs: vmap(loss_ours, (None, 0))(w, xs).sum()),
                     (0, None))(xb(np.stack([W, -W])), xb(X)),
        lambda: jax.vmap(jax.grad(lambda w, xs: jax.vmap(loss_jax, (None, 0))(w, xs).sum()),
                         (0, None))(np.stack([W, -W]), X)),
    "vmap(batch_jacobian)": (
        lambda: vmap(eg.batch_jacobian(lambda x: eg.tanh(x) * eg.sum(x, axis=1, keepdims=True)))(
            xb(np.stack([X, X + 1]))),
        lambda: jax.vmap(jax.vmap(jax.jacrev(lambda x: jnp.tanh(x) * jnp.sum(x))))(
            np.stack([X, X + 1]))),
    "vmap(elementwise_grad)": (
        lambda: vmap(eg.elementwise_grad(lambda x: eg.sin(x) * 3.0))(xb(X)),
        lambda: jax.vmap(jax.vmap(jax.grad(lambda x: jnp.sin(x) * 3.0)))(X)),
}


@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_composition_with_transforms_as_jax(name):
    ours, theirs = COMPOSED[name]
    same(ours(), theirs())


def test_against_torch_func_vmap_with_in_dims():
    torch = pytest.importorskip("torch")
    f = lambda w, x: eg.softmax(eg.einsum("oi,i->o", w, x)) @ w  # noqa: E731
    ft = lambda w, x: torch.softmax(w @ x, 0) @ w  # noqa: E731
    got = vmap(f, in_axes=(None, 1), out_axes=1)(xb(W), xb(X.T))
    want = torch.func.vmap(ft, in_dims=(None, 1), out_dims=1)(torch.tensor(W), torch.tensor(X.T))
    np.testing.assert_allclose(npy(got), want.numpy(), **TOL)


def test_grad_through_vmap_to_a_leaf_that_requires_grad():
    x = eg.tensor(xb(X), requires_grad=True)
    vmap(lambda x: loss_ours(xb(W), x))(x).sum().backward()
    want = jax.grad(lambda x: jax.vmap(lambda x: loss_jax(W, x))(x).sum())(X)
    np.testing.assert_allclose(npy(x.grad), np.asarray(want), **TOL)


# -- reading, tracing, errors ---------------------------------------------------------------

def test_a_trace_of_a_vmapped_function_prints_the_batched_einsum():
    text = str(eg.trace(vmap(lambda x, w: eg.einsum("i,oi->o", x, w), in_axes=(0, None)),
                        xb(X), xb(W)))
    assert "einsum 'ai,oi->ao'" in text and "vjp 1: ao,ai->oi" in text


def test_in_place_and_setitem_inside_vmap():
    def f(x):
        y = x * 1.0
        y += 1.0
        y[0] = eg.sum(x)
        y[1:3] = y[1:3] * 2.0
        return y
    check(f, [X], 0)


def test_writing_a_mapped_value_into_an_unmapped_tensor_raises():
    # as torch.func.vmap: the tensor would need the mapped axis it does not have
    def f(x):
        y = eg.exp(xb(W[0]))
        y[0] = x[0]
        return y
    with pytest.raises(RuntimeError, match="v is mapped and t is not"):
        vmap(f)(xb(X))


def test_errors():
    with pytest.raises(ValueError, match="no argument is mapped"):
        vmap(lambda x: x, None)(xb(X))
    with pytest.raises(ValueError, match="different sizes"):
        vmap(lambda x, y: x + y)(xb(X), xb(W))
    with pytest.raises(ValueError, match="out_axes is None"):
        vmap(lambda x: x, 0, None)(xb(X))
    with pytest.raises(ValueError, match="out of range"):
        vmap(lambda x: x, 2)(xb(X))
    with pytest.raises(ValueError, match="in_axes"):
        vmap(lambda x, y: x, (0,))(xb(X), xb(X))
    with pytest.raises(ValueError, match="prefix"):
        vmap(lambda p: p["a"], ({"b": 0},))({"a": xb(X)})


@pytest.mark.parametrize("read", [float, lambda t: t.numpy(), lambda t: np.asarray(t), bool,
                                  lambda t: t.item(), lambda t: t.data])
def test_a_batched_value_cannot_be_read(read):
    with pytest.raises(TracerConversionError, match="batched tensor inside vmap"):
        vmap(lambda x: read(x[0]))(xb(X))


def test_an_op_without_a_batching_rule_is_named():
    p = Primitive("my_cube", lambda x: x ** 3)
    with pytest.raises(NotImplementedError, match="'my_cube' has no batching rule"):
        vmap(lambda x: bind(p, x))(xb(X))
    from einsumgrad.extend import bind as tape_bind  # the tape's bind batches too
    with pytest.raises(NotImplementedError, match="'my_cube' has no batching rule"):
        vmap(lambda x: tape_bind(p, x))(xb(X))
    p.defvmap(lambda bdims, x: tape_bind(p, x))  # leading axes pass through x ** 3
    check(lambda x: tape_bind(p, x), [X])


def test_every_primitive_is_batched_wherever_it_is_bound():
    # patches.py, convolution.py and batch_norm.py bind through einsumgrad.tensor.bind
    tensor = importlib.import_module("einsumgrad.tensor")
    assert patches.bind is tensor.bind and convolution.bind is tensor.bind and \
        shape.bind is tensor.bind
    check(lambda x: patches.patches(x, 2), [rand(3, (4, 2, 5, 5))])
    assert tensor.BATCHING == 0  # vmap's count goes back down


def test_an_escaped_batched_tensor_raises():
    kept = []
    vmap(lambda x: kept.append(x) or x)(xb(X))
    with pytest.raises(RuntimeError, match="escaped"):
        kept[0] * 2.0


def test_a_per_example_mlp_equals_the_mlp_written_for_batches():
    w1, w2 = rand(8, (6, 4)), rand(9, (2, 6))
    one = lambda x: eg.einsum("oi,i->o", xb(w2), eg.tanh(eg.einsum("oi,i->o", xb(w1), x)))
    many = np.tanh(X @ w1.T) @ w2.T
    np.testing.assert_allclose(npy(vmap(one)(xb(X))), many, **TOL)


# -- the nn functionals, against torch.func.vmap -------------------------------------------

from einsumgrad import nn  # noqa: E402
from einsumgrad.backends import backend_of  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402


def _torch():
    return pytest.importorskip("torch")


def as_torch(tree):
    torch = _torch()
    return jax.tree_util.tree_map(lambda a: torch.tensor(a) if isinstance(a, np.ndarray) else a,
                                  tree)


def against_torch(ours, theirs, args, in_axes, tol=TOL):
    """``vmap(ours)`` against ``torch.func.vmap(theirs)`` on the same NumPy arguments
    (pytrees of arrays; integer arrays stay integers)."""
    torch = _torch()
    got = vmap(ours, in_axes)(*jax.tree_util.tree_map(xb, args))
    try:
        want = torch.func.vmap(theirs, in_dims=in_axes)(*as_torch(args))
    except RuntimeError as e:  # torch.func cannot batch it (a weighted, smoothed CE mean):
        assert "vmap" in str(e)  # torch on each example, stacked, is what vmap means
        size = next(np.shape(a)[0] for a, ax in zip(args, in_axes) if ax == 0)
        want = torch.stack([theirs(*as_torch([a if ax is None else np.asarray(a[b])
                                              for a, ax in zip(args, in_axes)]))
                            for b in range(size)])
    a, b = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert npy(x).shape == tuple(y.shape)
        np.testing.assert_allclose(npy(x), y.detach().numpy(), **tol)


CONV2D = [dict(), dict(stride=2), dict(padding=1), dict(padding="same", dilation=2),
          dict(padding=(1, 2), stride=(2, 1)), dict(padding=2, dilation=(2, 1)),
          dict(groups=2, padding=1), dict(groups=4, stride=2), dict(padding="valid")]


@pytest.mark.parametrize("in_axes", [(0, None, None), (0, 0, 0), (None, 0, None)])
@pytest.mark.parametrize("kw", CONV2D, ids=str)
def test_conv2d_as_torch(kw, in_axes):
    tf = _torch().nn.functional
    g = kw.get("groups", 1)
    x, w, b = rand(20, (3, 4, 7, 7)), rand(21, (3, 8, 4 // g, 3, 3)), rand(22, (3, 8))
    args = [a if ax == 0 else a[0] for a, ax in zip((x, w, b), in_axes)]
    against_torch(lambda x, w, b: F.conv2d(x, w, b, **kw),
                  lambda x, w, b: tf.conv2d(x, w, b, **kw), args, in_axes)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding="same",
                                                                       dilation=2),
                                dict(groups=2, dilation=2), dict(groups=4, padding=(1,))],
                         ids=str)
def test_conv1d_as_torch(kw):
    tf = _torch().nn.functional
    g = kw.get("groups", 1)
    x, w, b = rand(23, (3, 4, 9)), rand(24, (8, 4 // g, 3)), rand(25, (8,))
    against_torch(lambda x, w, b: F.conv1d(x, w, b, **kw),
                  lambda x, w, b: tf.conv1d(x, w, b, **kw), [x, w, b], (0, None, None))


def _targets(seed, shape, c, ignore=False):
    y = np.random.default_rng(seed).integers(0, c, shape)
    if ignore and y.ndim > 1:
        y[:, 0] = -100  # one ignored target per example
    return y


CE_SHAPES = {"(C,)": ((4, 5), (4,)), "(N, C)": ((4, 3, 5), (4, 3)),
             "(N, C, d)": ((4, 3, 5, 2), (4, 3, 2))}


@pytest.mark.parametrize("mapped_targets", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shapes", sorted(CE_SHAPES))
def test_cross_entropy_as_torch(shapes, reduction, weighted, smoothing, mapped_targets):
    tf = _torch().nn.functional
    (ls, ys), c = CE_SHAPES[shapes], 5
    logits, y = rand(26, ls), _targets(27, ys, c, ignore=True)
    w = np.abs(rand(28, (c,))) + 0.5 if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    in_axes = (0, 0 if mapped_targets else None)
    y = y if mapped_targets else np.array(y[1])
    against_torch(lambda l, y, w: F.cross_entropy(l, y, weight=w, **kw),
                  lambda l, y, w: tf.cross_entropy(l, y, weight=w, **kw), [logits, y, w],
                  in_axes + (None,))


def test_cross_entropy_with_probability_targets_as_torch():
    tf = _torch().nn.functional
    logits, p = rand(29, (4, 3, 5)), np.random.default_rng(30).dirichlet(np.ones(5), (4, 3))
    for red in ("mean", "sum", "none"):
        against_torch(lambda l, p: F.cross_entropy(l, p, reduction=red, label_smoothing=0.1),
                      lambda l, p: tf.cross_entropy(l, p, reduction=red, label_smoothing=0.1),
                      [logits, p], (0, 0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_as_torch(reduction):
    tf = _torch().nn.functional
    logp, y = rand(31, (4, 3, 5)), _targets(32, (4, 3), 5, ignore=True)
    w = np.abs(rand(33, (5,))) + 0.5
    against_torch(lambda l, y: F.nll_loss(l, y, w, reduction=reduction),
                  lambda l, y: tf.nll_loss(l, y, _torch().tensor(w), reduction=reduction),
                  [logp, y], (0, 0))


def test_a_label_out_of_range_inside_vmap_is_named():
    y = np.array([1, 7, 0])
    with pytest.raises(ValueError, match="label 7 is out of range for 5 classes"):
        vmap(F.cross_entropy)(xb(rand(34, (3, 5))), xb(y))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_binary_cross_entropy_with_logits_as_torch(reduction):
    tf = _torch().nn.functional
    x, t = rand(35, (4, 3, 2)), np.random.default_rng(36).random((4, 3, 2))
    w, pw = np.abs(rand(37, (3, 2))), np.abs(rand(38, (2,))) + 0.5
    against_torch(
        lambda x, t, w, pw: F.binary_cross_entropy_with_logits(x, t, w, reduction, pw),
        lambda x, t, w, pw: tf.binary_cross_entropy_with_logits(x, t, w, reduction=reduction,
                                                                pos_weight=pw),
        [x, t, w, pw], (0, 0, None, None))


@pytest.mark.parametrize("in_axes", [(0, 0), (0, None)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_as_torch(reduction, in_axes):
    tf = _torch().nn.functional
    a, b = rand(39, (4, 3, 2)), rand(40, (4, 3, 2))
    b = b if in_axes[1] == 0 else b[0]
    against_torch(lambda a, b: F.mse_loss(a, b, reduction=reduction),
                  lambda a, b: tf.mse_loss(a, b, reduction=reduction), [a, b], in_axes)


@pytest.mark.parametrize("in_axes", [(0, None), (0, 0), (None, 0)])
def test_embedding_as_torch(in_axes):
    tf = _torch().nn.functional
    ids, table = _targets(41, (4, 3, 2), 6), rand(42, (4, 6, 5))
    args = [a if ax == 0 else a[0] for a, ax in zip((ids, table), in_axes)]
    against_torch(F.embedding, tf.embedding, args, in_axes)


def test_embedding_module_inside_vmap_and_bad_ids_named():
    emb = nn.Embedding(6, 5).to(backend_of(xb(np.zeros(1))))
    ids = _targets(43, (4, 3), 6)
    np.testing.assert_allclose(npy(vmap(emb)(xb(ids))), npy(emb.weight)[ids], **TOL)
    ids[2, 1] = 6
    with pytest.raises(IndexError, match="embedding: index 6 is out of range"):
        vmap(emb)(xb(ids))


def test_dropout_draws_one_mask_per_example():
    # torch.func.vmap's randomness="different": the masks of the batch are the mask
    # dropout draws for the batch written out, drawn at once from the same generator
    x = rand(44, (6, 50)) + 3.0
    got = vmap(lambda x: F.dropout(x, 0.4, rng=np.random.default_rng(5)))(xb(x))
    want = F.dropout(xb(x), 0.4, rng=np.random.default_rng(5))
    np.testing.assert_allclose(npy(got), npy(want), **TOL)
    kept = npy(got) != 0
    assert len({k.tobytes() for k in kept}) == 6  # a mask per example
    np.testing.assert_allclose(npy(got)[kept], x[kept] / 0.6, **TOL)
    # an unmapped x gets a mask per example too, and the gradient is each one's mask
    g = vmap(eg.grad(lambda w, x: (F.dropout(w, 0.4, rng=np.random.default_rng(6)) * x).sum()),
             (None, 0))(xb(x[0]), xb(x))
    m = npy(F.dropout(xb(np.ones((6, 50))), 0.4, rng=np.random.default_rng(6)))
    np.testing.assert_allclose(npy(g), m * x, **TOL)
    assert len({r.tobytes() for r in m != 0}) == 6
    drop = nn.Dropout(0.4)
    drop.eval()
    np.testing.assert_allclose(npy(vmap(drop)(xb(x))), x, **TOL)


def test_batch_norm_as_torch():
    torch, tf = _torch(), _torch().nn.functional
    x = rand(45, (3, 4, 2, 5))  # one example: (N, C, L)
    mean, var, w, b = rand(46, (2,)), np.abs(rand(47, (2,))) + 0.5, rand(48, (2,)), rand(49, (2,))
    against_torch(lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, training=False),
                  lambda x, m, v, w, b: tf.batch_norm(x, m, v, w, b, training=False),
                  [x, mean, var, w, b], (0, None, None, None, None))
    # training without running statistics: each example normalized by its own
    against_torch(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                  lambda x, w, b: tf.batch_norm(x, None, None, w, b, training=True),
                  [x, w, b], (0, None, None))
    # eval() modules inside vmap: running statistics, as torch
    bn = nn.BatchNorm2d(2)
    bn.load_state_dict({"running_mean": mean, "running_var": var}, strict=False)
    bn = bn.to(backend_of(xb(x)))
    bn.eval()
    tbn = torch.nn.BatchNorm2d(2).double().eval()
    tbn.running_mean[:], tbn.running_var[:] = torch.tensor(mean), torch.tensor(var)
    x4 = rand(50, (3, 1, 2, 3, 3))
    np.testing.assert_allclose(npy(vmap(bn)(xb(x4))),
                               torch.func.vmap(tbn)(torch.tensor(x4)).detach().numpy(), **TOL)


def test_batch_norm_in_training_mode_with_running_statistics_raises():
    bn = nn.BatchNorm1d(2).to(backend_of(xb(np.zeros(1))))  # train(): running statistics
    with pytest.raises(RuntimeError, match="batch_norm in training mode inside vmap"):
        vmap(bn)(xb(rand(51, (3, 4, 2))))
    assert int(bn.num_batches_tracked.data) == 0  # nothing half-written by the error
    with pytest.raises(RuntimeError, match="batch_norm in training mode inside vmap"):
        vmap(lambda m, x: F.batch_norm(x, m, None, training=True), (0, None))(
            xb(rand(54, (3, 2))), xb(rand(51, (4, 2))))  # the statistics mapped, x not
    with pytest.raises(NotImplementedError, match="batch_norm with a weight or bias per"):
        vmap(lambda x, w: F.batch_norm(x, None, None, w, training=True))(
            xb(rand(52, (3, 4, 2))), xb(rand(53, (3, 2))))


def _cnn(p, s, x, y):
    """One example ``x (1, 8, 8)``: conv, relu, max pool, conv (stride 2, 2 groups),
    eval-mode batch norm, flatten, linear, cross-entropy."""
    h = F.relu(F.conv2d(x, p["c1"], p["b1"], padding=1))
    h = F.max_pool2d(h, 2)
    h = F.conv2d(h, p["c2"], None, stride=2, padding=1, groups=2)
    h = F.batch_norm(h[None], s["rm"], s["rv"], p["g"], p["be"], training=False)[0]
    return F.cross_entropy(F.linear(h.reshape(-1), p["w"], p["b"]), y)


def _cnn_torch(p, s, x, y):
    tf = _torch().nn.functional
    h = tf.relu(tf.conv2d(x, p["c1"], p["b1"], padding=1))
    h = tf.max_pool2d(h, 2)
    h = tf.conv2d(h, p["c2"], None, stride=2, padding=1, groups=2)
    h = tf.batch_norm(h[None], s["rm"], s["rv"], p["g"], p["be"], training=False)[0]
    return tf.cross_entropy(tf.linear(h.reshape(-1), p["w"], p["b"]), y)


def test_vmap_grad_of_a_small_cnn_as_torch():
    torch = _torch()
    p = {"c1": rand(54, (4, 1, 3, 3)) * 0.5, "b1": rand(55, (4,)), "c2": rand(56, (6, 2, 3, 3)),
         "g": rand(59, (6,)), "be": rand(60, (6,)), "w": rand(61, (3, 24)) * 0.3,
         "b": rand(62, (3,))}
    s = {"rm": rand(57, (6,)), "rv": np.abs(rand(58, (6,))) + 0.5}  # eval(): constants
    x, y = rand(63, (5, 1, 8, 8)), _targets(64, (5,), 3)
    grads = vmap(eg.grad(_cnn), (None, None, 0, 0))(jax.tree_util.tree_map(xb, p),
                                                    jax.tree_util.tree_map(xb, s), xb(x), xb(y))
    want = torch.func.vmap(torch.func.grad(_cnn_torch), (None, None, 0, 0))(
        as_torch(p), as_torch(s), torch.tensor(x), torch.tensor(y))
    assert sorted(grads) == sorted(want)
    for k in p:
        np.testing.assert_allclose(npy(grads[k]), want[k].numpy(), **TOL, err_msg=k)


def test_vmap_grad_of_an_embedding_model_as_torch():
    torch, tf = _torch(), _torch().nn.functional
    p = {"E": rand(65, (7, 4)), "w": rand(66, (3, 4)), "b": rand(67, (3,))}
    ids, y = _targets(68, (5, 6), 7), _targets(69, (5, 6), 3, ignore=True)

    def ours(p, ids, y):
        h = eg.tanh(F.embedding(ids, p["E"]))
        return F.cross_entropy(F.linear(h, p["w"], p["b"]), y, label_smoothing=0.1)

    def theirs(p, ids, y):
        h = torch.tanh(tf.embedding(ids, p["E"]))
        return tf.cross_entropy(tf.linear(h, p["w"], p["b"]), y, label_smoothing=0.1)
    grads = vmap(eg.grad(ours), (None, 0, 0))(jax.tree_util.tree_map(xb, p), xb(ids), xb(y))
    want = torch.func.vmap(torch.func.grad(theirs), (None, 0, 0))(
        as_torch(p), torch.tensor(ids), torch.tensor(y))
    for k in p:
        np.testing.assert_allclose(npy(grads[k]), want[k].numpy(), **TOL, err_msg=k)


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float", "mapped bool"])
def test_scaled_dot_product_attention_as_torch(mask):
    tf = _torch().nn.functional
    q, k, v = rand(70, (3, 2, 4, 5)), rand(71, (3, 2, 6, 5)), rand(72, (3, 2, 6, 3))
    bmask = np.random.default_rng(73).random((3, 4, 6)) > 0.3
    bmask[..., 0] = True  # every query attends somewhere
    args, axes, kw = [q, k, v], [0, 0, 0], {}
    if mask == "causal":
        args, kw = [q, k[:, :, :4], v[:, :, :4]], {"is_causal": True}
    elif mask != "none":
        m = bmask if "bool" in mask else rand(74, (3, 4, 6))
        args.append(m if mask == "mapped bool" else m[0])
        axes.append(0 if mask == "mapped bool" else None)
    against_torch(lambda *a: F.scaled_dot_product_attention(*a, **kw),
                  lambda *a: tf.scaled_dot_product_attention(*a, **kw), args, tuple(axes))


def test_the_gradient_of_a_weight_every_example_shares_comes_out_examples_first():
    # vmap broadcasts w to every example (a stride-0 axis): each example's gradient
    # entries must lie together, not an example apart (a 7x slower outer product)
    rng = np.random.default_rng(0)
    w, x = xb(rng.standard_normal((10, 48))), xb(rng.standard_normal((32, 48)))
    y = xb(rng.integers(0, 10, 32))
    loss = lambda w, x, y: eg.nn.functional.cross_entropy(x[None] @ w.T, y[None])
    f = eg.vmap(eg.grad(loss), in_axes=(None, 0, 0))
    for run in (f, eg.jit(f)):
        g = run(w, x, y)
        assert g.shape == (32, 10, 48) and g.data.flags.c_contiguous
        want = np.stack([npy(eg.grad(loss)(w, x[i], y[i])) for i in range(32)])
        np.testing.assert_allclose(npy(g), want, rtol=1e-12, atol=1e-12)
