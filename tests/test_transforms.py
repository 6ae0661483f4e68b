"""Transforms against torch.func in float64: Jacobians, Hessians, products, per-sample.

Every einsumgrad input is built with ``xb`` and every result read with ``npy``,
so this suite runs on each backend under test.
"""
import math

import numpy as np
import pytest

import einsumgrad as eg
from backends import npy, xb

torch = pytest.importorskip("torch")
tf = torch.func

TOL = dict(rtol=1e-9, atol=1e-9)
ACTS = {
    "tanh": (eg.tanh, torch.tanh),
    "sigmoid": (eg.sigmoid, torch.sigmoid),
    "softplus": (eg.softplus, torch.nn.functional.softplus),
    "gelu": (eg.gelu, torch.nn.functional.gelu),
    "sin": (eg.sin, torch.sin),
    "relu": (eg.relu, torch.relu),
}


def close(ours, theirs):
    np.testing.assert_allclose(npy(ours), theirs.detach().numpy(), **TOL)


def mlp_pair(rng, sizes, act):
    """The same MLP twice: einsumgrad (weights via xb) and torch."""
    ps = [(rng.standard_normal((o, i)) / math.sqrt(i), 0.3 * rng.standard_normal(o))
          for i, o in zip(sizes[:-1], sizes[1:])]
    eg_act, t_act = ACTS[act]

    def f(x):
        for n, (w, b) in enumerate(ps):
            x = eg.einsum("...i,oi->...o", x, xb(w)) + xb(b)
            x = eg_act(x) if n < len(ps) - 1 else x
        return x

    def ft(x):
        for n, (w, b) in enumerate(ps):
            x = x @ torch.tensor(w).T + torch.tensor(b)
            x = t_act(x) if n < len(ps) - 1 else x
        return x
    return f, ft


def attention_pair(rng, d=4):
    """softmax(q k^T / sqrt(d)) v over the token axis, written with eg.einsum."""
    wq, wk, wv = (rng.standard_normal((d, d)) / math.sqrt(d) for _ in range(3))

    def f(x):  # x: (..., T, d)
        q, k, v = (eg.einsum("...td,de->...te", x, xb(w)) for w in (wq, wk, wv))
        a = eg.softmax(eg.einsum("...td,...sd->...ts", q, k) * (1.0 / math.sqrt(d)), axis=-1)
        return eg.einsum("...ts,...sd->...td", a, v)

    def ft(x):
        q, k, v = (x @ torch.tensor(w) for w in (wq, wk, wv))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return a @ v
    return f, ft


# -- full Jacobians and Hessians -------------------------------------------------------

@pytest.mark.parametrize("act", list(ACTS))
def test_mlp_jacobians_and_hessian(rng, act):
    f, ft = mlp_pair(rng, [4, 6, 3], act)
    x = rng.standard_normal(4)
    xt = torch.tensor(x)
    close(eg.jacrev(f)(xb(x)), tf.jacrev(ft)(xt))
    close(eg.jacfwd(f)(xb(x)), tf.jacfwd(ft)(xt))
    H = eg.hessian(f)(xb(x))
    assert H.shape == (3, 4, 4)
    close(H, tf.hessian(ft)(xt))


@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_jacobian_of_a_matrix_input(rng, act):
    f, ft = mlp_pair(rng, [3, 5, 2], act)
    x = rng.standard_normal((2, 3))
    xt = torch.tensor(x)
    J = eg.jacrev(f)(xb(x))
    assert J.shape == (2, 2, 2, 3)
    close(J, tf.jacrev(ft)(xt))
    close(eg.jacfwd(f)(xb(x)), tf.jacfwd(ft)(xt))


def test_attention_jacobians_and_hessian(rng):
    f, ft = attention_pair(rng)
    x = rng.standard_normal((3, 4))
    xt = torch.tensor(x)
    close(eg.jacrev(f)(xb(x)), tf.jacrev(ft)(xt))
    close(eg.jacfwd(f)(xb(x)), tf.jacfwd(ft)(xt))
    close(eg.hessian(f)(xb(x)), tf.hessian(ft)(xt))


