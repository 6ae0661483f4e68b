"""Habits of NumPy and torch users that used to give silently wrong gradients:
each now works as the user means it (checked against torch) or raises.

NumPy functions on Tensors, in-place changes and the version counter,
complex values, ``elementwise_grad``'s precondition, and the small errors
(``reshape`` with two ``-1``, integer tensors requiring grad, the dtype of
``backward``'s cotangent)."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from backends import NAME, npy, xb
from einsumgrad import nn, optim

numpy_only = pytest.mark.skipif(NAME != "numpy", reason="NumPy's own functions on host arrays")


def torch_grad(f, x):
    tx = torch.tensor(x, requires_grad=True)
    f(tx).backward()
    return tx.grad.numpy()


# -- NumPy functions on Tensors ------------------------------------------------------

X = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
A = np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]])

AB, XB = xb(A), xb(X)
ON_THE_TAPE = {
    "einsum": (lambda x: np.einsum("ij,jk->", x, AB), lambda x: torch.einsum("ij,jk->", x, torch.tensor(A))),
    "einsum interleaved": (lambda x: np.einsum(x, [0, 1], x, [0, 1]),
                           lambda x: torch.einsum("ij,ij->", x, x)),
    "dot": (lambda x: np.dot(x, AB).sum(), lambda x: (x @ torch.tensor(A)).sum()),
    "dot 1-d": (lambda x: np.dot(x[0], x[1]), lambda x: torch.dot(x[0], x[1])),
    "matmul": (lambda x: np.matmul(x, AB).sum(), lambda x: (x @ torch.tensor(A)).sum()),
    "ndarray @ Tensor": (lambda x: (AB.T @ x.T).sum(), lambda x: (torch.tensor(A.T) @ x.T).sum()),
    "ndarray * Tensor": (lambda x: (XB * x).sum(), lambda x: (torch.tensor(X) * x).sum()),
    "exp sum": (lambda x: np.sum(np.exp(x)), lambda x: torch.exp(x).sum()),
    "tanh mean axis": (lambda x: np.mean(np.tanh(x), axis=0).sum(),
                       lambda x: torch.tanh(x).mean(0).sum()),
    "sqrt square": (lambda x: np.sum(np.sqrt(np.square(x))), lambda x: torch.sqrt(x * x).sum()),
    "max": (lambda x: np.max(x * x), lambda x: (x * x).max()),
    "concatenate": (lambda x: np.sum(np.concatenate([x, 2 * x], axis=1) ** 2),
                    lambda x: (torch.cat([x, 2 * x], 1) ** 2).sum()),
    "stack": (lambda x: np.sum(np.stack([x, x * x], axis=-1)[..., 1]),
              lambda x: torch.stack([x, x * x], -1)[..., 1].sum()),
    "where": (lambda x: np.where(XB > 0, x * x, -x).sum(),
              lambda x: torch.where(torch.tensor(X > 0), x * x, -x).sum()),
    "reshape transpose": (lambda x: (np.transpose(np.reshape(x, (3, 2))) * AB.T).sum(),
                          lambda x: (x.reshape(3, 2).T * torch.tensor(A.T)).sum()),
    "trace outer": (lambda x: np.trace(np.outer(x[0], x[1])),
                    lambda x: torch.trace(torch.outer(x[0], x[1]))),
    "flip pad": (lambda x: (np.pad(np.flip(x, 1), 1) ** 2).sum(),
                 lambda x: (torch.nn.functional.pad(torch.flip(x, [1]), (1, 1, 1, 1)) ** 2).sum()),
    "split copy": (lambda x: (np.copy(x) * np.split(x, 3, axis=1)[2]).sum(),
                   lambda x: (x.clone() * x[:, 2:]).sum()),
    "squeeze expand_dims": (lambda x: np.sum(np.squeeze(np.expand_dims(x, 0)) ** 3),
                            lambda x: (x ** 3).sum()),
}


@pytest.mark.parametrize("name", ON_THE_TAPE)
def test_numpy_functions_on_tensors_stay_on_the_tape(name):
    ours, theirs = ON_THE_TAPE[name]
    np.testing.assert_allclose(npy(eg.grad(ours)(XB)), torch_grad(theirs, X), rtol=1e-12)
    # Outside a transform too, on a leaf that requires grad.
    x = eg.tensor(XB, requires_grad=True)
    ours(x).backward()
    np.testing.assert_allclose(npy(x.grad), torch_grad(theirs, X), rtol=1e-12)


@numpy_only
def test_numpy_functions_without_an_op_raise_naming_it():
    x = eg.tensor(X, requires_grad=True)
    with pytest.raises(TypeError, match=r"numpy.linalg.norm .*eg.sqrt"):
        np.linalg.norm(x)
    with pytest.raises(TypeError, match="numpy.floor"):
        eg.grad(lambda x: np.floor(x).sum())(X)
    with pytest.raises(TypeError, match="numpy.cumprod"):
        eg.grad(lambda x: np.cumprod(x).sum())(X)
    with pytest.raises(TypeError, match="out="):
        np.exp(x, out=np.empty_like(X))
    # Results without a derivative are fine on any tensor; constants work as ndarrays.
    assert np.allclose(x, X) and np.argmax(x) == 2 and np.shape(x) == X.shape
    assert npy(np.isnan(x)).dtype == bool
    np.testing.assert_allclose(x * 1.0, X)
    c = eg.tensor(X)
    assert isinstance(np.concatenate([c, c]), eg.Tensor)
    np.testing.assert_array_equal(npy(np.floor(c)), np.floor(X))
    assert np.linalg.norm(c) == pytest.approx(np.linalg.norm(X))
    with eg.no_grad():  # nothing records: the values are what is asked for
        assert np.linalg.norm(x) == pytest.approx(np.linalg.norm(X))


CONVERSIONS = {
    "numpy()": lambda x: eg.tensor(x.numpy()).sum(),
    "numpy.asarray": lambda x: eg.tensor(np.asarray(x * 2)).sum(),
    "tolist()": lambda x: eg.tensor(x.tolist()).sum(),
    "float()": lambda x: x.sum() * float(x[0]),
    "item()": lambda x: x.sum() * x[1].item(),
}


@pytest.mark.parametrize("what", CONVERSIONS)
def test_leaving_the_tape_inside_a_transform_raises(what):
    with pytest.raises(eg.TracerConversionError, match=what.replace("(", r"\(").replace(")", r"\)")):
        eg.grad(CONVERSIONS[what])(xb(np.array([1.0, 2.0])))
    # Detached values, constants and branching on a value are fine.
    def f(x):
        scale = float(x.detach().sum()) + float(eg.tensor(xb(np.array(2.0))))
        return (x * scale).sum() if bool(x.sum() > 0) else x.sum()
    np.testing.assert_allclose(npy(eg.grad(f)(xb(np.array([1.0, 2.0])))), [5.0, 5.0])


# -- in-place changes and the version counter -------------------------------------------

def test_in_place_sgd_under_no_grad_trains_the_model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4))
    x, y = xb(x), xb(x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 1.0)
    model = nn.Linear(4, 1)
    if NAME != "numpy":
        model.to(eg.tensor(x).device if NAME == "cupy" else eg.backends.strict.STRICT)
    losses = []
    for _ in range(50):
        loss = ((model(eg.tensor(x)) - y) ** 2).mean()
        losses.append(float(loss))
        model.zero_grad()
        loss.backward()
        with eg.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    assert losses[-1] < 0.01 * losses[0]  # it used to stay flat: -= rebound the loop variable
    assert all(p.requires_grad for p in model.parameters())


def test_in_place_on_a_leaf_that_requires_grad_raises_outside_no_grad():
    w = eg.tensor(xb(np.array([1.0, 2.0])), requires_grad=True)
    before = npy(w).copy()
    for change in (lambda: w.__isub__(0.1), lambda: w.__setitem__(0, 5.0)):
        with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
            change()
    np.testing.assert_array_equal(npy(w), before)  # nothing half-written
    with eg.no_grad():
        w -= 0.5
        w[1] = 7.0
    np.testing.assert_array_equal(npy(w), [0.5, 7.0])
    assert w.requires_grad and w.is_leaf


def test_in_place_on_a_constant_writes_its_buffer():
    buf = xb(np.zeros(3))
    t = eg.Tensor(buf)
    t += 1.0
    t[0] = 5.0
    t *= 2.0
    np.testing.assert_array_equal(npy(buf), [10.0, 2.0, 2.0])
    i = eg.tensor(xb(np.arange(3)))
    with pytest.raises(TypeError, match="cannot be cast"):
        i += 0.5  # as NumPy and torch: a float result does not go into an integer tensor


def test_in_place_on_a_non_leaf_is_differentiated_as_torch():
    x0 = np.array([1.0, -2.0, 3.0, 0.5])

    def changed(a, tanh):  # the same in-place program for both libraries
        b = a * 2.0
        b[1] = a[0] * 10.0
        b[2:] = tanh(a[:2])
        b += a
        b *= a
        b /= 3.0
        b -= a * a
        return b

    ours, theirs = (lambda a: changed(a, eg.tanh)), (lambda a: changed(a, torch.tanh))

    a = eg.tensor(xb(x0), requires_grad=True)
    (ours(a) ** 2).sum().backward()
    ta = torch.tensor(x0, requires_grad=True)
    (theirs(ta) ** 2).sum().backward()
    np.testing.assert_allclose(npy(a.grad), ta.grad.numpy(), rtol=1e-12)
    # Inside transforms, to second order, against torch.func.
    H = eg.hessian(lambda a: ours(a).sum())(xb(x0))
    np.testing.assert_allclose(npy(H), torch.func.hessian(lambda a: theirs(a).sum())(
        torch.tensor(x0)).numpy(), rtol=1e-12, atol=1e-12)


def test_setitem_broadcasts_casts_and_refuses_repeated_positions():
    a = eg.tensor(xb(np.zeros((2, 3))), requires_grad=True)
    b = a * 1.0
    v = eg.tensor(xb(np.array([1.0, 2.0, 3.0], dtype=np.float32)), requires_grad=True)
    b[0] = v  # float32 into float64, as NumPy
    b[1, ::2] = 4.0
    assert b.dtype == np.float64
    (b * xb(np.arange(6.0).reshape(2, 3))).sum().backward()
    np.testing.assert_array_equal(npy(v.grad), [0, 1, 2])
    assert v.grad.dtype == np.float32
    np.testing.assert_array_equal(npy(a.grad), [[0, 0, 0], [0, 4, 0]])
    c = a * 1.0
    with pytest.raises(ValueError, match="more than once"):
        c[xb(np.array([0, 0]))] = v * 1.0
    with pytest.raises(RuntimeError, match="input a transform differentiates"):
        eg.grad(lambda x: x.__setitem__(0, 1.0) or x.sum())(xb(np.zeros(2)))


def test_changing_a_saved_tensor_makes_backward_raise_naming_the_op():
    x = eg.tensor(xb(np.array([1.0, 2.0])))
    w = eg.tensor(xb(np.array([0.5, -1.0])), requires_grad=True)
    y = (x * w).sum()
    opt = optim.SGD([w], lr=0.1)
    w.grad = eg.tensor(xb(np.ones(2)))
    opt.step()
    with pytest.raises(RuntimeError, match="op 'mul'.*changed in place"):
        y.backward()
    y = eg.exp(w).sum()
    with eg.no_grad():
        w[:] = 100.0
    with pytest.raises(RuntimeError, match="op 'exp'"):
        y.backward()
    # An output changed in place (exp's VJP reads its output) raises too.
    e = eg.exp(w * 1.0)
    with eg.no_grad():
        e += 1.0
    with pytest.raises(RuntimeError, match="op 'exp'.*its output"):
        e.sum().backward()
    # A fresh forward after the change is fine.
    (x * w).sum().backward()


def test_load_state_dict_bumps_versions():
    lin = nn.Linear(2, 1)
    if NAME != "numpy":
        pytest.skip("state dicts are host arrays")
    y = lin(eg.tensor(np.ones((1, 2)))).sum()
    lin.load_state_dict({k: v + 1 for k, v in lin.state_dict().items()})
    with pytest.raises(RuntimeError, match="changed in place"):
        y.backward()


# -- complex values: refused wherever they would be differentiated -------------------------

def test_complex_tensors_are_never_differentiated():
    z = xb(np.array([1 + 2j, 3 - 1j]))
    with pytest.raises(TypeError, match="complex"):
        eg.tensor(z, requires_grad=True)
    with pytest.raises(TypeError, match="complex"):
        eg.Tensor(z).requires_grad_()
    with pytest.raises(TypeError, match="complex"):
        eg.grad(lambda z: abs(eg.einsum("i,i->", z, z)))(z)
    w = eg.tensor(xb(np.array([0.5, 2.0])), requires_grad=True)
    with pytest.raises(TypeError, match="op 'einsum' gives a complex"):
        eg.einsum("i,i->", w, eg.Tensor(z))
    with pytest.raises(TypeError, match="complex"):  # inside a transform: at the derivative
        eg.grad(lambda w: abs(eg.einsum("i,i->", w, eg.Tensor(z))))(xb(np.array([0.5, 2.0])))
    with pytest.raises(TypeError, match="complex"):
        eg.jvp(lambda w: (w * eg.Tensor(z)).sum(), (xb(np.ones(2)),), (xb(np.ones(2)),))
    # Complex values that nothing differentiates compute as NumPy does.
    got = eg.einsum("i,i->", eg.Tensor(z), eg.Tensor(z))
    np.testing.assert_allclose(npy(got), np.einsum("i,i->", npy(z), npy(z)))


def test_only_floating_tensors_require_grad():
    with pytest.raises(TypeError, match="floating-point"):
        eg.Tensor(xb(np.arange(3)), requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        eg.Tensor(xb(np.arange(3))).requires_grad_()
    with pytest.raises(TypeError, match="floating-point"):
        nn.Parameter(xb(np.arange(3)))


def test_backward_casts_the_cotangent_to_the_tensor_dtype_as_torch():
    x = eg.tensor(xb(np.ones(3, dtype=np.float32)), requires_grad=True)
    (x * 2.0).backward(xb(np.ones(3, dtype=np.float64)))
    assert x.grad.dtype == np.float32
    tx = torch.ones(3, requires_grad=True)
    (tx * 2.0).backward(torch.ones(3, dtype=torch.float64))
    np.testing.assert_array_equal(npy(x.grad), tx.grad.numpy())


def test_reshape_refuses_two_unknown_sizes_and_negative_ones():
    x = eg.tensor(xb(np.zeros((2, 3))))
    with pytest.raises(ValueError, match="one -1"):
        x.reshape(-1, -1)
    with pytest.raises(ValueError, match="no other negative"):
        x.reshape(-2, -3)
    assert x.reshape(-1, 2).shape == (3, 2)


# -- elementwise_grad proves its precondition ------------------------------------------------

V, M = np.array([1.0, 2.0]), np.arange(1.0, 7.0).reshape(2, 3)
MIXING = {"sum": (lambda x: x * x.sum(), V), "reversed": (lambda x: x[::-1] * x, V),
          "row sum": (lambda x: x * x.sum(-1, keepdims=True), M),
          "column sum": (lambda x: x * x.sum(0), M),
          "softmax": (lambda x: eg.softmax(x, -1), M), "matmul": (lambda x: x @ x.T @ x, M)}


@pytest.mark.parametrize("name", MIXING)
def test_elementwise_grad_refuses_functions_that_mix_elements(name):
    f, x = MIXING[name]
    with pytest.raises(eg.BatchMixingError):
        eg.elementwise_grad(f)(xb(x))


def test_elementwise_grad_matches_the_jacobian_diagonal():
    x = np.linspace(-2.0, 2.0, 6).reshape(2, 3)
    f = lambda x: eg.tanh(x) * x + eg.sigmoid(x) ** 2  # noqa: E731
    J = npy(eg.jacrev(f)(xb(x))).reshape(6, 6)
    np.testing.assert_allclose(npy(eg.elementwise_grad(f)(xb(x))).ravel(), np.diag(J), rtol=1e-12)
