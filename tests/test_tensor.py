"""The Tensor API: NumPy semantics, mixing with arrays and scalars, and backward."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from backends import npy, xb
from einsumgrad.testing import check_grads

RNG = np.random.default_rng(0)


def leaf(a):
    return eg.tensor(xb(a), requires_grad=True)


def randn(*shape):
    return RNG.standard_normal(shape)


# -- arithmetic with NumPy broadcasting -------------------------------------------------

BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b, "**": lambda a, b: a ** b}


@pytest.mark.parametrize("op", list(BINARY))
@pytest.mark.parametrize("sa,sb", [((3, 1), (4,)), ((2, 3), ()), ((1, 3), (2, 1)),
                                   ((2, 1, 3), (4, 1))])
def test_broadcast_arithmetic_and_reduced_gradients_match_torch(op, sa, sb):
    a0, b0 = 0.5 + np.abs(randn(*sa)), randn(*sb)
    a, b = leaf(a0), leaf(b0)
    out = BINARY[op](a, b)
    g0 = randn(*out.shape)
    out.backward(xb(g0))
    at, bt = (torch.tensor(v, requires_grad=True) for v in (a0, b0))
    ref = BINARY[op](at, bt)
    ref.backward(torch.tensor(g0))
    np.testing.assert_allclose(npy(out), ref.detach().numpy(), rtol=1e-12)
    assert a.grad.shape == sa and b.grad.shape == sb
    np.testing.assert_allclose(npy(a.grad), at.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(npy(b.grad), bt.grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("op", list(BINARY) + ["@"])
def test_array_and_scalar_on_either_side_keep_the_graph(op):
    fn = BINARY.get(op, lambda a, b: a @ b)
    x0, arr0 = 0.5 + np.abs(randn(3, 3)), 0.5 + np.abs(randn(3, 3))
    arr = xb(arr0)
    others = [arr] if op == "@" else [arr, 2.0, 2]
    for other in others:
        for left in (True, False):
            x = leaf(x0)
            out = fn(x, other) if left else fn(other, x)
            assert isinstance(out, eg.Tensor), (op, type(other), left)
            assert out.requires_grad
            out.sum().backward()
            xt = torch.tensor(x0, requires_grad=True)
            o = torch.tensor(arr0) if other is arr else other
            (fn(xt, o) if left else fn(o, xt)).sum().backward()
            np.testing.assert_allclose(npy(x.grad), xt.grad.numpy(), rtol=1e-12,
                                       err_msg=f"{op} {type(other).__name__} left={left}")


def test_python_scalar_keeps_float32():
    x = eg.tensor(xb(np.ones(3, np.float32)))
    for y in (x + 1, 2.5 * x, x / 3, 1 - x, x ** 2):
        assert y.dtype == np.float32


def test_comparisons_give_plain_values():
    x = eg.tensor(xb(np.array([1.0, 2.0, 3.0])))
    np.testing.assert_array_equal(npy(x > 2.0), [False, False, True])
    np.testing.assert_array_equal(npy(x <= xb(np.array([1.0, 1.0, 4.0]))), [True, False, True])


def test_equality_is_element_wise_and_hashing_by_identity():
    a = np.array([1.0, 2.0, 3.0])
    x = eg.tensor(xb(a), requires_grad=True)
    other = xb(np.array([1.0, 0.0, 3.0]))
    for got, want in [(x == 2.0, a == 2.0), (x != 2.0, a != 2.0), (x == other, [1, 0, 1]),
                      (other == x, [1, 0, 1]), (x != eg.tensor(other), [0, 1, 0]),
                      (2.0 == x, a == 2.0), (x * 2 == x + x, [1, 1, 1])]:
        assert isinstance(got, eg.Tensor) and got.dtype == bool and not got.requires_grad
        np.testing.assert_array_equal(npy(got), want)
    assert (x == None) is False and (x != None) is True  # noqa: E711  (as torch)
    y = eg.tensor(xb(a))
    assert hash(x) != hash(y) and {x: 1, y: 2}[y] == 2 and x in [x] and x in {x}


def test_bool_int_float_of_one_element_tensors():
    for data, b, i in [(np.array(0.0), False, 0), (np.array([2.7]), True, 2),
                       (np.array([[-3.5]]), True, -3), (np.array([0]), False, 0)]:
        t = eg.tensor(xb(data))
        assert bool(t) is b and int(t) == i and float(t) == float(data.reshape(()))
        tt = torch.tensor(data)
        assert bool(t) == bool(tt) and int(t) == int(tt)
    assert bool(eg.tensor(xb(np.array([1.0]))) > 0.5)
    for t in [eg.tensor(xb(np.ones(2))), eg.tensor(xb(np.zeros((0,))))]:
        with pytest.raises(ValueError, match="ambiguous"):
            bool(t)
        with pytest.raises(ValueError):
            int(t)


# -- sum, mean, reshape, T, @ as in NumPy --------------------------------------------------

@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (2, 0)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_sum_and_mean_match_numpy(axis, keepdims):
    a = randn(2, 3, 4)
    np.testing.assert_allclose(npy(eg.tensor(xb(a)).sum(axis=axis, keepdims=keepdims)),
                               a.sum(axis=axis, keepdims=keepdims), rtol=1e-12)
    np.testing.assert_allclose(npy(eg.tensor(xb(a)).mean(axis=axis, keepdims=keepdims)),
                               a.mean(axis=axis, keepdims=keepdims), rtol=1e-12)


def test_reshape_and_transpose_match_numpy():
    a = randn(2, 3, 4)
    t = eg.tensor(xb(a))
    np.testing.assert_array_equal(npy(t.reshape(6, 4)), a.reshape(6, 4))
    np.testing.assert_array_equal(npy(t.reshape((4, -1))), a.reshape(4, -1))
    np.testing.assert_array_equal(npy(t.reshape(-1)), a.reshape(-1))
    np.testing.assert_array_equal(npy(t.T), a.T)
    with pytest.raises(ValueError, match="reshape"):
        t.reshape(5, 5)


@pytest.mark.parametrize("sa,sb", [((2, 3), (3, 4)), ((3,), (3,)), ((3,), (3, 4)),
                                   ((2, 3), (3,)), ((5, 2, 3), (3, 4)), ((1, 2, 3), (5, 3, 4))])
def test_matmul_matches_numpy(sa, sb):
    a, b = randn(*sa), randn(*sb)
    np.testing.assert_allclose(npy(eg.tensor(xb(a)) @ eg.tensor(xb(b))), a @ b, rtol=1e-12)


def test_getitem_matches_numpy():
    a = randn(3, 4)
    t = eg.tensor(xb(a))
    for index in [1, (slice(None), 2), (slice(1, None), slice(None, None, -1)), (None, 0),
                  (Ellipsis, 1)]:
        np.testing.assert_array_equal(npy(t[index]), a[index])


# -- backward ------------------------------------------------------------------------------

def test_backward_accumulates_into_grad():
    x = leaf(randn(3))
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(npy(x.grad), np.full(3, 5.0))
    assert isinstance(x.grad, eg.Tensor)


def test_shared_input_gets_both_paths():
    x0 = randn(3)
    x = leaf(x0)
    (x * x + eg.sin(x)).sum().backward()
    np.testing.assert_allclose(npy(x.grad), 2 * x0 + np.cos(x0), rtol=1e-12)


def test_slices_of_one_tensor_sum_their_cotangents_in_one_buffer():
    # A backward that records nothing adds the cotangents of a tensor's slices
    # (basic, repeated advanced indices, a channels-last view) into one buffer,
    # between and after other uses of the tensor; recording, and a Jacobian
    # (leading basis axes), take the op-by-op path. All agree with torch.
    x0 = np.ascontiguousarray(randn(4, 3, 5).transpose(1, 2, 0)).transpose(2, 0, 1)
    w = randn(4, 3, 5)

    def f(lib, x, w, whole_first):
        sin = eg.sin if lib is eg else torch.sin
        y = x[0] * w[0] + sin(x[1:3]).sum(0) * 2.0 + x[[3, 3, 0], 1].sum(0) + x[..., 2:].sum()
        # x's other use reaches the backward before its slices, or after them
        return (x * w).sum(0) + y if whole_first else y + (x * w).sum(0)

    for first in (False, True):
        fe = lambda x: f(eg, x, xb(w), first)
        ft = lambda x: f(torch, x, torch.tensor(w), first)
        x = leaf(x0)
        fe(x).sum().backward()
        xt = torch.tensor(x0, requires_grad=True)
        ft(xt).sum().backward()
        np.testing.assert_allclose(npy(x.grad), xt.grad.numpy(), rtol=1e-12, atol=1e-14)
        x = leaf(x0)
        fe(x).sum().backward(create_graph=True)
        np.testing.assert_allclose(npy(x.grad), xt.grad.numpy(), rtol=1e-12, atol=1e-14)
        check_grads(fe, xb(x0), order=2)
        want = torch.autograd.functional.jacobian(ft, torch.tensor(x0)).numpy()
        np.testing.assert_allclose(npy(eg.jacrev(fe)(xb(x0))), want, rtol=1e-12, atol=1e-14)
        # Pulled back without recording, with leading basis axes: the buffer path.
        _, pull = eg.vjp(fe, xb(x0))
        basis = np.eye(want.shape[0] * want.shape[1]).reshape((-1,) + want.shape[:2])
        with eg.no_grad():
            (jac,) = pull(xb(basis))
        np.testing.assert_allclose(npy(jac).reshape(want.shape), want, rtol=1e-12, atol=1e-14)
    # Slices whose cotangents come in float32 and float64: the buffer takes the
    # wider type, as the recorded sum does.
    grads = []
    for record in (False, True):
        x = eg.tensor(xb(x0.astype(np.float32)), requires_grad=True)
        (x[0] * xb(w[0]) + x[1] * 2.0 + (x * 3.0).sum(0)).sum().backward(create_graph=record)
        grads.append(x.grad)
    assert grads[0].dtype == grads[1].dtype == np.float64
    np.testing.assert_array_equal(npy(grads[0]), npy(grads[1]))


@pytest.mark.parametrize("op", ["exp", "log", "tanh", "sqrt", "sigmoid", "relu"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_array_vjps_agree_with_the_recorded_rules(op, dtype):
    # The outermost grad records nothing, so a unary op's VJP runs on arrays; a
    # grad whose input requires grad (torch's create_graph) runs the recorded
    # rules. Same values, dtype and leading basis axes, corner values included.
    fn = getattr(eg, op)
    x0 = np.concatenate([np.abs(randn(6)) + 0.1, [0.0, -0.0, 3.0, np.inf]]).astype(dtype)
    if op not in ("log", "sqrt"):
        x0 = np.concatenate([x0, -x0[:6]])
    f = lambda x: (fn(x) * xb(np.linspace(1, 2, x0.size).astype(dtype))).sum()
    plain = eg.grad(f)(xb(x0))
    recorded = eg.grad(f)(eg.tensor(xb(x0), requires_grad=True))
    assert not plain.requires_grad
    assert recorded.requires_grad == (op != "relu")  # relu's derivative is a constant
    assert plain.dtype == recorded.dtype == dtype
    np.testing.assert_array_equal(npy(plain), npy(recorded.detach()))
    _, pull = eg.vjp(lambda x: fn(x), xb(x0))
    basis = xb(np.eye(x0.size, dtype=dtype))
    with eg.no_grad():
        (jac,) = pull(basis)
    np.testing.assert_array_equal(npy(jac), npy(eg.jacrev(lambda x: fn(x))(xb(x0))))


def test_non_scalar_backward_needs_grad():
    x = leaf(randn(2, 3))
    y = x * 2.0
    with pytest.raises(RuntimeError, match="needs `grad`"):
        y.backward()
    g = randn(2, 3)
    y.backward(xb(g))
    np.testing.assert_allclose(npy(x.grad), 2 * g)
    with pytest.raises(ValueError, match="shape"):
        (x * 2.0).backward(xb(np.ones(3)))


def test_second_backward_needs_retain_graph():
    x = leaf(randn(3))
    y = eg.exp(x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()

    x = leaf(randn(3))
    y = eg.exp(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(npy(x.grad), 2 * np.exp(npy(x)), rtol=1e-12)


def test_backward_without_requires_grad_raises():
    with pytest.raises(RuntimeError, match="requires_grad"):
        eg.tensor(xb(randn(3))).sum().backward()


def test_requires_grad_on_integers_raises():
    with pytest.raises(TypeError, match="floating"):
        eg.tensor(xb(np.arange(3)), requires_grad=True)


def test_grad_of_grad_through_backward_create_graph():
    x0 = randn(4)
    x = leaf(x0)
    (x ** 3).sum().backward(create_graph=True)
    g = x.grad                       # 3 x^2, itself recorded
    assert g.requires_grad
    np.testing.assert_allclose(npy(g), 3 * x0 ** 2, rtol=1e-12)
    x.grad = None
    g.sum().backward()
    np.testing.assert_allclose(npy(x.grad), 6 * x0, rtol=1e-12)


def test_no_grad_and_detach_stop_recording():
    x = leaf(randn(3))
    with eg.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf
    z = (x * 2.0).detach()
    assert not z.requires_grad and z.is_leaf
    w = x * 2.0 + z            # only the recorded path contributes
    w.sum().backward()
    np.testing.assert_allclose(npy(x.grad), np.full(3, 2.0))
    assert (x * 2.0).requires_grad  # recording is back on after the block


# -- the array-like surface -------------------------------------------------------------------

def test_array_interop():
    a = randn(2, 3)
    t = eg.tensor(xb(a))
    assert t.shape == (2, 3) and t.ndim == 2 and t.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(t), a)
    np.testing.assert_array_equal(t.numpy(), a)
    assert isinstance(np.asarray(t), np.ndarray)
    s = t.sum()
    assert s.item() == pytest.approx(a.sum()) and isinstance(s.item(), float)
    assert float(s) == pytest.approx(a.sum())
    assert eg.tensor([1.0, 2.0], dtype=np.float32).dtype == np.float32
    assert "requires_grad=True" in repr(leaf(a))


def test_scalar_results_hold_0d_arrays():
    # NumPy's full reductions and 0-d arithmetic give NumPy scalars; a Tensor keeps
    # a 0-d array, so np.asarray works and in-place updates of it stick.
    x = leaf(np.array([1.0, -2.0, 3.0]))
    value, _ = eg.value_and_grad(lambda t: (t * t).sum())(xb(np.ones(3)))
    outs = [x.sum(), x.mean(), x.max(), eg.einsum("i->", x), eg.einsum("i,i", x, x),
            x.sum() * 2.0, x.sum() < 3.0, value]
    for s in outs:
        assert not isinstance(s.data, np.generic) and s.shape == ()
        a = np.asarray(s)
        assert type(a) is np.ndarray and a.shape == ()
    np.testing.assert_array_equal(np.asarray(outs[0], dtype=np.float32), np.float32(2.0))
    assert np.asarray(outs[0], dtype=np.float32).dtype == np.float32
    s = eg.tensor(xb(np.array(2.0)), requires_grad=True)
    for _ in range(2):  # the second backward accumulates two 0-d gradients
        (s * s).backward()
    assert not isinstance(s.grad.data, np.generic) and npy(s.grad) == 8.0


def test_numpy_reductions_on_tensors_stay_on_the_tape():
    # numpy.sum / mean / max reach the ops through __array_function__; out= and
    # dtype= are refused by name.
    x = eg.tensor(xb(np.arange(6.0).reshape(2, 3)), requires_grad=True)
    assert float(npy(np.sum(x))) == 15.0
    np.testing.assert_array_equal(npy(np.mean(x, axis=0)), [1.5, 2.5, 3.5])
    assert np.max(x, axis=1, keepdims=True).shape == (2, 1)
    (np.sum(x) + np.max(x)).backward()
    np.testing.assert_array_equal(npy(x.grad), [[1, 1, 1], [1, 1, 2]])
    with pytest.raises(TypeError, match="numpy.sum on a Tensor: out not supported"):
        np.sum(x, out=np.zeros(()))
    with pytest.raises(TypeError, match="numpy.mean on a Tensor: dtype not supported"):
        np.mean(x, dtype=np.float32)
