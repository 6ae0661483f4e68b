"""Pytrees, auxiliary outputs and keyword arguments through the transforms.

Every behaviour is checked against JAX's (``jax.grad``, ``jax.value_and_grad``,
``jax.vjp``, ``jax.jvp``, ``jax.jacrev``, ``jax.jacfwd``, ``jax.hessian``) on the
same function where JAX is installed (JAX is no test dependency: without it those
comparisons are left out), and the structures JAX gives are also written out
literally, so each test says what it expects without JAX. Values are checked against torch.func where it takes the
same pytrees. Inputs are built with ``xb`` and results read with ``npy``, so the
suite runs on each backend under test.
"""
from collections import OrderedDict, namedtuple

import numpy as np
import pytest

import einsumgrad as eg
from backends import npy, xb
from einsumgrad.pytree import LEAF, flatten, tree_map, unflatten

torch = pytest.importorskip("torch")
tf = torch.func

TOL = dict(rtol=1e-10, atol=1e-12)
Pair = namedtuple("Pair", "a b")


try:
    import jax
    jax.config.update("jax_enable_x64", True)
except ImportError:
    jax = None


def shapes(tree):
    """The structure with each leaf replaced by its shape (dict / list / tuple types kept)."""
    return tree_map(lambda t: npy(t).shape, tree)


def same(ours, theirs):
    """Same structure (container types, dict keys) and the same numbers, leaf by leaf."""
    lo, to = flatten(ours)
    lt, tt = flatten(theirs)
    assert to == tt, f"structure {to} != {tt}"
    for a, b in zip(lo, lt):
        b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
        np.testing.assert_allclose(npy(a), b, **TOL)


def like_jax(ours, theirs):
    """``same(ours, theirs(jax))`` where JAX is installed (in float64); left out without it."""
    if jax is not None:
        same(ours, theirs(jax))


def on_backend(tree):
    return tree_map(xb, tree)


def detached(t) -> bool:
    return isinstance(t, eg.Tensor) and t.node is None and not t.requires_grad


rng = np.random.default_rng(0)
W, B, X = rng.standard_normal((3, 2)), rng.standard_normal(2), rng.standard_normal((4, 3))
P = {"w": W, "b": B}


def loss(m, p, x):
    """A small model written once for einsumgrad (m=eg) and JAX (m=jax.numpy)."""
    return (m.tanh(x @ p["w"] + p["b"]) ** 2).sum()


# -- the pytree module -----------------------------------------------------------------

def test_flatten_and_unflatten_read_containers_as_jax():
    m = np.ones(2)
    tree = {"z": [1.0, (2.0, None)], "a": Pair(3.0, OrderedDict(y=4.0, x=5.0)), "m": m}
    leaves, t = flatten(tree)
    # dict keys sorted, OrderedDict in its own order, None holds no leaf, arrays are leaves
    assert leaves[:3] + leaves[4:] == [3.0, 4.0, 5.0, 1.0, 2.0] and leaves[3] is m
    assert t.num_leaves == 6
    back = unflatten(t, leaves)
    assert back["m"] is m and back["z"] == [1.0, (2.0, None)] and back["a"] == tree["a"]
    assert list(back) == ["a", "m", "z"] and type(back["a"]) is Pair
    assert type(back["a"].b) is OrderedDict and list(back["a"].b) == ["y", "x"]
    assert flatten({"b": 1, "a": 2})[1] == flatten({"a": 0, "b": 0})[1]
    assert flatten([1, 2])[1] != flatten((1, 2))[1]
    x = eg.tensor([1.0])
    assert flatten(x) == ([x], LEAF) and unflatten(LEAF, [x]) is x
    assert flatten(type("D", (dict,), {})(a=1))[1] is LEAF  # an unregistered dict subclass: a leaf
    assert str(flatten({"a": [1, (2,)], "b": None})[1]) == "{'a': [*, (*,)], 'b': None}"


