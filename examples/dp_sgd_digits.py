"""Differentially private SGD on scikit-learn's 8x8 digits: ``python examples/dp_sgd_digits.py``.

DP-SGD (Abadi et al., 2016) clips each example's gradient to norm ``C``, sums
the clipped gradients and adds Gaussian noise of standard deviation ``sigma*C``.
Here the clipping never builds a per-example gradient ("ghost clipping"):

1. ``eg.per_sample_grad_norm`` gives every example's gradient norm, each
   layer's share contracted from its per-sample pattern (``'bo,bi,bo,bi->b'``);
2. the clipped sum is the gradient of ``sum_b w_b loss_b`` with the constant
   weights ``w_b = min(1, C / norm_b)``: one ordinary backward pass.

Batches are Poisson samples (each example taken with probability ``q``), which
is what the privacy accounting assumes: the Renyi-DP of the subsampled Gaussian
mechanism (Mironov et al., 2019) at integer orders, turned into ``(epsilon,
delta)``. With torch installed the script also times one step against the
same step through ``torch.func.vmap(torch.func.grad(...))``.

Options: ``--epochs``, ``--sigma``, ``--clip``, ``--lr``, ``--batch`` (the
expected batch size), ``--delta``, ``--no-progress``, ``--no-torch``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import einsumgrad as eg  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402
from einsumgrad.vmap import per_sample_grad_norm  # noqa: E402

from _common import few_blas_threads, load_digits_split  # noqa: E402


def init_params(rng, sizes=(64, 32, 10)) -> dict:
    """An MLP's weights ``(out, in)`` and biases, float32."""
    p = {}
    for n, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"w{n}"] = (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)
        p[f"b{n}"] = np.zeros(o, dtype=np.float32)
    return p


def losses(p: dict, x, y):
    """Each example's cross-entropy, shape ``(B,)``: what per-sample norms need."""
    h = eg.tanh(F.linear(x, p["w0"], p["b0"]))
    return F.cross_entropy(F.linear(h, p["w1"], p["b1"]), y, reduction="none")


def dp_step(p: dict, x, y, clip: float, sigma: float, rng) -> tuple:
    """The noisy clipped gradient sum of one batch, and the batch's norms."""
    norms = np.asarray(per_sample_grad_norm(losses)(p, x, y))
    weights = np.minimum(1.0, clip / (norms + 1e-12)).astype(np.float32)
    g = eg.grad(lambda p: (losses(p, x, y) * weights).sum())(p)
    noisy = {k: np.asarray(v) + (sigma * clip * rng.standard_normal(v.shape)).astype(np.float32)
             for k, v in g.items()}
    return noisy, norms


def epsilon(q: float, sigma: float, steps: int, delta: float) -> tuple:
    """``(epsilon, order)`` of ``steps`` Poisson-subsampled Gaussian steps, from their
    Renyi-DP at integer orders (Mironov, Talwar & Zhang 2019, for integer alpha):
    ``A = sum_k C(a, k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 sigma^2))``,
    ``rdp = log(A) / (a - 1)``, and ``epsilon = steps * rdp + log((a-1)/a) -
    (log(delta) + log(a)) / (a - 1)`` (Balle et al. 2020), the best order taken."""
    best = (math.inf, None)
    for a in range(2, 257):
        k = np.arange(a + 1)
        log_binom = np.array([math.lgamma(a + 1) - math.lgamma(j + 1) - math.lgamma(a - j + 1)
                              for j in k])
        with np.errstate(divide="ignore"):
            terms = (log_binom + (a - k) * np.log1p(-q) + k * math.log(q)
                     + (k * k - k) / (2 * sigma ** 2))
        m = terms.max()
        rdp = (m + math.log(np.exp(terms - m).sum())) / (a - 1)
        # RDP to (epsilon, delta) by Balle et al. (2020), Theorem 21 (Opacus's)
        eps = steps * rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, (eps, a))
    return best


def accuracy(p: dict, x, y) -> float:
    with eg.no_grad():
        h = np.tanh(x @ p["w0"].T + p["b0"])
        return float(((h @ p["w1"].T + p["b1"]).argmax(1) == y).mean())


