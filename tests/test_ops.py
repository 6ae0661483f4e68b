"""Every op and activation: derivatives to order 2 (check_grads), higher orders
against PyTorch, float32 in and out, and numerically stable softmax."""
import math

import numpy as np
import pytest
import torch

import einsumgrad as eg
from backends import npy, xb
from einsumgrad.tensor import Primitive, bind
from einsumgrad.testing import check_grads

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape)


def away_from_zero(*shape):
    """Values with |x| >= 0.3: clear of the kinks of relu and abs."""
    z = randn(*shape)
    return np.sign(z) * (0.3 + np.abs(z))


def positive(*shape):
    return 0.5 + np.abs(randn(*shape))


# (name, f, args): each f takes Tensors and returns a Tensor.
OPS = [
    ("einsum", lambda a, b: eg.einsum("ij,jk->ik", a, b), [randn(2, 3), randn(3, 2)]),
    ("einsum trace", lambda a: eg.einsum("ii->", a), [randn(3, 3)]),
    ("add broadcast", lambda a, b: a + b, [randn(3, 1), randn(4)]),
    ("sub broadcast", lambda a, b: a - b, [randn(2, 3), randn(3)]),
    ("mul broadcast", lambda a, b: a * b, [randn(2, 3), randn(2, 1)]),
    ("div", lambda a, b: a / b, [randn(2, 3), away_from_zero(3)]),
    ("pow tensor", lambda a, b: a ** b, [positive(2, 3), randn(2, 3)]),
    ("pow scalar", lambda a: a ** 3, [randn(2, 3)]),
    ("rpow", lambda a: 2.0 ** a, [randn(2, 3)]),
    ("rsub rdiv", lambda a: 1.0 - 2.0 / a, [away_from_zero(4)]),
    ("neg", lambda a: -a, [randn(2, 3)]),
    ("sum all", lambda a: a.sum(), [randn(2, 3)]),
    ("sum axis keepdims", lambda a: eg.sum(a, axis=(0, 2), keepdims=True), [randn(2, 3, 2)]),
    ("mean", lambda a: a.mean(axis=-1), [randn(2, 3)]),
    ("reshape", lambda a: a.reshape(3, -1) * a.reshape(3, 2), [randn(2, 3)]),
    ("T", lambda a: a.T * a.T, [randn(2, 3, 4)]),
    ("matmul", lambda a, b: a @ b, [randn(2, 3), randn(3, 4)]),
    ("matmul vector", lambda a, b: a @ b, [randn(2, 3), randn(3)]),
    ("matmul batched", lambda a, b: a @ b, [randn(2, 2, 3), randn(3, 2)]),
    ("getitem slice", lambda a: a[1:, ::-1] * a[0], [randn(3, 4)]),
    ("getitem advanced", lambda a: a[[0, 2, 0]], [randn(3, 2)]),
    ("relu", eg.relu, [away_from_zero(2, 3)]),
    ("tanh", eg.tanh, [randn(2, 3)]),
    ("sigmoid", eg.sigmoid, [randn(2, 3)]),
    ("exp", eg.exp, [randn(2, 3)]),
    ("log", eg.log, [positive(2, 3)]),
    ("softplus", eg.softplus, [randn(2, 3)]),
    ("sin", eg.sin, [randn(2, 3)]),
    ("cos", eg.cos, [randn(2, 3)]),
    ("sqrt", eg.sqrt, [positive(2, 3)]),
    ("square", eg.square, [randn(2, 3)]),
    ("abs", eg.abs, [away_from_zero(2, 3)]),
    ("gelu", eg.gelu, [randn(2, 3)]),
    ("gelu tanh", lambda a: eg.gelu(a, approximate="tanh"), [randn(2, 3)]),
    ("softmax", eg.softmax, [randn(2, 3)]),
    ("softmax axis 0", lambda a: eg.softmax(a, axis=0), [randn(2, 3)]),
    ("log_softmax", eg.log_softmax, [randn(2, 3)]),
    ("logsumexp", eg.logsumexp, [randn(2, 3)]),
    ("max", lambda a: eg.max(a, axis=1), [randn(2, 3)]),
    ("max all", eg.max, [randn(2, 3)]),
    ("max keepdims", lambda a: eg.max(a, axis=(0, 2), keepdims=True), [randn(3, 4, 5)]),
    # Small reduced axes run as element-wise folds over slices: a pooling window.
    ("max windows", lambda a: eg.max(a, axis=(1, 3)) * 2.0, [randn(2, 2, 3, 3, 4)]),
]


