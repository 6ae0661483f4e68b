"""A small CNN learns scikit-learn's 8x8 digits: ``python examples/cnn_digits.py``.

Each conv layer is the einsum ``'bchwkl,fckl->bfhw'`` over image patches (a
strided view); pooling is a max over each patch's window axes.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from einsumgrad import nn  # noqa: E402

from _common import accuracy, load_digits_split, train  # noqa: E402


def build_cnn(seed: int = 0) -> nn.Module:
    """conv 3x3 (16) -> relu -> pool 2 -> conv 3x3 (32) -> relu -> pool 2 -> linear 10, float32."""
    nn.manual_seed(seed)
    f32 = "float32"
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, dtype=f32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, dtype=f32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10, dtype=f32))


def run(seed: int = 0, progress: bool = True) -> tuple:
    """Train on the 75% split; returns ``(test accuracy, training seconds)``."""
    xtr, ytr, xte, yte = load_digits_split(seed, images=True)
    model = build_cnn(seed)
    seconds = train(model, xtr, ytr, epochs=30, batch=32, lr=3e-3, seed=seed,
                    desc="CNN on digits", progress=progress)
    return accuracy(model, xte, yte), seconds


if __name__ == "__main__":
    acc, seconds = run()
    print(f"CNN on 8x8 digits (1347 train / 450 test): test accuracy {acc:.2%}, "
          f"trained in {seconds:.1f} s")
