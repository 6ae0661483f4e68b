"""A two-layer MLP learns scikit-learn's 8x8 digits: ``python examples/mlp_digits.py``.

Each layer is the einsum ``'...i,oi->...o'`` with torch's ``(out, in)`` weight.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from einsumgrad import nn  # noqa: E402

from _common import accuracy, load_digits_split, train  # noqa: E402


def build_mlp(seed: int = 0) -> nn.Module:
    """64 -> 128 -> relu -> 10, float32."""
    nn.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128, dtype="float32"), nn.ReLU(),
                         nn.Linear(128, 10, dtype="float32"))


def run(seed: int = 0, progress: bool = True) -> tuple:
    """Train on the 75% split; returns ``(test accuracy, training seconds)``."""
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = build_mlp(seed)
    seconds = train(model, xtr, ytr, epochs=40, batch=32, lr=3e-3, seed=seed,
                    desc="MLP on digits", progress=progress)
    return accuracy(model, xte, yte), seconds


if __name__ == "__main__":
    acc, seconds = run()
    print(f"MLP on 8x8 digits (1347 train / 450 test): test accuracy {acc:.2%}, "
          f"trained in {seconds:.1f} s")