def test_tree_map_and_errors():
    assert tree_map(lambda a, b: a + b, {"x": [1, 2]}, {"x": [10, 20]}) == {"x": [11, 22]}
    with pytest.raises(ValueError, match="structures differ"):
        tree_map(lambda a, b: a, [1, 2], (1, 2))
    with pytest.raises(ValueError, match="takes 2 leaves"):
        unflatten(flatten([1, 2])[1], [1])


def test_leaf_order_matches_jax():
    if jax is None:
        pytest.skip("JAX is not installed")
    tree = {"z": [1.0, (2.0, None)], "a": Pair(3.0, OrderedDict(y=4.0, x=5.0)), "k": 6.0}
    ours, t = flatten(tree)
    theirs, jt = jax.tree_util.tree_flatten(tree)
    assert ours == theirs
    assert jax.tree_util.tree_unflatten(jt, ours) == unflatten(t, ours)


# -- structures kept: grad, value_and_grad ------------------------------------------

def test_grad_of_a_list_is_a_list_of_gradients():
    # The bug this suite was written for: a list argument used to be stacked into one array.
    a, b = rng.standard_normal(3), rng.standard_normal(3)
    f = lambda ps: (ps[0] * ps[1] ** 2).sum()
    g = eg.grad(f)([xb(a), xb(b)])
    assert isinstance(g, list) and shapes(g) == [(3,), (3,)]
    same(g, [b ** 2, 2 * a * b])
    like_jax(g, lambda jax: jax.grad(f)([a, b]))
    # a list of numbers is a pytree too, as in JAX: a list of two scalar gradients
    h = lambda x: x[0] * x[1] ** 2
    g = eg.grad(h)([1.0, 2.0])
    assert isinstance(g, list) and shapes(g) == [(), ()]
    same(g, [4.0, 4.0])
    like_jax(g, lambda jax: jax.grad(h)([1.0, 2.0]))


def test_grad_of_a_dict_of_parameters_is_a_dict():
    p = {**P, "frozen": None}  # None is a node without leaves: its gradient is None
    g = eg.grad(lambda p, x: loss(eg, p, x))(on_backend(p), xb(X))
    assert shapes(g) == {"b": (2,), "frozen": None, "w": (3, 2)}
    like_jax(g, lambda jax: jax.grad(lambda p, x: loss(jax.numpy, p, x))(p, X))
    tp = {k: torch.tensor(v) for k, v in P.items()}
    same({k: v for k, v in g.items() if v is not None},
         tf.grad(lambda p, x: loss(torch, p, x))(tp, torch.tensor(X)))


def test_value_and_grad_with_tuple_argnums_of_pytrees():
    def f(m, p, x, q):
        return loss(m, p, x) * (q[0] * q[1][0]).sum()
    q = (rng.standard_normal(2), [rng.standard_normal(2)])
    v, (gp, gq) = eg.value_and_grad(lambda p, x, q: f(eg, p, x, q), argnums=(0, 2))(
        on_backend(P), xb(X), on_backend(q))
    assert shapes(gp) == {"b": (2,), "w": (3, 2)} and shapes(gq) == ((2,), [(2,)])
    same(gq, (loss(np, P, X) * q[1][0], [loss(np, P, X) * q[0]]))
    like_jax((v, (gp, gq)), lambda jax: jax.value_and_grad(
        lambda p, x, q: f(jax.numpy, p, x, q), argnums=(0, 2))(P, X, q))


def test_grad_needs_one_scalar_and_floats():
    with pytest.raises(TypeError, match="one scalar"):
        eg.grad(lambda x: (x.sum(), x.sum()))(xb(X))
    with pytest.raises(ValueError, match="scalar"):
        eg.grad(lambda x: x)(xb(X))
    with pytest.raises(TypeError, match="floating"):  # as jax.grad: integer leaves refused
        eg.grad(lambda x: x[0] * x[1])([1, 2])


# -- vjp and jvp: pytree primals and outputs ------------------------------------------

