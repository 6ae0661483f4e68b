"""A gradient checker for users' functions: derivatives against finite differences.

:func:`check_grads` follows HIPS autograd's idea: at random directions, the
forward-mode JVP must match a central finite difference of ``f``, and the
reverse-mode VJP must satisfy ``<vjp(u), v> == <u, jvp(v)>`` against the same
finite difference. With ``order > 1`` the derivative functions themselves
(``(x, v) -> jvp`` and ``(x, u) -> vjp``) are checked the same way, so an
order-2 check exercises forward-over-forward, reverse-over-forward,
forward-over-reverse and reverse-over-reverse.

Everything runs in float64 on the arguments' own backend.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy

from .backends import backend_of
from .tensor import Tensor, as_tensor, no_grad
from .transforms import jvp, vjp

__all__ = ["check_grads"]

_MODES = ("fwd", "rev")


def check_grads(f: Callable[..., Tensor], *args: Any, order: int = 2,
                modes: Sequence[str] = _MODES, eps: float = 1e-6, rtol: float = 1e-5,
                atol: float = 1e-6, seed: int = 0) -> None:
    """Check ``f``'s derivatives to ``order`` against central finite differences.

    Args:
        f: a function of Tensors returning one Tensor.
        *args: the point to check at: Tensors, backend arrays or numbers
            (cast to float64; integers are not differentiable).
        order: how many times to differentiate; 2 also checks the JVP and VJP
            functions' own derivatives.
        modes: ``"fwd"`` (JVP), ``"rev"`` (VJP), or both.
        eps: the finite-difference step.
        rtol: relative tolerance of each comparison.
        atol: absolute tolerance of each comparison.
        seed: seeds the random directions and cotangents.

    Raises:
        AssertionError: a derivative disagrees with finite differences; the
            message names the mode, the order and the size of the error.
        ValueError: an unknown mode or an order below 1.
    """
    bad = set(modes) - set(_MODES)
    if bad or order < 1:
        raise ValueError(f"check_grads: modes must be among {_MODES} and order >= 1, "
                         f"got modes={tuple(modes)}, order={order}")
    rng = numpy.random.default_rng(seed)
    xs = [_float64(a) for a in args]
    name = getattr(f, "__name__", "f")
    _check(f, xs, order, tuple(modes), eps, rtol, atol, rng, name, 1)


def _check(f, xs, order, modes, eps, rtol, atol, rng, name, level) -> None:
    """One level of :func:`check_grads`, recursing into the derivative functions."""
    out = Tensor(_value(f, xs))
    vs = [_randn_like(x, rng) for x in xs]
    numeric = _numeric_jvp(f, xs, vs, eps)
    where = f"{name} (derivative order {level})"
    if "fwd" in modes:
        _, t = jvp(f, tuple(xs), tuple(vs))
        _assert_close(_np(t), numeric, rtol, atol, f"forward mode (JVP) of {where}")
    if "rev" in modes:
        u = _randn_like(out, rng)
        _, pull = vjp(f, *xs)
        cots = pull(u)
        lhs = sum(float(numpy.vdot(_np(c), _np(v))) for c, v in zip(cots, vs))
        rhs = float(numpy.vdot(_np(u), numeric))
        _assert_close(numpy.asarray(lhs), numpy.asarray(rhs), rtol, atol,
                      f"reverse mode (VJP) of {where}: <vjp(u), v> against "
                      f"<u, finite-difference jvp(v)>")
    if order <= 1:
        return
    n = len(xs)
    if "fwd" in modes:
        def jvp_fn(*a):
            return jvp(f, a[:n], a[n:])[1]
        _check(jvp_fn, xs + vs, order - 1, modes, eps, rtol, atol, rng,
               f"jvp of {name}", level + 1)
    if "rev" in modes:
        u = _randn_like(out, rng)
        for k in range(n):
            def vjp_fn(*a, k=k):
                return vjp(f, *a[:n])[1](a[n])[k]
            _check(vjp_fn, xs + [u], order - 1, modes, eps, rtol, atol, rng,
                   f"vjp of {name} w.r.t. argument {k}", level + 1)


def _float64(a: Any) -> Tensor:
    return Tensor(as_tensor(a).data.astype("float64"))


def _randn_like(x: Tensor, rng: numpy.random.Generator) -> Tensor:
    xp = backend_of(x.data)
    return Tensor(xp.asarray(rng.standard_normal(x.shape)).astype(x.dtype))


def _value(f: Callable, xs: Sequence[Tensor]):
    """``f(*xs)``'s data, evaluated without recording."""
    with no_grad():
        return as_tensor(f(*xs)).data


def _numeric_jvp(f, xs, vs, eps) -> numpy.ndarray:
    """``(f(x + eps v) - f(x - eps v)) / (2 eps)`` as a NumPy array."""
    with no_grad():
        hi = f(*[Tensor(x.data + eps * v.data) for x, v in zip(xs, vs)])
        lo = f(*[Tensor(x.data - eps * v.data) for x, v in zip(xs, vs)])
    return (_np(hi) - _np(lo)) / (2 * eps)


def _np(t: Any) -> numpy.ndarray:
    data = t.data if isinstance(t, Tensor) else t
    return numpy.asarray(backend_of(data).to_numpy(data)).view(numpy.ndarray)


def _assert_close(got: numpy.ndarray, want: numpy.ndarray, rtol: float, atol: float,
                  what: str) -> None:
    got, want = numpy.asarray(got, dtype=float), numpy.asarray(want, dtype=float)
    if got.shape != want.shape:
        raise AssertionError(f"check_grads: {what}: shape {got.shape}, finite differences "
                             f"give {want.shape}")
    if not numpy.allclose(got, want, rtol=rtol, atol=atol):
        err = numpy.max(numpy.abs(got - want))
        raise AssertionError(f"check_grads: {what} does not match finite differences: "
                             f"max abs error {err:.3g} (rtol={rtol}, atol={atol})\n"
                             f"got:\n{got}\nfinite differences:\n{want}")
