"""Attention's core as one primitive (einsumgrad.rules.attention) against torch, its
rules, finite differences and the transforms; the NumPy backend's kernels for it
(one pair of matrices at a time on MKL's OpenMP team) against the rules."""
import numpy as np
import pytest
import torch

import einsumgrad as eg
from einsumgrad.nn import functional as F
from einsumgrad.rules.attention import attention
from einsumgrad.testing import check_grads

from backends import NAME, npy, xb

TF = torch.nn.functional


def core(q, k, v):
    """The primitive itself, on any backend (scaled_dot_product_attention binds it
    only where the backend's kernel runs: test_openmp.py)."""
    return attention(q, k, v, 1.0 / np.sqrt(q.shape[-1]))


WAYS = [core, F.scaled_dot_product_attention]


def _qkv(rng, b=3, h=2, lq=5, lk=7, d=4, dv=3, dtype=np.float64):
    """q, k, v as attention's projections leave them: heads inside the rows (strided)."""
    q = rng.standard_normal((b, lq, h, d)).astype(dtype).transpose(0, 2, 1, 3)
    k = rng.standard_normal((b, lk, h, d)).astype(dtype).transpose(0, 2, 1, 3)
    v = rng.standard_normal((b, lk, h, dv)).astype(dtype).transpose(0, 2, 1, 3)
    return q, k, v


def _both(way, q, k, v, g, tol):
    tq, tk, tv = (torch.tensor(np.ascontiguousarray(a), requires_grad=True) for a in (q, k, v))
    want = TF.scaled_dot_product_attention(tq, tk, tv)
    want.backward(torch.tensor(g))
    ts = [eg.tensor(xb(a), requires_grad=True) for a in (q, k, v)]
    y = way(*ts)
    y.backward(xb(g))
    for got, ref in zip([y] + [t.grad for t in ts], [want, tq.grad, tk.grad, tv.grad]):
        ref = ref.detach().numpy()
        np.testing.assert_allclose(npy(got), ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape", [dict(), dict(lq=7, lk=7, d=4, dv=4),
                                   dict(b=1, h=1, lq=1, lk=1)])
def test_attention_and_its_gradients_match_torch(way, dtype, tol, shape):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, dtype=dtype, **shape)
    g = rng.standard_normal(q.shape[:3] + v.shape[3:]).astype(dtype)
    _both(way, q, k, v, g, tol)


def test_a_backward_that_records_nothing_agrees_with_the_rules():
    """The array path (the backend's kernels where they run: test_openmp.py) against
    the rules, recorded (create_graph)."""
    rng = np.random.default_rng(1)
    q, k, v = (xb(a) for a in _qkv(rng))
    f = lambda q, k, v: (core(q, k, v) ** 3).sum()  # noqa: E731
    fast = eg.grad(f, argnums=(0, 1, 2))(q, k, v)
    ts = [eg.tensor(a, requires_grad=True) for a in (q, k, v)]
    f(*ts).backward(create_graph=True)  # the rules, recorded
    for a, t in zip(fast, ts):
        np.testing.assert_allclose(npy(a), npy(t.grad), rtol=1e-12, atol=1e-12)


def test_derivatives_of_every_order_and_mode():
    rng = np.random.default_rng(2)
    q, k, v = (xb(a) for a in _qkv(rng, b=2, h=1, lq=3, lk=4, d=2, dv=2))
    check_grads(core, q, k, v, order=2)


@pytest.mark.parametrize("way", WAYS)
def test_non_finite_scores_as_torch(way):
    """A row with inf or NaN among its scores: torch's NaNs (the kernel leaves such
    rows to the arrays' path)."""
    rng = np.random.default_rng(3)
    q, k, v = (np.ascontiguousarray(a) for a in _qkv(rng))
    q[0, 1, 2, 0] = np.inf
    k[1, 0, 3, 1] = np.nan
    want = TF.scaled_dot_product_attention(*(torch.tensor(a) for a in (q, k, v))).numpy()
    got = npy(way(*(eg.tensor(xb(a)) for a in (q, k, v))))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f", WAYS)