def test_argnums_int_and_tuple(rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    f = lambda x, w: eg.tanh(eg.einsum("ij,jk->ik", x, w)) * eg.sin(w).sum()
    ft = lambda x, w: torch.tanh(x @ w) * torch.sin(w).sum()
    args, targs = (xb(x), xb(w)), (torch.tensor(x), torch.tensor(w))
    for jac, tjac in ((eg.jacrev, tf.jacrev), (eg.jacfwd, tf.jacfwd)):
        close(jac(f, argnums=1)(*args), tjac(ft, argnums=1)(*targs))
        close(jac(f, argnums=-2)(*args), tjac(ft, argnums=0)(*targs))
        ours, theirs = jac(f, argnums=(0, 1))(*args), tjac(ft, argnums=(0, 1))(*targs)
        assert isinstance(ours, tuple) and len(ours) == 2
        for o, t in zip(ours, theirs):
            close(o, t)
    g = lambda x, w: (f(x, w) ** 2).sum()
    gt = lambda x, w: (ft(x, w) ** 2).sum()
    H, Ht = eg.hessian(g, argnums=(0, 1))(*args), tf.hessian(gt, argnums=(0, 1))(*targs)
    for i in range(2):
        for j in range(2):
            close(H[i][j], Ht[i][j])
    close(eg.hessian(g, argnums=1)(*args), tf.hessian(gt, argnums=1)(*targs))
    with pytest.raises(ValueError, match="argnums"):
        eg.jacrev(f, argnums=2)(*args)


def test_grad_vjp_jvp(rng):
    f, ft = mlp_pair(rng, [4, 5, 3], "softplus")
    x, u, v = rng.standard_normal((2, 4)), rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    xt = torch.tensor(x)
    out, fn = eg.vjp(f, xb(x))
    _, tfn = tf.vjp(ft, xt)
    close(out, ft(xt))
    close(fn(xb(u))[0], tfn(torch.tensor(u))[0])
    o, t = eg.jvp(f, (xb(x),), (xb(v),))
    close(t, tf.jvp(ft, (xt,), (torch.tensor(v),))[1])
    val, g = eg.value_and_grad(lambda x: (f(x) ** 2).sum())(xb(x))
    close(g, tf.grad(lambda x: (ft(x) ** 2).sum())(xt))


def test_single_einsum_fast_path_and_products(rng):
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 4, 5))
    f = lambda x: eg.einsum("bij,bjk->bik", x, xb(w))
    ft = lambda x: torch.einsum("bij,bjk->bik", x, torch.tensor(w))
    J = eg.jacrev(f)(xb(x))
    close(J, tf.jacrev(ft)(torch.tensor(x)))
    close(eg.jacfwd(f)(xb(x)), tf.jacrev(ft)(torch.tensor(x)))
    jac = eg.derive("bij,bjk->bik").jacobian(0)
    Jm = npy(jac.materialize(xb(x), xb(w)))
    np.testing.assert_allclose(Jm, npy(J), **TOL)
    v, u = rng.standard_normal(x.shape), rng.standard_normal((2, 3, 5))
    np.testing.assert_allclose(npy(jac.jvp(xb(v), xb(x), xb(w))),
                               np.tensordot(Jm, v, 3), **TOL)
    np.testing.assert_allclose(npy(jac.vjp(xb(u), xb(x), xb(w))),
                               np.tensordot(u, Jm, 3), **TOL)


# -- products without building H -----------------------------------------------------

def test_hvp_against_forward_over_reverse(rng):
    f, ft = mlp_pair(rng, [5, 7, 1], "tanh")
    g = lambda x: f(x).sum()
    gt = lambda x: ft(x).sum()
    x, v = rng.standard_normal(5), rng.standard_normal(5)
    xt, vt = torch.tensor(x), torch.tensor(v)
    close(eg.hvp(g)(xb(x), xb(v)), tf.jvp(tf.grad(gt), (xt,), (vt,))[1])
    close(eg.hvp(g)(xb(x), xb(v)), tf.hessian(gt)(xt) @ vt)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_directional_against_nested_jvp(rng, order):
    f, ft = mlp_pair(rng, [4, 6, 3], "sigmoid")
    x, v = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    xt, vt = torch.tensor(x), torch.tensor(v)
    g = ft
    for _ in range(order):
        g = (lambda h: lambda y: tf.jvp(h, (y,), (vt,))[1])(g)
    close(eg.directional(f, order)(xb(x), xb(v)), g(xt))