def two_outputs(m, p, x):
    y = m.tanh(x @ p["w"] + p["b"])
    return y, {"s": (y ** 2).sum(), "t": [m.sin(y[0])]}


def test_vjp_takes_a_cotangent_with_the_outputs_structure():
    u = (rng.standard_normal((4, 2)), {"s": 2.0, "t": [rng.standard_normal(2)]})
    out, fn = eg.vjp(lambda p, x: two_outputs(eg, p, x), on_backend(P), xb(X))
    assert shapes(out) == ((4, 2), {"s": (), "t": [(2,)]})
    assert all(detached(t) for t in flatten(out)[0])
    same(out, two_outputs(np, P, X))
    g = fn(on_backend(u))
    assert isinstance(g, tuple) and shapes(g) == ({"b": (2,), "w": (3, 2)}, (4, 3))
    like_jax((out, g), lambda jax: (lambda o, fn: (o, fn(u)))(
        *jax.vjp(lambda p, x: two_outputs(jax.numpy, p, x), P, X)))
    tout, tfn = tf.vjp(lambda p, x: two_outputs(torch, p, x),
                       {k: torch.tensor(v) for k, v in P.items()}, torch.tensor(X))
    same(g, tfn(tree_map(torch.tensor, u)))
    with pytest.raises(ValueError, match="structure"):
        fn((xb(u[0]), {"s": 2.0}))
    with pytest.raises(ValueError, match="shape"):
        fn((xb(u[0][:2]), on_backend(u[1])))


def test_vjp_cotangent_with_leading_axes_gives_many_vjps():
    out, fn = eg.vjp(lambda p: {"y": p["w"] * 2.0, "z": p["b"] ** 2}, on_backend(P))
    (g,) = fn({"y": xb(np.ones((5, 3, 2))), "z": xb(np.ones((5, 2)))})
    assert shapes(g) == {"b": (5, 2), "w": (5, 3, 2)}
    same(g, {"b": np.broadcast_to(2 * B, (5, 2)), "w": np.full((5, 3, 2), 2.0)})


def test_jvp_gives_the_tangent_with_the_outputs_structure():
    tp = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    tx = rng.standard_normal((4, 3))
    out, tan = eg.jvp(lambda p, x: two_outputs(eg, p, x), (on_backend(P), xb(X)),
                      (on_backend(tp), xb(tx)))
    assert shapes(tan) == ((4, 2), {"s": (), "t": [(2,)]})
    like_jax((out, tan), lambda jax: jax.jvp(lambda p, x: two_outputs(jax.numpy, p, x),
                                             (P, X), (tp, tx)))
    same(tan, tf.jvp(lambda p, x: two_outputs(torch, p, x),
                     *tree_map(torch.tensor, ((P, X), (tp, tx))))[1])
    with pytest.raises(ValueError, match="structure"):
        eg.jvp(lambda p: p["w"], (on_backend(P),), ([xb(W)],))


# -- Jacobians and Hessians ---------------------------------------------------------

def dict_in_dict_out(m, p):
    return {"a": m.sin(p["w"]) * 2.0, "b": (p["w"] * p["v"]).sum()}


Q = {"w": rng.standard_normal(2), "v": rng.standard_normal(2)}


@pytest.mark.parametrize("which", ["jacrev", "jacfwd"])
def test_jacobian_of_dicts_is_a_dict_of_dicts(which):
    J = getattr(eg, which)(lambda p: dict_in_dict_out(eg, p))(on_backend(Q))
    assert shapes(J) == {"a": {"v": (2, 2), "w": (2, 2)}, "b": {"v": (2,), "w": (2,)}}
    like_jax(J, lambda jax: getattr(jax, which)(lambda p: dict_in_dict_out(jax.numpy, p))(Q))
    tq = {k: torch.tensor(v) for k, v in Q.items()}
    same(J, getattr(tf, which)(lambda p: dict_in_dict_out(torch, p))(tq))


