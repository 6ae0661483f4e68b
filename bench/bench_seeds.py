"""The seed posts' derivative problems (issue #3): einsumgrad beside PyTorch's routes.

Four cases, float64, each timed side by side in this one run:

* seed 002: per-point Jacobians of a point-wise MLP 3-64-64-3 (tanh) on 100,000
  points, against ``torch.func.vmap(torch.func.jacrev(f))`` and the forum's
  ``torch.autograd.functional.jacobian`` route (run at a size it fits, compared
  per point); our peak memory against our forward pass.
* seed 001: the Jacobian ``[B, C, D]`` of a 784-256-10 classifier, B = 512,
  against ``vmap(jacrev)`` and the user's loop over classes.
* seed 000: ``einsum('bi,bjik,bk->bj', x, H, x)`` (H is (B, out, in, in)) for
  an MLP 16-64-8 (tanh), B = 256, as ``eg.directional(f, 2)(x, x)``, against
  ``vmap(hessian)`` + einsum and nested ``torch.func.jvp``.
* seed 003: ``materialize`` of the Jacobian of ``'bij,bjk->bik'`` (all sizes 16)
  against ``torch.autograd.functional.jacobian``; peak memory against J's size.
"""
from __future__ import annotations

import time

import numpy as np

import einsumgrad as eg
from common import median_time, peak_memory, report

try:
    import torch
    from torch.func import hessian as t_hessian, jacrev as t_jacrev, jvp as t_jvp, vmap
except ImportError:  # the torch columns are skipped
    torch = None

MB = 2.0 ** 20


