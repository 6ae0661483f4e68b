"""The residual CNN's training step beside the same model in PyTorch eager (issue #17).

The model of ``examples/resnet_digits.py``, built by its ``build_resnet`` for both
frameworks: conv 3x3 (32) -> BatchNorm -> ReLU, two residual blocks (conv ->
BN -> ReLU -> conv -> BN, added to the block's input, ReLU) in a ModuleList,
mean over the image, linear 10. float32, batch 128 of 1x8x8 (the digits'
size); a step is forward (BatchNorm in training mode, running statistics
updated), cross-entropy, backward, AdamW and a cosine schedule's step, timed
for both in this one run on the same weights and batch, at one thread each
and at every core (as ``bench_nn``). Target: within 1.3x torch at one thread.
"""
from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]

from einsumgrad import nn, optim  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402
from bench_nn import _time_both  # noqa: E402  (the same thread control and report)
from resnet_digits import build_resnet  # noqa: E402

try:
    import torch
except ImportError:  # the torch columns are skipped
    torch = None

BATCH = 128


def _steps(x, y):
    """One training step each, on the same weights (torch's, copied into ours), and the
    weights as arrays (for :func:`bench_nn._alone`'s children)."""
    torch.manual_seed(0)
    theirs = build_resnet(torch.nn)
    state = {k: v.detach().numpy().copy() for k, v in theirs.state_dict().items()}
    return _eg_step(dict(state), x, y), _torch_step(theirs, x, y), state


def _eg_step(state, x, y):
    ours = build_resnet(nn, dtype="float32")
    ours.load_state_dict(state)
    opt = optim.AdamW(ours.parameters(), lr=1e-3)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10 ** 6)

    def eg_step():
        loss = F.cross_entropy(ours(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return eg_step


def _torch_step(theirs, x, y):
    tx, ty = torch.tensor(x), torch.tensor(y)
    topt = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=10 ** 6)

    def torch_step():
        loss = torch.nn.functional.cross_entropy(theirs(tx), ty)
        topt.zero_grad()
        loss.backward()
        topt.step()
        tsched.step()
    return torch_step


def alone_step(case: str, side: str, state: dict):
    """One side's step in a child process of :func:`bench_nn._alone`."""
    x, y = state.pop("x"), state.pop("y")
    if side == "einsumgrad":
        return _eg_step(state, x, y)
    theirs = build_resnet(torch.nn)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return _torch_step(theirs, x, y)


def main() -> None:
    if torch is None:
        print("bench_resnet: torch is not installed, skipped")
        return
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    eg_step, torch_step, state = _steps(x, y)
    _time_both(eg_step, torch_step, f"residual CNN training step (batch {BATCH}, 1x8x8, stem + "
               f"2 residual blocks of 32 channels with BatchNorm, AdamW + cosine), float32", 1.3,
               alone=("bench_resnet", "resnet", {"x": x, "y": y, **state}),
               threaded=None)  # issue 17's target is at one thread


if __name__ == "__main__":
    from common import keep_freed_memory
    print(keep_freed_memory())
    main()