def test_jacobian_tuple_argnums_with_a_list_argument():
    f = lambda m, x, ys: (x * ys[0] * m.sin(ys[1])).sum()
    args = (rng.standard_normal(2), [rng.standard_normal(2), rng.standard_normal(2)])
    J = eg.jacrev(lambda *a: f(eg, *a), argnums=(0, 1))(*on_backend(args))
    assert shapes(J) == ((2,), [(2,), (2,)])
    like_jax(J, lambda jax: jax.jacrev(lambda *a: f(jax.numpy, *a), argnums=(0, 1))(*args))
    same(J, tf.jacrev(lambda *a: f(torch, *a), argnums=(0, 1))(*tree_map(torch.tensor, args)))
    same(eg.jacfwd(lambda *a: f(eg, *a), argnums=(0, 1))(*on_backend(args)), J)


def test_hessian_of_a_dict_nests_output_argument_argument():
    f = lambda m, p: (m.sin(p["w"]) ** 2 * p["v"]).sum()
    H = eg.hessian(lambda p: f(eg, p))(on_backend(Q))
    assert shapes(H) == {"v": {"v": (2, 2), "w": (2, 2)}, "w": {"v": (2, 2), "w": (2, 2)}}
    like_jax(H, lambda jax: jax.hessian(lambda p: f(jax.numpy, p))(Q))
    same(H, tf.hessian(lambda p: f(torch, p))({k: torch.tensor(v) for k, v in Q.items()}))


def test_output_list_stays_a_list():
    J = eg.jacrev(lambda x: [x * 2.0, x.sum()])(xb(np.ones(2)))
    assert shapes(J) == [(2, 2), (2,)]
    same(J, [2 * np.eye(2), np.ones(2)])


# -- has_aux ------------------------------------------------------------------------

def with_aux(m, x, extras=True):
    """A value and an aux dict; ``extras``: also a string and an int (jax.jacrev refuses those)."""
    y = m.tanh(x) * 3.0
    return (y ** 2).sum(), {"y": y, **({"tag": "step", "n": 7} if extras else {})}


def test_has_aux_layouts_follow_jax():
    x = rng.standard_normal(3)
    t = np.tanh(x)
    want_y, want_g = 3 * t, 18 * t * (1 - t ** 2)     # value sum(9 tanh(x)^2)
    want_h = np.diag(18 * (1 - t ** 2) * (1 - 3 * t ** 2))
    ours = lambda x: with_aux(eg, x)

    def theirs(jax, name, *args, **kw):
        return getattr(jax, name)(lambda x: with_aux(jax.numpy, x, False), *args, **kw)

    g, aux = eg.grad(ours, has_aux=True)(xb(x))
    assert aux["tag"] == "step" and aux["n"] == 7 and detached(aux["y"])
    same((g, aux["y"]), (want_g, want_y))
    like_jax((g, {"y": aux["y"]}), lambda jax: theirs(jax, "grad", has_aux=True)(x))

    (v, aux), g = eg.value_and_grad(ours, has_aux=True)(xb(x))
    same((v, g), (9 * (t ** 2).sum(), want_g))
    like_jax(((v, {"y": aux["y"]}), g), lambda jax: theirs(jax, "value_and_grad", has_aux=True)(x))

    out, fn, aux = eg.vjp(ours, xb(x), has_aux=True)
    assert detached(aux["y"])
    same(fn(2.0), (2 * want_g,))
    like_jax((out, fn(2.0), {"y": aux["y"]}),
             lambda jax: (lambda o, f, a: (o, f(2.0), a))(*theirs(jax, "vjp", x, has_aux=True)))

    out, tan, aux = eg.jvp(ours, (xb(x),), (xb(np.ones(3)),), has_aux=True)
    same(tan, want_g.sum())
    like_jax((out, tan, {"y": aux["y"]}),
             lambda jax: theirs(jax, "jvp", (x,), (np.ones(3),), has_aux=True))

    for name, want in (("jacrev", want_g), ("jacfwd", want_g), ("hessian", want_h)):
        J, aux = getattr(eg, name)(ours, has_aux=True)(xb(x))
        assert detached(aux["y"]) and aux["tag"] == "step"
        same(J, want)
        like_jax((J, {"y": aux["y"]}), lambda jax: theirs(jax, name, has_aux=True)(x))