def test_directional_is_seed000_contraction(rng):
    f, ft = mlp_pair(rng, [3, 8, 2], "tanh")
    x = rng.standard_normal((4, 3))
    H = npy(eg.batch_hessian(f)(xb(x)))            # (B, out, in, in)
    want = np.einsum("bi,bjik,bk->bj", x, H, x)
    np.testing.assert_allclose(npy(eg.directional(f, 2)(xb(x), xb(x))), want, **TOL)


def test_elementwise_grad_on_seed004_meshgrid():
    t, k = np.array([1.0, 2.0, 4.0]), np.array([2.0, 3.0])
    T, K = np.meshgrid(t, k, indexing="ij")
    f = lambda t, k: t * k + 2 * t * k ** 2
    dfdt, dfdk = eg.elementwise_grad(f, argnums=(0, 1))(xb(T), xb(K))
    np.testing.assert_array_equal(npy(dfdk), [[9, 13], [18, 26], [36, 52]])
    np.testing.assert_array_equal(npy(dfdt), [[10, 21]] * 3)
    np.testing.assert_array_equal(npy(eg.elementwise_grad(f, 1)(xb(T), xb(K))), npy(dfdk))


# -- per-sample derivatives ------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[3, 8, 5], [6, 8, 2]], ids=["forward", "reverse"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_batch_jacobian_and_hessian(rng, sizes, chunk):
    f, ft = mlp_pair(rng, sizes, "tanh")
    x = rng.standard_normal((7, sizes[0]))
    xt = torch.tensor(x)
    J = eg.batch_jacobian(f, chunk_size=chunk)(xb(x))
    assert J.shape == (7, sizes[-1], sizes[0])
    close(J, tf.vmap(tf.jacrev(ft))(xt))
    H = eg.batch_hessian(f, chunk_size=chunk)(xb(x))
    assert H.shape == (7, sizes[-1], sizes[0], sizes[0])
    close(H, tf.vmap(tf.hessian(ft))(xt))


def test_batch_jacobian_attention_over_tokens(rng):
    f, ft = attention_pair(rng)
    x = rng.standard_normal((3, 5, 4))       # (B, T, d): mixing tokens, not samples
    close(eg.batch_jacobian(f)(xb(x)), tf.vmap(tf.jacrev(ft))(torch.tensor(x)))


def test_batch_jacobian_keeps_two_batch_axes(rng):
    # Seed 002: point-wise MLP on (B, N, 3); batch_ndim=2 gives (B, N, 3, 3).
    f, ft = mlp_pair(rng, [3, 8, 3], "tanh")
    x = rng.standard_normal((2, 5, 3))
    want = tf.vmap(tf.vmap(tf.jacrev(ft)))(torch.tensor(x))
    J = eg.batch_jacobian(f, batch_ndim=2, chunk_size=4)(xb(x))
    assert J.shape == (2, 5, 3, 3)
    close(J, want)
    flat = eg.batch_jacobian(f)(xb(x.reshape(-1, 3)))  # or flatten by hand
    close(flat, want.reshape(10, 3, 3))
    H = eg.batch_hessian(f, batch_ndim=2)(xb(x))
    close(H, tf.vmap(tf.vmap(tf.hessian(ft)))(torch.tensor(x)))


def test_batch_jacobian_result_stays_differentiable(rng):
    f, ft = mlp_pair(rng, [3, 4, 2], "sin")
    x = rng.standard_normal((3, 3))
    g = lambda x: (eg.batch_jacobian(f)(x) ** 2).sum()
    gt = lambda x: (tf.vmap(tf.jacrev(ft))(x) ** 2).sum()
    close(eg.grad(g)(xb(x)), tf.grad(gt)(torch.tensor(x)))


# (ours on the batch, torch's on one row): array indices off the batch axis keep rows apart.
INDEXING = {
    "columns": (lambda x: x[:, [0, 2]], lambda r: r[[0, 2]]),
    "ellipsis": (lambda x: x[..., [0, 2]], lambda r: r[..., [0, 2]]),
    "2-d index": (lambda x: eg.sin(x)[:, [[0, 2], [1, 1]]] * x[:, :1, None],
                  lambda r: torch.sin(r)[torch.tensor([[0, 2], [1, 1]])] * r[:1, None]),
    "mask": (lambda x: x[:, np.array([True, False, True])] ** 2,
             lambda r: r[torch.tensor([True, False, True])] ** 2),
}
INDEXING_3D = {  # x of shape (B, 3, 4, 2)
    "with a slice": (lambda x: x[:, [1, 0], 1:], lambda r: r[[1, 0], 1:]),
    "adjacent arrays": (lambda x: x[..., [1, 0], [0, 0]], lambda r: r[..., [1, 0], [0, 0]]),
    # separated arrays put their dims first, (2, B, 4): moved back by a transpose
    "separated arrays": (lambda x: eg.transpose(x[:, [0, 2], :, [1, 0]], (1, 0, 2)),
                         lambda r: r[[0, 2], :, [1, 0]]),
}


