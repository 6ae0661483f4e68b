"""A small transformer learns to sort digit sequences: ``python examples/transformer_sort.py``.

Sequences of 8 random digits are generated on the fly; the model reads the
whole sequence (no causal mask) and predicts the sorted sequence, one token
per position. Attention scores are the einsum ``'bhqd,bhkd->bhqk'``.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import einsumgrad as eg  # noqa: E402
from einsumgrad import nn, optim  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402

from _common import few_blas_threads  # noqa: E402

LENGTH, VOCAB = 8, 10


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d: int, heads: int, causal: bool = False, dtype="float32"):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, dtype=dtype), nn.LayerNorm(d, dtype=dtype)
        self.attn = nn.MultiHeadAttention(d, heads, causal=causal, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, dtype=dtype), nn.GELU(),
                                 nn.Linear(4 * d, d, dtype=dtype))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Sorter(nn.Module):
    """Token and position embeddings, a stack of blocks, a per-position readout."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, dtype="float32"):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d, dtype=dtype)
        self.pos = nn.Embedding(LENGTH, d, dtype=dtype)
        self.blocks = nn.Sequential(*[Block(d, heads, dtype=dtype) for _ in range(layers)])
        self.ln = nn.LayerNorm(d, dtype=dtype)
        self.head = nn.Linear(d, VOCAB, dtype=dtype)

    def forward(self, ids):
        x = self.tok(ids) + self.pos.weight
        return self.head(self.ln(self.blocks(x)))


def batch(rng: np.random.Generator, n: int) -> tuple:
    """``n`` random digit sequences and their sorted versions."""
    x = rng.integers(0, VOCAB, size=(n, LENGTH))
    return x, np.sort(x, axis=1)


def token_accuracy(model: nn.Module, x, y) -> float:
    with eg.no_grad():
        return float((np.asarray(model(x)).argmax(-1) == y).mean())


def run(steps: int = 1000, seed: int = 0, progress: bool = True) -> tuple:
    """Train with Adam on fresh batches; returns ``(token accuracy, training seconds, model)``."""
    from tqdm import tqdm
    nn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Sorter()
    opt = optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="sorting digits", disable=not progress, leave=False)
    with few_blas_threads():
        for step in bar:
            x, y = batch(rng, 128)
            # (B, T, VOCAB) logits: classes go on axis 1, so flatten the positions
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    seconds = time.perf_counter() - t0
    xt, yt = batch(np.random.default_rng(seed + 1), 2000)
    return token_accuracy(model, xt, yt), seconds, model


if __name__ == "__main__":
    acc, seconds, model = run()
    print(f"sorting {LENGTH} digits: token accuracy {acc:.2%} on 2000 fresh sequences, "
          f"trained in {seconds:.1f} s")
    x, _ = batch(np.random.default_rng(123), 3)
    with eg.no_grad():
        pred = np.asarray(model(x)).argmax(-1)
    for a, b in zip(x, pred):
        print(f"  {' '.join(map(str, a))}  ->  {' '.join(map(str, b))}")