@pytest.mark.parametrize("name,f,args", OPS, ids=[o[0] for o in OPS])
def test_check_grads_order_2(name, f, args):
    check_grads(f, *[xb(a) for a in args], order=2)


def test_check_grads_catches_a_wrong_derivative():
    # The value is x**2 but the graph records only x: the check must fail.
    wrong = lambda x: eg.Tensor(x.data * x.data) + 0.0 * x
    with pytest.raises(AssertionError, match="finite differences"):
        check_grads(wrong, xb(randn(3)), order=1, modes=("fwd",))
    with pytest.raises(AssertionError, match="reverse mode"):
        check_grads(wrong, xb(randn(3)), order=1, modes=("rev",))


def test_check_grads_catches_a_wrong_second_derivative():
    # First derivative right (cos), second wrong: the rule uses a constant cos.
    def sin_with_frozen_derivative(x):
        frozen = eg.Tensor(xb(np.cos(npy(x.detach()))))
        return eg.sin(x.detach()) + frozen * (x - x.detach())
    check_grads(sin_with_frozen_derivative, xb(randn(3)), order=1)
    with pytest.raises(AssertionError, match="order 2"):
        check_grads(sin_with_frozen_derivative, xb(randn(3)), order=2)


def test_check_grads_catches_a_wrong_jvp_rule():
    # A primitive whose VJP rule is right but whose JVP rule is off by a factor 2.
    cube = Primitive("cube", lambda x: x ** 3)
    cube.defvjp(lambda k, g, out, x: g * 3.0 * x * x)
    cube.defjvp(lambda k, t, out, x: t * 6.0 * x * x)
    f = lambda x: bind(cube, x)
    check_grads(f, xb(randn(3)), order=1, modes=("rev",))
    with pytest.raises(AssertionError, match="forward mode"):
        check_grads(f, xb(randn(3)), order=1, modes=("fwd",))


def test_check_grads_rejects_bad_arguments():
    with pytest.raises(ValueError, match="modes"):
        check_grads(eg.sin, xb(randn(2)), modes=("sideways",))


# -- higher orders against PyTorch ---------------------------------------------------------

def test_third_derivative_through_create_graph_matches_torch():
    x0 = randn(5)
    x = eg.tensor(xb(x0), requires_grad=True)
    eg.sum(eg.sin(x) * eg.exp(x)).backward(create_graph=True)
    grads = []
    for _ in range(3):
        g, x.grad = x.grad, None
        grads.append(npy(g))
        if len(grads) < 3:
            g.sum().backward(create_graph=True)

    xt = torch.tensor(x0, requires_grad=True)
    gt = torch.autograd.grad((torch.sin(xt) * torch.exp(xt)).sum(), xt, create_graph=True)[0]
    ref = [gt]
    for _ in range(2):
        ref.append(torch.autograd.grad(ref[-1].sum(), xt, create_graph=True)[0])
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12)


def test_nested_grad_third_order_matches_torch():
    f = lambda x: eg.sum(eg.tanh(x) * eg.sin(x))
    d3 = eg.grad(lambda x: eg.grad(lambda y: eg.grad(f)(y).sum())(x).sum())
    x0 = randn(4)
    xt = torch.tensor(x0, requires_grad=True)
    g = (torch.tanh(xt) * torch.sin(xt)).sum()
    for _ in range(3):
        g = torch.autograd.grad(g.sum(), xt, create_graph=True)[0]
    np.testing.assert_allclose(npy(d3(xb(x0))), g.detach().numpy(), rtol=1e-12)


