"""``make demo``: train a CNN on real digits, read its derived gradients, answer seed 002.

1. A small CNN (each conv the einsum ``'bchwkl,fckl->bfhw'`` over image
   patches) learns scikit-learn's 8x8 digits in seconds on 2 cores.
2. The engine explains the conv einsum: the backward patterns it derived.
3. Seed 002 asks for per-point Jacobians of a point-wise MLP on ``(B, N, 3)``
   points without the ``(B*N) x (B*N)`` cross terms: ``eg.batch_jacobian``.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import einsumgrad as eg  # noqa: E402

import cnn_digits  # noqa: E402


def digits() -> None:
    print("1) a CNN learns the 8x8 digits (scikit-learn, 1347 train / 450 test images)")
    acc, seconds = cnn_digits.run(seed=0)
    print(f"   test accuracy {acc:.2%} after {seconds:.1f} s of training\n")


def conv_patterns() -> None:
    print("2) what backward does in a conv layer: the derived patterns of its einsum")
    d = eg.derive("bchwkl,fckl->bfhw")
    print("   forward:             bchwkl,fckl->bfhw   (patches x filters)")
    print(f"   grad of the patches: {d.vjp(0)}   (then overlap-added onto the image)")
    print(f"   grad of the filters: {d.vjp(1)}")
    print("   (python examples/inspect_gradients.py prints the full story)\n")


def seed_002() -> None:
    print("3) seed 002: per-point 3x3 Jacobians of a point-wise MLP on (B, N, 3) points")
    rng = np.random.default_rng(0)
    sizes = [3, 64, 64, 3]
    params = [(rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
              for i, o in zip(sizes[:-1], sizes[1:])]

    def mlp(x):
        for n, (w, b) in enumerate(params):
            x = eg.einsum("...i,oi->...o", x, w) + b
            x = eg.tanh(x) if n < len(params) - 1 else x
        return x
    B, N = 8, 4096
    pts = rng.standard_normal((B, N, 3))
    t0 = time.perf_counter()
    jac = eg.batch_jacobian(mlp)(pts.reshape(B * N, 3)).numpy().reshape(B, N, 3, 3)
    seconds = time.perf_counter() - t0
    one = eg.jacrev(mlp)(pts[5, 17]).numpy()
    print(f"   eg.batch_jacobian(mlp)(x.reshape(B*N, 3)) -> {jac.shape} in {seconds * 1e3:.0f} ms")
    print(f"   matches jacrev at one point: {np.allclose(jac[5, 17], one, rtol=1e-12, atol=1e-12)};"
          f" the {B * N}x{B * N} cross blocks are never built")
    print("   (a function that mixes points raises eg.BatchMixingError instead of a wrong answer)")


if __name__ == "__main__":
    digits()
    conv_patterns()
    seed_002()
