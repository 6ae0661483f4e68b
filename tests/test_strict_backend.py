"""The strict stand-in backend is strict, and einsumgrad stays on it end to end.

The stand-in is what proves the CuPy path on CPU-only machines, so these tests
check both halves: the stand-in refuses plain NumPy arrays exactly where a
device array would, and every kind of einsumgrad computation on strict inputs
(einsum, element-wise rules, indexing, transforms, nn, optimizers) returns
strict results with NumPy's numbers. These run on every backend setting.
"""
import math
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import einsumgrad as eg
from einsumgrad.backends import NUMPY, backend_of, device_backend
from einsumgrad.backends.strict import STRICT, MixedArrayError, StrictArray, to_numpy, to_strict

ROOT = pathlib.Path(__file__).resolve().parents[1]
A = np.arange(6.0).reshape(2, 3) / 7
B = np.linspace(-1, 1, 12).reshape(3, 4)


def is_strict(x) -> bool:
    data = x.data if isinstance(x, eg.Tensor) else x
    return type(data) is StrictArray


# -- the stand-in itself ----------------------------------------------------------

@pytest.mark.parametrize("mix", [
    lambda s, p: s + p,
    lambda s, p: p * s,                       # ndarray's op first: reaches __array_ufunc__
    lambda s, p: np.maximum(s, p),
    lambda s, p: np.add(s, 1.0, out=p),
    lambda s, p: np.einsum("ij,ij->", s, p),  # __array_function__
    lambda s, p: np.where(s > 0, s, p),
    lambda s, p: STRICT.matmul(s, p.T),       # the namespace refuses host arrays
    lambda s, p: STRICT.einsum("ij,ij->i", s, p),
    lambda s, p: s[p.astype(int)],            # a host index array
    lambda s, p: s.__setitem__(Ellipsis, p),
    lambda s, p: STRICT.add_at(s, np.array([0, 1]), p[0]),
])
def test_mixing_with_plain_numpy_raises(mix):
    with pytest.raises(MixedArrayError, match="plain numpy array"):
        mix(to_strict(A), A.copy())


def test_scalars_mix_freely():
    s = to_strict(A)
    for other in (2, 2.5, np.float32(2), np.float64(2), np.array(2.0)):
        assert is_strict(s * other) and is_strict(other - s)
    np.testing.assert_array_equal(to_numpy(s * 2.5), A * 2.5)


def test_namespace_makes_strict_arrays_with_numpys_numbers():
    s, t = to_strict(A), to_strict(B)
    xp = STRICT
    cases = {
        "zeros": (xp.zeros((2, 3)), np.zeros((2, 3))),
        "ones": (xp.ones(3, dtype=np.float32), np.ones(3, dtype=np.float32)),
        "eye": (xp.eye(3), np.eye(3)),
        "einsum": (xp.einsum("ij,jk->ik", s, t), A @ B),
        "matmul": (xp.matmul(s, t), A @ B),
        "exp": (xp.exp(s), np.exp(A)),
        "where": (xp.where(s > 0.3, s, 0.0), np.where(A > 0.3, A, 0.0)),
        "broadcast_to": (xp.broadcast_to(s[:1], (4, 3)), np.broadcast_to(A[:1], (4, 3))),
        "sum": (xp.sum(s), np.sum(A)),
        "method sum": (s.sum(axis=0), A.sum(axis=0)),
        "erf": (xp.erf(s), np.vectorize(math.erf)(A)),
        "as_strided": (xp.as_strided(s, shape=(2,), strides=(4 * 8,)), A.ravel()[::4]),
        "asarray": (xp.asarray(A), A),
    }
    for name, (got, want) in cases.items():
        assert is_strict(got), name
        np.testing.assert_allclose(to_numpy(got), want, atol=1e-5, err_msg=name)
    z = xp.zeros(3)
    xp.add_at(z, xp.asarray([0, 2, 0]), xp.asarray([1.0, 2.0, 3.0]))
    assert is_strict(z)
    np.testing.assert_array_equal(to_numpy(z), [4.0, 0.0, 2.0])


def test_to_numpy_is_a_plain_copy():
    s = to_strict(A)
    h = STRICT.to_numpy(s)
    assert type(h) is np.ndarray
    h[0, 0] = 99.0
    assert to_numpy(s)[0, 0] == 0.0


# -- einsumgrad on strict arrays ------------------------------------------------------

def test_backend_is_chosen_by_type():
    assert backend_of(to_strict(A)) is STRICT and backend_of(A) is NUMPY
    assert device_backend("strict") is STRICT and device_backend("cpu") is NUMPY


def test_reverse_mode_stays_strict():
    x = eg.tensor(to_strict(A), requires_grad=True)
    w = eg.tensor(to_strict(B), requires_grad=True)
    loss = (eg.gelu(x @ w) ** 2).mean() + eg.logsumexp(eg.sin(x), axis=1).sum()
    loss.backward()
    assert is_strict(loss) and is_strict(x.grad) and is_strict(w.grad)
    xh, wh = eg.tensor(A, requires_grad=True), eg.tensor(B, requires_grad=True)
    ((eg.gelu(xh @ wh) ** 2).mean() + eg.logsumexp(eg.sin(xh), axis=1).sum()).backward()
    np.testing.assert_allclose(x.grad.numpy(), xh.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), wh.grad.numpy(), rtol=1e-12)