def test_hessian_matches_torch():
    w0 = randn(3, 3)
    f = lambda x: eg.logsumexp(eg.einsum("ij,j->i", eg.tensor(xb(w0)), x), axis=0)
    x0 = randn(3)
    want = torch.autograd.functional.hessian(
        lambda x: torch.logsumexp(torch.tensor(w0) @ x, 0), torch.tensor(x0))
    np.testing.assert_allclose(npy(eg.hessian(f)(xb(x0))), want.numpy(), rtol=1e-10, atol=1e-12)


# -- float32 in, float32 out ----------------------------------------------------------------

UNARY = ["relu", "tanh", "sigmoid", "exp", "softplus", "sin", "cos", "square", "abs", "gelu",
         "softmax", "log_softmax", "logsumexp"]


@pytest.mark.parametrize("name", UNARY)
def test_float32_activation_and_its_gradient_stay_float32(name):
    x = eg.tensor(xb(away_from_zero(2, 3).astype(np.float32)), requires_grad=True)
    y = getattr(eg, name)(x)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_float32_gradients_from_every_transform():
    x = xb(randn(2, 3).astype(np.float32))
    w = xb(randn(3, 4).astype(np.float32))
    f = lambda x: eg.tanh(eg.einsum("ij,jk->ik", x, w) * 2.0 + 1.0)
    t = eg.tensor(x, requires_grad=True)
    f(t).sum().backward()
    assert t.grad.dtype == np.float32
    assert eg.grad(lambda x: f(x).mean())(x).dtype == np.float32
    out, tangent = eg.jvp(f, (x,), (xb(np.ones((2, 3), np.float32)),))
    assert out.dtype == tangent.dtype == np.float32
    assert eg.vjp(f, x)[1](xb(np.ones((2, 4), np.float32)))[0].dtype == np.float32
    J = eg.jacrev(f)(x)
    assert J.dtype == np.float32 and J.shape == (2, 4, 2, 3)
    assert eg.jacfwd(f)(x).dtype == np.float32
    np.testing.assert_allclose(npy(eg.jacfwd(f)(x)), npy(J), rtol=1e-5, atol=1e-6)


# -- numerical stability ---------------------------------------------------------------------

def test_softmax_family_is_stable_at_plus_minus_1000():
    x0 = np.array([[1000.0, -1000.0, 0.0], [1000.0, 1000.0, 999.0]])
    xt = torch.tensor(x0)
    cases = [(eg.softmax, torch.softmax), (eg.log_softmax, torch.log_softmax),
             (eg.logsumexp, torch.logsumexp)]
    for ours, theirs in cases:
        x = eg.tensor(xb(x0), requires_grad=True)
        y = ours(x, axis=-1)
        got = npy(y)
        assert np.all(np.isfinite(got)), ours.__name__
        np.testing.assert_allclose(got, theirs(xt, -1).numpy(), rtol=1e-12, atol=1e-12)
        y.sum().backward()
        assert np.all(np.isfinite(npy(x.grad))), ours.__name__
    assert npy(eg.logsumexp(xb(np.array([1000.0, 1000.0])), axis=-1)) == pytest.approx(
        1000.0 + np.log(2.0), rel=1e-15)
    # -inf entries (masked logits) drop out without NaN.
    p = npy(eg.softmax(xb(np.array([0.0, -np.inf, 0.0]))))
    np.testing.assert_allclose(p, [0.5, 0.0, 0.5])


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_log_softmax_over_many_short_rows_as_torch(dtype, tol):
    """A classifier's logits: many rows of 10 (the rows' max as a running maximum of
    the columns, their sums as one product), special rows among them."""
    x0 = 30 * np.random.default_rng(0).standard_normal((600, 10)).astype(dtype)
    x0[1, 3], x0[2] = np.nan, -np.inf
    x0[3, 4], x0[4, :2] = np.inf, [np.inf, -np.inf]
    x0[5] = [1000.0, -1000.0] * 5
    want = torch.log_softmax(torch.tensor(x0), -1).numpy()
    got = npy(eg.log_softmax(xb(x0), axis=-1))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    ok = np.isfinite(x0).all(axis=1)
    x = eg.tensor(xb(x0[ok]), requires_grad=True)
    tx = torch.tensor(x0[ok], requires_grad=True)
    (eg.log_softmax(x, axis=-1) ** 2).sum().backward()
    (torch.log_softmax(tx, -1) ** 2).sum().backward()
    np.testing.assert_allclose(npy(x.grad), tx.grad.numpy(), rtol=tol, atol=tol * 100)