@pytest.mark.parametrize("name", list(INDEXING) + list(INDEXING_3D))
def test_batch_jacobian_through_array_indexing(rng, name):
    f, ft = INDEXING.get(name) or INDEXING_3D[name]
    x = rng.standard_normal((5, 3) if name in INDEXING else (5, 3, 4, 2))
    xt = torch.tensor(x)
    close(eg.batch_jacobian(f)(xb(x)), tf.vmap(tf.jacrev(ft))(xt))
    g = lambda x: eg.sum(eg.sin(f(x)), axis=tuple(range(1, f(x).ndim)))  # per-row scalar
    gt = lambda r: torch.sin(ft(r)).sum()
    close(eg.batch_hessian(g)(xb(x)), tf.vmap(tf.hessian(gt))(xt))


@pytest.mark.parametrize("index", [([1, 0], slice(None), [2, 0]), (slice(None), [[0], [1]], [0, 1]),
                                   (Ellipsis, [3, 0]), (1, slice(None), [2, 0]),
                                   ([0, 2], Ellipsis, None, [1, 1])])
def test_jacobians_through_advanced_indexing_follow_numpy(rng, index):
    # Leading basis axes must stay first even where NumPy puts separated
    # advanced-index dims first; the reference is x[index] applied to a basis.
    x = rng.standard_normal((3, 4, 5))
    basis = np.eye(x.size).reshape((x.size,) + x.shape)
    want = np.stack([e[index] for e in basis], axis=-1).reshape(x[index].shape + x.shape)
    f = lambda t: t[index]
    for jac in (eg.jacrev, eg.jacfwd):
        np.testing.assert_array_equal(npy(jac(f)(xb(x))), want)
    g = lambda t: (f(t) ** 3).sum()  # Hessian J^T diag(6 x[index]) J
    jm = want.reshape(-1, x.size)
    np.testing.assert_allclose(npy(eg.hessian(g)(xb(x))).reshape(x.size, x.size),
                               (jm.T * (6 * x[index].reshape(-1))) @ jm, **TOL)


MIXING = {
    "centering": lambda x: x - x.mean(axis=0),
    "permute rows": lambda x: x[[1, 0, 3, 2]],
    "index rows and columns": lambda x: x[[0, 1, 2, 3], [1, 1, 0, 0]],
    "gram": lambda x: eg.einsum("bi,ci->bc", x, x),
    "softmax over batch": lambda x: eg.softmax(x, axis=0),
    "sum over batch": lambda x: x * x.sum(axis=0, keepdims=True),
    "reshape merges rows": lambda x: x.reshape(-1, 2 * x.shape[1]).reshape(x.shape),
    "transpose": lambda x: x.T,
}


@pytest.mark.parametrize("name", list(MIXING))
def test_batch_mixing_is_an_error(rng, name):
    x = xb(rng.standard_normal((4, 3)))
    for transform in (eg.batch_jacobian, eg.batch_hessian):
        with pytest.raises(eg.BatchMixingError):
            transform(MIXING[name])(x)
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(MIXING[name], batch_ndim=2)(xb(rng.standard_normal((2, 4, 3))))
    assert issubclass(eg.BatchMixingError, ValueError)


def test_batch_mixing_message_names_the_op(rng):
    x = xb(rng.standard_normal((4, 3)))
    with pytest.raises(eg.BatchMixingError, match="bi,ci->bc"):
        eg.batch_jacobian(MIXING["gram"])(x)
    with pytest.raises(eg.BatchMixingError, match="getitem"):
        eg.batch_jacobian(MIXING["permute rows"])(x)


def test_bad_arguments_are_errors(rng):
    x = xb(rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match="order"):
        eg.directional(eg.tanh, 0)
    with pytest.raises(ValueError, match="batch_ndim"):
        eg.batch_jacobian(eg.tanh, batch_ndim=3)(x)
    with pytest.raises(TypeError, match="floating"):
        eg.jacrev(eg.tanh)(xb(np.arange(3)))