def train(epochs: float = 10, batch: int = 256, sigma: float = 1.5, clip: float = 1.0,
          lr: float = 8.0, delta: float = 1e-5, seed: int = 0, progress: bool = True) -> dict:
    """DP-SGD on the 75% split; returns the accuracy, the privacy spent and the time."""
    from tqdm import tqdm
    xtr, ytr, xte, yte = load_digits_split(seed)
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    n = len(xtr)
    q = batch / n
    steps = int(epochs / q)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="DP-SGD on digits", disable=not progress, leave=False)
    with few_blas_threads():
        for step in bar:
            take = np.flatnonzero(rng.random(n) < q)  # Poisson sampling
            if take.size == 0:
                continue  # nothing sampled: the noise alone would be added; skip it
            g, norms = dp_step(p, xtr[take], ytr[take], clip, sigma, rng)
            for k in p:  # the sum over the expected batch size, as in Abadi et al.
                p[k] = p[k] - (lr / batch) * g[k]
            if step % 10 == 0:
                bar.set_postfix(clipped=f"{(norms > clip).mean():.0%}",
                                acc=f"{accuracy(p, xte, yte):.1%}")
    seconds = time.perf_counter() - t0
    eps, order = epsilon(q, sigma, steps, delta)
    return {"accuracy": accuracy(p, xte, yte), "epsilon": eps, "order": order, "q": q,
            "steps": steps, "seconds": seconds, "params": p}


def time_against_torch(batch: int = 256, clip: float = 1.0, repeat: int = 30) -> tuple | None:
    """Seconds per step (norms and the clipped gradient sum) for ours and for
    ``torch.func.vmap(torch.func.grad(...))``, on one batch; None without torch."""
    try:
        import torch
        from torch.func import grad, vmap
    except ImportError:
        return None
    xtr, ytr, _, _ = load_digits_split(0)
    rng = np.random.default_rng(1)
    p = init_params(rng)
    x, y = xtr[:batch], ytr[:batch]
    tp = {k: torch.tensor(v) for k, v in p.items()}
    tx, ty = torch.tensor(x), torch.tensor(y)

    def t_loss(p, x, y):
        h = torch.tanh(x @ p["w0"].T + p["b0"])
        return torch.nn.functional.cross_entropy((h @ p["w1"].T + p["b1"])[None], y[None])

    def theirs():
        g = vmap(grad(t_loss), in_dims=(None, 0, 0))(tp, tx, ty)
        norms = torch.sqrt(sum((v.reshape(batch, -1) ** 2).sum(1) for v in g.values()))
        w = torch.clamp(clip / (norms + 1e-12), max=1.0)
        return {k: torch.einsum("b,b...->...", w, v) for k, v in g.items()}

    def ours():
        norms = np.asarray(per_sample_grad_norm(losses)(p, x, y))
        w = np.minimum(1.0, clip / (norms + 1e-12)).astype(np.float32)
        return eg.grad(lambda p: (losses(p, x, y) * w).sum())(p)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both on one thread, as training runs (few_blas_threads)
    try:
        with few_blas_threads():
            mine, other = ours(), theirs()  # the same clipped sums, and warm caches
            for k in p:
                np.testing.assert_allclose(np.asarray(mine[k]), other[k].numpy(), rtol=2e-3,
                                           atol=2e-5)
            out = []
            for fn in (ours, theirs):
                fn()
                ts = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                out.append(float(np.median(ts)))
    finally:
        torch.set_num_threads(threads)
    return tuple(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--batch", type=int, default=256, help="expected batch size (q = batch / N)")
    ap.add_argument("--sigma", type=float, default=1.5, help="noise multiplier")
    ap.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    ap.add_argument("--lr", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="skip the timing against torch")
    a = ap.parse_args(argv)
    r = train(a.epochs, a.batch, a.sigma, a.clip, a.lr, a.delta, progress=not a.no_progress)
    print(f"DP-SGD, MLP 64-32-10 (tanh) on 8x8 digits (1347 train / 450 test): "
          f"test accuracy {r['accuracy']:.2%}, trained in {r['seconds']:.1f} s")
    print(f"privacy: noise multiplier sigma {a.sigma}, clipping norm C {a.clip}, sampling rate "
          f"q {r['q']:.4f} (Poisson, expected batch {a.batch}), {r['steps']} steps, "
          f"delta {a.delta:g}: epsilon {r['epsilon']:.2f} (Renyi DP at order {r['order']})")
    if not a.no_torch:
        t = time_against_torch(a.batch, a.clip)
        if t is None:
            print("torch not installed: no timing against torch.func.vmap(grad)")
        else:
            print(f"one step's clipped gradient sum, batch {a.batch}, one thread: ours "
                  f"{t[0] * 1e3:.2f} ms (per_sample_grad_norm + one backward), "
                  f"torch.func.vmap(grad) + norms + clip {t[1] * 1e3:.2f} ms: "
                  f"{t[0] / t[1]:.2f}x")


if __name__ == "__main__":
    main()