def test_sigmoid_and_softplus_are_stable_on_both_tails():
    x = xb(np.array([-1000.0, 1000.0]))
    np.testing.assert_allclose(npy(eg.sigmoid(x)), [0.0, 1.0])
    np.testing.assert_allclose(npy(eg.softplus(x)), [0.0, 1000.0])
    g = eg.grad(lambda t: eg.softplus(t).sum())(x)
    np.testing.assert_allclose(npy(g), [0.0, 1.0])


def test_gelu_matches_torch_both_forms():
    x0 = randn(7)
    for approximate in ("none", "tanh"):
        want = torch.nn.functional.gelu(torch.tensor(x0), approximate=approximate).numpy()
        np.testing.assert_allclose(npy(eg.gelu(xb(x0), approximate=approximate)), want,
                                   rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="approximate"):
        eg.gelu(xb(x0), approximate="sigmoid")


def test_max_splits_gradient_between_ties():
    g = eg.grad(lambda t: eg.max(t))(xb(np.array([1.0, 3.0, 3.0])))
    np.testing.assert_allclose(npy(g), [0.0, 0.5, 0.5])


def test_max_over_windows_splits_ties_in_both_modes():
    # Two 2x2 windows (the folded path): one 4-way tie at zero, one single maximum.
    x = np.array([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 5.0], [2.0, -1.0]]])
    f = lambda t: eg.max(t, axis=(1, 2))
    np.testing.assert_allclose(npy(f(xb(x))), [0.0, 5.0])
    g = npy(eg.grad(lambda t: f(t).sum())(xb(x)))
    np.testing.assert_allclose(g, [[[0.25, 0.25], [0.25, 0.25]], [[0.0, 1.0], [0.0, 0.0]]])
    _, tangent = eg.jvp(f, (xb(x),), (xb(np.ones_like(x)),))
    np.testing.assert_allclose(npy(tangent), [1.0, 1.0])


def test_max_batch_rule_keeps_rows_and_refuses_the_batch_axis():
    x = xb(randn(3, 4, 2))
    jb = npy(eg.batch_jacobian(lambda t: eg.max(t, axis=2))(x))
    full = npy(eg.jacrev(lambda t: eg.max(t, axis=2))(x))
    for b in range(3):
        np.testing.assert_allclose(jb[b], full[b, :, b])
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda t: eg.max(t, axis=0))(x)


def test_float32_erf_is_within_eight_ulps_of_the_exact_value():
    # The NumPy backend's float32 erf is MKL's where installed, else a rational
    # approximation in float32 arithmetic (SciPy's is ~4x slower): both are
    # checked, and the fallback's normal CDF with them.
    from einsumgrad.backends import NUMPY
    from einsumgrad.backends.numpy_backend import _erf_float32
    x = np.concatenate([np.linspace(-6, 6, 200001), [0.0, 1e-30, -1e-6]]).astype(np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    for erf in (NUMPY.erf, _erf_float32):
        got = erf(x)
        assert got.dtype == np.float32
        assert np.max(np.abs(got - exact) / ulp) <= 8.0
        assert erf(np.float32(np.inf)) == 1.0 and np.isnan(erf(np.float32(np.nan)))
    cdf = _erf_float32(x, cdf=True)
    assert np.max(np.abs(cdf - 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x.astype(float)])))) <= 2 * np.finfo(np.float32).eps


