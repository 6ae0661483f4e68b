"""Shared by the examples: the digits data and a plain training loop with a progress bar."""
from __future__ import annotations

import contextlib
import time

import numpy as np

import einsumgrad as eg
from einsumgrad import nn, optim
from einsumgrad.nn import functional as F


def load_digits_split(seed: int = 0, images: bool = False, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], split 75/25 with a fixed seed.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; ``x`` is ``(N, 64)`` or ``(N, 1, 8, 8)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.data / 16.0).astype(dtype)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, random_state=seed,
                                          stratify=d.target)
    return xtr, ytr, xte, yte


def few_blas_threads():
    """Limit BLAS to one thread while training these small models.

    Their matmuls are tiny; on a shared 2-core machine, BLAS threads that spin
    waiting for a busy core cost far more than they save (measured: a
    64x1024x64 float32 matmul took 2.6 ms with two OpenBLAS threads under load,
    0.1 ms with one).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def accuracy(model: nn.Module, x, y, batch: int = 512) -> float:
    """Fraction of ``x`` whose arg-max logit is the label (no graph recorded)."""
    model.eval()
    with eg.no_grad():
        pred = np.concatenate([np.asarray(model(x[i:i + batch])).argmax(-1)
                               for i in range(0, len(x), batch)])
    model.train()
    return float((pred == np.asarray(y)).mean())


def train(model: nn.Module, x, y, *, epochs: int, batch: int, lr: float, seed: int = 0,
          desc: str = "training", progress: bool = True, loss_fn=F.cross_entropy) -> float:
    """Adam on shuffled mini-batches; returns the wall time in seconds."""
    from tqdm import tqdm
    opt = optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    with few_blas_threads():
        for _ in bar:
            order = rng.permutation(len(x))
            total = 0.0
            for i in range(0, len(x), batch):
                idx = order[i:i + batch]
                loss = loss_fn(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(x):.4f}")
    return time.perf_counter() - t0
