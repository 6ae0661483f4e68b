"""A small residual CNN learns scikit-learn's 8x8 digits: ``python examples/resnet_digits.py``.

Conv -> BatchNorm -> ReLU stem, residual blocks held in an ``nn.ModuleList``
(``x + bn(conv(relu(bn(conv(x)))))``), global average pooling, a linear
readout; AdamW with a cosine learning-rate schedule stepped every batch.
BatchNorm normalizes with the batch's statistics while training and with
its running ones in ``eval()`` (the accuracy below is measured that way).

``build_resnet`` takes the module namespace, so the same code builds the
``torch.nn`` twin (the bench times both, ``bench/bench_resnet.py``).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from einsumgrad import nn, optim  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402

from _common import accuracy, few_blas_threads, load_digits_split  # noqa: E402


def build_resnet(mod=nn, width: int = 32, blocks: int = 2, classes: int = 10, **kw):
    """stem conv 3x3 (``width``) -> BN -> ReLU, ``blocks`` residual blocks, mean over
    the image, linear readout. ``mod`` is ``einsumgrad.nn`` or ``torch.nn``; ``kw``
    goes to every layer (``dtype=``)."""

    class Block(mod.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv1 = mod.Conv2d(c, c, 3, padding=1, bias=False, **kw)
            self.bn1 = mod.BatchNorm2d(c, **kw)
            self.conv2 = mod.Conv2d(c, c, 3, padding=1, bias=False, **kw)
            self.bn2 = mod.BatchNorm2d(c, **kw)
            self.relu = mod.ReLU()

        def forward(self, x):
            h = self.relu(self.bn1(self.conv1(x)))
            return self.relu(x + self.bn2(self.conv2(h)))

    class ResNet(mod.Module):
        def __init__(self):
            super().__init__()
            self.stem = mod.Sequential(mod.Conv2d(1, width, 3, padding=1, bias=False, **kw),
                                       mod.BatchNorm2d(width, **kw), mod.ReLU())
            self.blocks = mod.ModuleList([Block(width) for _ in range(blocks)])
            self.head = mod.Linear(width, classes, **kw)

        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean(dim=(2, 3)))

    return ResNet()


def run(seed: int = 0, progress: bool = True, epochs: int = 15, batch: int = 64,
        lr: float = 4e-3) -> tuple:
    """Train on the 75% split; returns ``(test accuracy, training seconds)``."""
    from tqdm import tqdm
    xtr, ytr, xte, yte = load_digits_split(seed, images=True)
    nn.manual_seed(seed)
    model = build_resnet(dtype="float32")
    steps = epochs * -(-len(xtr) // batch)
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    schedule = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="ResNet on digits", disable=not progress, leave=False)
    with few_blas_threads():
        for _ in bar:
            order, total = rng.permutation(len(xtr)), 0.0
            for i in range(0, len(xtr), batch):
                idx = order[i:i + batch]
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{total / len(xtr):.4f}", lr=f"{schedule.get_last_lr()[0]:.1e}")
    seconds = time.perf_counter() - t0
    return accuracy(model, xte, yte), seconds


if __name__ == "__main__":
    acc, seconds = run()
    print(f"ResNet (BatchNorm, 2 residual blocks) on 8x8 digits (1347 train / 450 test): "
          f"test accuracy {acc:.2%}, trained in {seconds:.1f} s")