def test_has_aux_needs_a_pair():
    for transform in (eg.grad, eg.jacrev, eg.jacfwd):
        with pytest.raises(TypeError, match="pair"):
            transform(lambda x: x.sum(), has_aux=True)(xb(np.ones(2)))


def test_aux_stays_differentiable_inside_another_transform():
    # JAX's aux is concrete at the top only: an enclosing transform still sees through it.
    x = rng.standard_normal(3)
    inner = lambda m: lambda x: with_aux(m, x, False)
    ours = eg.grad(lambda x: eg.grad(inner(eg), has_aux=True)(x)[1]["y"].sum())(xb(x))
    same(ours, 3 * (1 - np.tanh(x) ** 2))
    like_jax(ours, lambda jax: jax.grad(
        lambda x: jax.grad(inner(jax.numpy), has_aux=True)(x)[1]["y"].sum())(x))


def test_aux_keeps_its_graph_when_an_input_requires_grad():
    # As the value does: the result of a call on a Tensor that requires grad is differentiable.
    x = eg.tensor(xb(np.array([0.1, 0.2])), requires_grad=True)
    (v, aux), g = eg.value_and_grad(lambda x: with_aux(eg, x), has_aux=True)(x)
    aux["y"].sum().backward()
    np.testing.assert_allclose(npy(x.grad), 3 * (1 - np.tanh([0.1, 0.2]) ** 2), **TOL)


# -- keyword arguments --------------------------------------------------------------

def test_keyword_arguments_pass_through_undifferentiated():
    x, s, v = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((4, 3))
    f = lambda x, *, scale, power=2: (eg.tanh(x * scale) ** power).sum()
    kw = dict(scale=xb(s), power=3)
    bound = lambda x: f(x, **kw)
    t = np.tanh(x * s)
    g = eg.grad(f)(xb(x), **kw)
    same(g, 3 * t ** 2 * (1 - t ** 2) * s)   # a gradient for x alone: scale is no argument
    jf = lambda x, *, scale, power=2: (jax.numpy.tanh(x * scale) ** power).sum()
    like_jax(g, lambda jax: jax.grad(jf)(x, scale=s, power=3))
    like_jax(eg.value_and_grad(f)(xb(x), **kw),
             lambda jax: jax.value_and_grad(jf)(x, scale=s, power=3))
    for name in ("jacrev", "jacfwd", "hessian"):
        ours = getattr(eg, name)(f)(xb(x), **kw)
        same(ours, getattr(eg, name)(bound)(xb(x)))
        like_jax(ours, lambda jax: getattr(jax, name)(jf)(x, scale=s, power=3))
    same(eg.vjp(f, xb(x), **kw)[1](1.0), (g,))
    same(eg.jvp(f, (xb(x),), (xb(v),), **kw), eg.jvp(bound, (xb(x),), (xb(v),)))
    same(eg.hvp(f)(xb(x), xb(v), **kw), eg.hvp(bound)(xb(x), xb(v)))
    h = lambda x, *, scale: eg.tanh(x * scale)
    hb = lambda x: h(x, scale=xb(s))
    same(eg.batch_jacobian(h)(xb(x), scale=xb(s)), eg.batch_jacobian(hb)(xb(x)))
    same(eg.batch_hessian(h)(xb(x), scale=xb(s)), eg.batch_hessian(hb)(xb(x)))
    same(eg.elementwise_grad(h)(xb(x), scale=xb(s)), (1 - t ** 2) * s)
    same(eg.directional(h, 2)(xb(x), xb(v), scale=xb(s)), eg.directional(hb, 2)(xb(x), xb(v)))