def _mlp(sizes, rng):
    """Weights ``(out, in)`` and biases, as torch.nn.Linear lays them out."""
    return [(rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
            for i, o in zip(sizes[:-1], sizes[1:])]


def _eg_mlp(params, act=eg.tanh):
    def f(x):
        for n, (w, b) in enumerate(params):
            x = eg.einsum("...i,oi->...o", x, w) + b
            if n < len(params) - 1:
                x = act(x)
        return x
    return f


def _torch_mlp(params, act=None):
    tp = [(torch.tensor(w), torch.tensor(b)) for w, b in params]
    act = act or torch.tanh

    def f(x):
        for n, (w, b) in enumerate(tp):
            x = x @ w.T + b
            if n < len(tp) - 1:
                x = act(x)
        return x
    return f


def _once(fn) -> float:
    """Seconds of one call: for peers that take seconds (already warmed by a check)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_CHECKS: list = []  # this case's agreement lines, printed under its table


def _check(name, ours, theirs):
    err = np.abs(np.asarray(ours) - np.asarray(theirs)).max()
    _CHECKS.append(f"  check {name}: max |ours - torch| = {err:.1e}")


def _report(*args, **kwargs):
    report(*args, **kwargs)
    for line in _CHECKS:
        print(line)
    _CHECKS.clear()


def seed002(rng, n_points=100_000, n_forum=1_500):
    params = _mlp([3, 64, 64, 3], rng)
    f = _eg_mlp(params)
    x = rng.standard_normal((n_points, 3))
    ours = lambda: eg.batch_jacobian(f)(x)
    times = {"einsumgrad batch_jacobian": median_time(ours, repeat=5)}
    mem = peak_memory(ours) / peak_memory(lambda: f(x))
    if torch is not None:
        ft = _torch_mlp(params)
        xt = torch.tensor(x)
        _check("vs vmap(jacrev)", ours(), vmap(t_jacrev(ft))(xt))
        times["torch.func vmap(jacrev)"] = median_time(lambda: vmap(t_jacrev(ft))(xt), repeat=5)
        small = xt[:n_forum]
        forum = lambda: torch.autograd.functional.jacobian(ft, small).sum(dim=2)
        _check(f"vs forum route on {n_forum} points", ours()[:n_forum], forum())
        per_point = _once(forum) / n_forum
        times[f"forum jacobian (N={n_forum}, scaled)"] = per_point * n_points
    _report(f"seed 002: per-point Jacobians, MLP 3-64-64-3 tanh, {n_points:,} points", times,
           ours="einsumgrad batch_jacobian",
           targets={"torch.func vmap(jacrev)": 1.0, f"forum jacobian (N={n_forum}, scaled)": 0.02},
           note="forum route timed at its size, scaled per point")
    print(f"  peak memory: {mem:.2f}x the forward pass (target < 3x: "
          f"{'met' if mem < 3 else 'MISSED'})")


def seed001(rng, batch=512):
    params = _mlp([784, 256, 10], rng)
    f = _eg_mlp(params, eg.relu)
    x = rng.standard_normal((batch, 784))
    ours = lambda: eg.batch_jacobian(f)(x)
    times = {"einsumgrad batch_jacobian": median_time(ours)}
    if torch is not None:
        ft = _torch_mlp(params, torch.relu)
        xt = torch.tensor(x)

        def loop():  # the user's compute_grad, returning [B, C, D]
            inp = xt.clone().requires_grad_(True)
            out = ft(inp)
            grads = [torch.autograd.grad(out[:, i], inp, torch.ones(len(inp)),
                                         retain_graph=True, create_graph=True)[0]
                     for i in range(out.size(1))]
            return torch.stack(grads, dim=1)
        _check("vs vmap(jacrev)", ours(), vmap(t_jacrev(ft))(xt))
        times["torch.func vmap(jacrev)"] = median_time(lambda: vmap(t_jacrev(ft))(xt))
        times["user's loop over classes"] = median_time(loop)
    _report(f"seed 001: Jacobian [B, C, D] of a 784-256-10 classifier, B = {batch}", times,
           ours="einsumgrad batch_jacobian",
           targets={"torch.func vmap(jacrev)": 1.0, "user's loop over classes": 1.0})


def seed000(rng, batch=256):
    params = _mlp([16, 64, 8], rng)
    f = _eg_mlp(params)
    x = rng.standard_normal((batch, 16))
    ours = lambda: eg.directional(f, 2)(x, x)
    times = {"einsumgrad directional(f, 2)": median_time(ours)}
    if torch is not None:
        ft = _torch_mlp(params)
        xt = torch.tensor(x)
        via_h = lambda: torch.einsum("bi,bjik,bk->bj", xt, vmap(t_hessian(ft))(xt), xt)
        nested = lambda: t_jvp(lambda y: t_jvp(ft, (y,), (xt,))[1], (xt,), (xt,))[1]
        _check("vs vmap(hessian) + einsum", ours(), via_h())
        times["vmap(hessian) + einsum"] = median_time(via_h)
        times["nested torch.func.jvp"] = median_time(nested)
    _report(f"seed 000: einsum('bi,bjik,bk->bj', x, H, x), MLP 16-64-8 tanh, B = {batch}", times,
           ours="einsumgrad directional(f, 2)",
           targets={"vmap(hessian) + einsum": 0.2, "nested torch.func.jvp": 1.0})


def seed003(rng, n=16):
    x, w = rng.standard_normal((n, n, n)), rng.standard_normal((n, n, n))
    jac = eg.derive("bij,bjk->bik").jacobian(0)
    ours = lambda: jac.materialize(x, w)
    times = {"einsumgrad materialize": median_time(ours, repeat=5)}
    j_bytes = n ** 6 * 8
    mem = peak_memory(ours) / j_bytes
    if torch is not None:
        wt = torch.tensor(w)
        tj = lambda: torch.autograd.functional.jacobian(
            lambda a: torch.einsum("bij,bjk->bik", a, wt), torch.tensor(x))
        _check("vs torch jacobian", ours(), tj())
        times["torch.autograd.functional.jacobian"] = _once(tj)
    _report(f"seed 003: materialize J of 'bij,bjk->bik', sizes {n} ({n ** 6 / 1e6:.1f}M entries)",
           times, ours="einsumgrad materialize",
           targets={"torch.autograd.functional.jacobian": 0.1})
    print(f"  peak memory: {mem:.2f}x J's own {j_bytes / MB:.0f} MiB (target <= 1.5x: "
          f"{'met' if mem <= 1.5 else 'MISSED'})")


def main() -> None:
    rng = np.random.default_rng(0)
    seed002(rng)
    seed001(rng)
    seed000(rng)
    seed003(rng)


if __name__ == "__main__":
    main()
