"""Training steps of einsumgrad.nn models beside the same models in PyTorch eager (issue #4).

Two cases, float32, each a full step (forward, cross-entropy, backward, Adam)
timed for both frameworks in this one run on the same weights and batch.
Each case runs twice, with the same thread count on both sides: one thread
(BLAS for NumPy, intra-op for torch), then every core. At every core MKL runs
our GEMMs and large same-layout element-wise ops (VML) on all threads, but
NumPy's broadcasts, reductions and copies stay on one; torch's use them all.

* CNN: batch 128 of 1x28x28, conv 3x3 (16, pad 1) -> relu -> max-pool 2 ->
  conv 3x3 (32, pad 1) -> relu -> max-pool 2 -> linear 10. Target <= 1.5x torch
  (issue 4), and <= 1.0x at every core (issue 19).
* attention: 2 pre-norm transformer blocks (d=64, 4 heads, MLP 256, GELU) on
  batch 64 x 32 tokens, per-token 10-way readout. Target <= 1.3x torch (issue 4),
  and <= 1.0x at every core (issue 19).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from einsumgrad import nn, optim
from einsumgrad.nn import functional as F
from common import cores_busy, fmt_cores, median_time, report

try:
    import torch
except ImportError:  # the torch columns are skipped
    torch = None


def _cnn(mod, f32):
    return mod.Sequential(
        mod.Conv2d(1, 16, 3, padding=1, **f32), mod.ReLU(), mod.MaxPool2d(2),
        mod.Conv2d(16, 32, 3, padding=1, **f32), mod.ReLU(), mod.MaxPool2d(2),
        mod.Flatten(), mod.Linear(32 * 7 * 7, 10, **f32))


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        f32 = dict(dtype="float32")
        self.ln1, self.ln2 = nn.LayerNorm(d, **f32), nn.LayerNorm(d, **f32)
        self.attn = nn.MultiHeadAttention(d, heads, **f32)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, **f32), nn.GELU(), nn.Linear(4 * d, d, **f32))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _attention_model(d, heads, classes):
    return nn.Sequential(_Block(d, heads), _Block(d, heads), nn.Linear(d, classes, dtype="float32"))


def _torch_attention_model(d, heads, classes):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                           torch.nn.Linear(4 * d, d))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))
    return torch.nn.Sequential(Block(), Block(), torch.nn.Linear(d, classes))


def _steps(ours, theirs, x, y):
    """One training step each, on the same weights (torch's, copied into ours)."""
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    opt = optim.Adam(ours.parameters(), lr=1e-3)

    def eg_step():
        loss = F.cross_entropy(ours(x).reshape(y.size, -1), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    tx, ty = torch.tensor(x), torch.tensor(y)
    topt = torch.optim.Adam(theirs.parameters(), lr=1e-3)

    def torch_step():
        logits = theirs(tx)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ty.reshape(-1))
        topt.zero_grad()
        loss.backward()
        topt.step()
    return eg_step, torch_step


@contextlib.contextmanager
def _threads(n: int):
    """``n`` threads for both sides: NumPy's BLAS (and MKL's) and torch's intra-op pool."""
    try:
        from threadpoolctl import threadpool_limits
        # Taken first: it records each pool's count before torch.set_num_threads
        # moves the OpenMP runtime that MKL shares with torch, and restores them last.
        limits = threadpool_limits(limits=n, user_api="blas")
    except ImportError:  # BLAS keeps its default (every core)
        limits = contextlib.nullcontext()
    with limits:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _time_both(eg_step, torch_step, title: str, target: float, rounds: int = 3,
               threaded: float | None = None) -> None:
    """Both steps timed at one thread and at every core: each side's median, the
    best of ``rounds`` rounds taken in turn (on a shared machine a burst of load
    then hits one round, not one side). ``target`` holds at one thread, and at
    every core unless ``threaded`` gives another."""
    steps = {"einsumgrad": eg_step, "PyTorch eager": torch_step}
    for n in sorted({1, os.cpu_count() or 1}):
        times = {name: float("inf") for name in steps}
        with _threads(n):
            for _ in range(rounds):
                for name, step in steps.items():
                    # Several steps per sample, back to back as in training (one
                    # step a sample would time each right after the gc.collect
                    # between samples).
                    times[name] = min(times[name], median_time(step, min_time=2.0 / rounds))
        limit = threaded if n > 1 and threaded is not None else target
        report(f"{title}, {n} thread{'s' * (n > 1)} each", times, ours="einsumgrad",
               targets={"PyTorch eager": limit})
        if n > 1:  # where each side's time goes across the cores (the profile behind a miss)
            with _threads(n):
                for name, step in steps.items():
                    print(f"  cores busy during {name}'s steps: {fmt_cores(cores_busy(step))}")


def main() -> None:
    if torch is None:
        print("bench_nn: torch is not installed, skipped")
        return
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    x = rng.standard_normal((128, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    eg_step, torch_step = _steps(_cnn(nn, dict(dtype="float32")), _cnn(torch.nn, {}), x, y)
    _time_both(eg_step, torch_step,
               "CNN training step (batch 128, 1x28x28, 2 conv + linear, Adam), float32", 1.5,
               threaded=1.0)  # issue 4's target at one thread, issue 19's at every core

    d, heads, classes = 64, 4, 10
    x = rng.standard_normal((64, 32, d)).astype(np.float32)
    y = rng.integers(0, classes, (64, 32))
    eg_step, torch_step = _steps(_attention_model(d, heads, classes),
                                 _torch_attention_model(d, heads, classes), x, y)
    _time_both(eg_step, torch_step, "2-block attention training step (batch 64 x 32 tokens, "
               "d=64, 4 heads, Adam), float32", 1.3, threaded=1.0)


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