def test_gelu_derivatives_to_order_three_match_torch():
    # gelu and its derivative are primitives (Phi kept from the forward);
    # the second derivative is engine ops, so the third is too.
    x0 = randn(6) * 2.0
    d3 = eg.grad(lambda x: eg.grad(lambda y: eg.grad(lambda z: eg.gelu(z).sum())(y).sum())(x).sum())
    xt = torch.tensor(x0, requires_grad=True)
    d = torch.nn.functional.gelu(xt).sum()
    for _ in range(3):
        d = torch.autograd.grad(d, xt, create_graph=True)[0]
        last = d
        d = d.sum()
    np.testing.assert_allclose(npy(d3(xb(x0))), last.detach().numpy(), rtol=1e-10, atol=1e-12)
    check_grads(eg.gelu, xb(x0), order=3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_gradient_reads_phi_off_the_output_and_matches_torch_at_edges(dtype):
    # GELU'(x) takes Phi(x) = GELU(x) / x; at 0, tiny and far negative x (where
    # that quotient is inexact) it evaluates erf instead. Reference: torch in float64.
    x0 = np.array([0.0, -0.0, 1e-42, -1e-300, 1e-8, -3.0, 2.5, -12.0, -40.0, 40.0], dtype=dtype)
    x = eg.tensor(xb(x0), requires_grad=True)
    eg.gelu(x).sum().backward()
    xt = torch.tensor(x0.astype(np.float64), requires_grad=True)
    torch.nn.functional.gelu(xt).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-300) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-38)
    # Far out on the left, torch's Phi = (1 + erf(x / sqrt 2)) / 2 is 0; MKL's
    # normal CDF is not (Phi(-12) = 1.8e-33 beside x phi(x) = -2.6e-31): either is right.
    from scipy.special import ndtr
    x64 = x0.astype(np.float64)
    exact = ndtr(x64) + x64 * np.exp(-x64 * x64 / 2) / np.sqrt(2 * np.pi)
    got = npy(x.grad)
    assert np.all(np.isclose(got, xt.grad.numpy(), **tol) | np.isclose(got, exact, **tol))
    assert x.grad.dtype == dtype
    check_grads(lambda t: eg.gelu(t) * 1.0, xb(np.array([0.0, 1e-3, -2.0, 1.5])), order=2)


def test_spread_primitive_rules():
    # max's VJP over small windows is the spread primitive: linear in g, its VJP a
    # masked sum, its batch rule mapping g's axes to the kept axes of the mask.
    from einsumgrad.rules.reductions import _spread, _spread_batch, spread_p
    mask = xb((randn(2, 3, 2, 4, 2) > 0).astype(float))
    g = xb(randn(2, 3, 4))
    r = _spread(eg.tensor(g, requires_grad=True), eg.tensor(mask), (2, 4))
    assert r.node.prim is spread_p
    np.testing.assert_allclose(npy(r), npy(g)[:, :, None, :, None] * npy(mask))
    check_grads(lambda t: _spread(t, eg.tensor(mask), (2, 4)), g, order=2)
    assert [_spread_batch([b], [g.shape], mask.shape, mask, (2, 4)) for b in range(3)] == [0, 1, 3]


def test_softmax_primitive_batch_rule_and_third_order_against_torch():
    x = xb(randn(3, 4))
    jb = npy(eg.batch_jacobian(lambda t: eg.softmax(t, -1))(x))
    full = npy(eg.jacrev(lambda t: eg.softmax(t, -1))(x))
    for b in range(3):
        np.testing.assert_allclose(jb[b], full[b, :, b], rtol=1e-12, atol=1e-15)
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda t: eg.softmax(t, 0))(x)
    x0, w0 = randn(5), randn(5)
    f = lambda t: (eg.softmax(t) * xb(w0)).sum()
    d3 = eg.grad(lambda a: eg.grad(lambda b: eg.grad(f)(b).sum())(a).sum())
    xt = torch.tensor(x0, requires_grad=True)
    d = (torch.softmax(xt, -1) * torch.tensor(w0)).sum()
    for _ in range(3):
        d = torch.autograd.grad(d, xt, create_graph=True)[0].sum() if _ < 2 else \
            torch.autograd.grad(d, xt, create_graph=True)[0]
    np.testing.assert_allclose(npy(d3(xb(x0))), d.detach().numpy(), rtol=1e-10, atol=1e-13)