def test_vmap_and_batch_jacobian(f):
    rng = np.random.default_rng(4)
    q, k, v = (xb(np.ascontiguousarray(a)) for a in _qkv(rng, b=3, h=2, lq=2, lk=3, d=2, dv=2))
    whole = npy(f(q, k, v))
    np.testing.assert_allclose(npy(eg.vmap(f)(q, k, v)), whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(npy(eg.vmap(f, in_axes=(0, None, None))(q, k[0], v[0])),
                               npy(f(q, eg.tensor(k[:1]) * xb(np.ones((3, 1, 1, 1))),
                                     eg.tensor(v[:1]) * xb(np.ones((3, 1, 1, 1))))),
                               rtol=1e-12, atol=1e-12)
    # the examples along the batch axis: each one's Jacobian, no mixing
    jac = eg.batch_jacobian(lambda q: f(q, k, v))(q)
    full = eg.jacrev(lambda q: f(q, k, v))(q)
    for i in range(3):
        np.testing.assert_allclose(npy(jac)[i], npy(full)[i, ..., i, :, :, :], rtol=1e-12,
                                   atol=1e-12)
    # along the keys the softmax sums: refused, not a wrong answer
    with pytest.raises(eg.BatchMixingError):
        eg.batch_jacobian(lambda k: f(q, eg.moveaxis(k, 0, 2), v))(eg.moveaxis(k, 2, 0))


def test_without_the_kernels_the_arrays_path_agrees(monkeypatch):
    """Where the kernels decline (no team, a row's non-finite scores), a backward
    that records nothing runs the rules' products on arrays: the same gradients."""
    from einsumgrad.backends import backend_of
    rng = np.random.default_rng(5)
    q, k, v = (xb(a) for a in _qkv(rng))
    here = backend_of(q)
    f = lambda q, k, v: (core(q, k, v) ** 3).sum()  # noqa: E731
    want = eg.grad(f, argnums=(0, 1, 2))(q, k, v)
    monkeypatch.setattr(here, "attention", lambda *a: None)
    monkeypatch.setattr(here, "attention_vjp", lambda *a: None)
    for a, b in zip(eg.grad(f, argnums=(0, 1, 2))(q, k, v), want):
        np.testing.assert_allclose(npy(a), npy(b), rtol=1e-12, atol=1e-12)


def test_the_primitive_in_a_program_and_its_source(tmp_path):
    """jit replays the primitive; a program's source computes it with NumPy alone."""
    import subprocess
    import sys
    from einsumgrad import make_program
    rng = np.random.default_rng(6)
    q, k, v = (xb(np.ascontiguousarray(a)) for a in _qkv(rng))
    g = eg.grad(lambda q, k, v: (core(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    want = [npy(a) for a in g(q, k, v)]
    for a, b in zip(eg.jit(g)(q, k, v), want):
        np.testing.assert_allclose(npy(a), b, rtol=1e-12, atol=1e-12)
    p = make_program(g)(q, k, v)
    assert "attention" in str(p)
    if NAME != "numpy":
        return
    (tmp_path / "prog.py").write_text(p.source())
    np.savez(tmp_path / "ins.npz", npy(q), npy(k), npy(v))
    script = f"""
import sys, importlib.util, numpy as np
sys.modules['einsumgrad'] = None
spec = importlib.util.spec_from_file_location('prog', {str(tmp_path / 'prog.py')!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
fn = [v for k, v in vars(mod).items() if callable(v) and not k.startswith('_')
      and getattr(v, '__module__', None) == 'prog'][0]
ins = np.load({str(tmp_path / 'ins.npz')!r})
np.savez({str(tmp_path / 'outs.npz')!r}, *fn(*[ins[f'arr_{{i}}'] for i in range(3)]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    outs = np.load(tmp_path / "outs.npz")
    for i, b in enumerate(want):
        np.testing.assert_allclose(outs[f"arr_{i}"], b, rtol=1e-10, atol=1e-12)