def f_mixed(x):
    """Every rule family: einsum (with a diagonal), element-wise, indexing, softmax."""
    y = eg.einsum("ii,ij->ij", x[:, :2] @ x[:, :2].T + 1.0, x)
    return eg.softmax(eg.tanh(y) * eg.sigmoid(x) + eg.softplus(x[[1, 0]]), axis=0)


@pytest.mark.parametrize("transform", [
    lambda f, x: eg.jacrev(f)(x),
    lambda f, x: eg.jacfwd(f)(x),
    lambda f, x: eg.hessian(lambda x: f(x).sum() ** 2)(x),
    lambda f, x: eg.jvp(f, (x,), (x * 0.5,))[1],
    lambda f, x: eg.vjp(f, x)[1](eg.tensor(x.data) * 2.0)[0],
    lambda f, x: eg.batch_jacobian(lambda x: eg.tanh(x * x.sum(axis=1, keepdims=True)))(x),
])
def test_transforms_stay_strict_and_match_numpy(transform):
    got = transform(f_mixed, eg.tensor(to_strict(A)))
    want = transform(f_mixed, eg.tensor(A))
    assert is_strict(got)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


def test_einsum_jacobian_materializes_on_the_backend():
    j = eg.derive("ij,jk->ik").jacobian(1).materialize(to_strict(A), to_strict(B))
    assert is_strict(j)
    np.testing.assert_allclose(to_numpy(j), eg.derive("ij,jk->ik").jacobian(1).materialize(A, B))


# -- devices -----------------------------------------------------------------------

def test_tensor_keeps_device_and_moves_on_request():
    t = eg.tensor(to_strict(A), dtype=np.float32)
    assert is_strict(t) and t.dtype == np.float32 and t.device == "strict"
    host = t.to("cpu")
    assert type(host.data) is np.ndarray and host.device == "cpu"
    assert type(t.numpy()) is np.ndarray and type(np.asarray(t)) is np.ndarray
    back = host.to("strict")
    assert is_strict(back)
    np.testing.assert_array_equal(back.numpy(), A.astype(np.float32))


@pytest.mark.parametrize("op", [
    lambda d, h: d + h,
    lambda d, h: h * d,
    lambda d, h: eg.einsum("ij,ij->i", d, h),
    lambda d, h: d @ h.T,
    lambda d, h: eg.where(d.data > 0, d, h),
])
def test_mixing_devices_in_one_op_names_both(op):
    d, h = eg.tensor(to_strict(A)), eg.tensor(A)
    with pytest.raises(ValueError, match=r"two devices: .*strict.*numpy \(cpu\)|"
                                         r"two devices: numpy \(cpu\).*strict") as info:
        op(d, h)
    assert not isinstance(info.value, MixedArrayError)  # einsumgrad's error, not the array's
    assert info.value.__context__ is None or info.value.__suppress_context__


@pytest.mark.parametrize("make_opt", [
    lambda optim, ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda optim, ps: optim.Adam(ps, lr=1e-2, weight_decay=0.01),
])
def test_module_and_optimizer_follow_the_device(make_opt):
    nn = pytest.importorskip("einsumgrad.nn")
    optim = pytest.importorskip("einsumgrad.optim")
    results = {}
    for device, x in (("strict", to_strict(A)), ("cpu", A)):
        model = nn.Sequential(nn.Linear(3, 4, rng=np.random.default_rng(1)),
                              nn.Linear(4, 2, bias=False, rng=np.random.default_rng(2))).to(device)
        opt = make_opt(optim, model.parameters())
        for _ in range(3):
            opt.zero_grad()
            ((eg.tanh(model(eg.tensor(x))) - 1.0) ** 2).mean().backward()
            opt.step()
        if device == "strict":
            assert all(is_strict(p) and is_strict(p.grad) for p in model.parameters())
            assert all(type(v) is np.ndarray for v in model.state_dict().values())
        results[device] = model.to("cpu").state_dict()
        assert all(type(p.data) is np.ndarray for p in model.parameters())
    for name, v in results["cpu"].items():
        np.testing.assert_allclose(results["strict"][name], v, rtol=1e-12, err_msg=name)


def test_cupy_is_imported_lazily(tmp_path):
    # A fake `cupy` that explodes on import: CPU work must never touch it.
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("raise RuntimeError('cupy was imported')\n")
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import einsumgrad as eg
        x = eg.tensor(np.ones((3, 3)), requires_grad=True)
        eg.hessian(lambda x: eg.tanh(x @ x).sum())(x)
        (eg.softmax(x) * x).sum().backward()
        eg.tensor(x.data).to("cpu").numpy()
        assert "cupy" not in sys.modules, "cupy imported"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={"PYTHONPATH": f"{tmp_path}:{ROOT}"}, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
