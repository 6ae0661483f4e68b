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

Each case is also timed with each framework in a process of its own (a child
that loads only that side's framework, on the same weights and batch), as a
user runs it, and the targets are read there. In one process the two
frameworks' thread pools meet: loading torch puts MKL on torch's GNU OpenMP,
whose workers spin for a long while after each product (they show as busy
cores in the ``cores busy`` line) on the core einsumgrad's own pool thread
needs for its kernels' rows. The in-process figures are printed too.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from einsumgrad import nn, optim
from einsumgrad.nn import functional as F
from common import cores_busy, fmt_cores, keep_freed_memory, median_time, report

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
    return _eg_step(ours, x, y), _torch_step(theirs, x, y)


def _eg_step(ours, x, y):
    opt = optim.Adam(ours.parameters(), lr=1e-3)

    def eg_step():
        loss = F.cross_entropy(ours(x).reshape(y.size, -1), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return eg_step


def _torch_step(theirs, x, y):
    tx, ty = torch.tensor(x), torch.tensor(y)
    topt = torch.optim.Adam(theirs.parameters(), lr=1e-3)

    def torch_step():
        logits = theirs(tx)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ty.reshape(-1))
        topt.zero_grad()
        loss.backward()
        topt.step()
    return torch_step


def alone_step(case: str, side: str, state: dict):
    """One side's step of ``case`` ("cnn" or "attention") in a child process, on the
    weights and batch in ``state`` (see :func:`_alone`)."""
    x, y = state.pop("x"), state.pop("y")
    if side == "einsumgrad":
        ours = (_cnn(nn, dict(dtype="float32")) if case == "cnn" else
                _attention_model(64, 4, 10))
        ours.load_state_dict(state)
        return _eg_step(ours, x, y)
    theirs = _cnn(torch.nn, {}) if case == "cnn" else _torch_attention_model(64, 4, 10)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    return _torch_step(theirs, x, y)


@contextlib.contextmanager
def _threads(n: int):
    """``n`` threads for both sides: NumPy's BLAS (and MKL's) and torch's intra-op pool
    (where torch is loaded: einsumgrad's child of :func:`_alone` has none)."""
    try:
        from threadpoolctl import threadpool_limits
        # Taken first: it records each pool's count before torch.set_num_threads
        # moves the OpenMP runtime that MKL shares with torch, and restores them last.
        limits = threadpool_limits(limits=n, user_api="blas")
    except ImportError:  # BLAS keeps its default (every core)
        limits = contextlib.nullcontext()
    with limits:
        if torch is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _time_both(eg_step, torch_step, title: str, target: float, rounds: int = 3,
               threaded: float | None = None, alone: tuple | None = None) -> None:
    """Both steps timed at one thread and at every core: each side's median, the
    best of ``rounds`` rounds taken in turn (on a shared machine a burst of load
    then hits one round, not one side). ``target`` holds at one thread, and at
    every core ``threaded``'s, where given (None: no target there, the ratio
    only printed). With ``alone`` (``(module, case, state)``, see :func:`_alone`)
    each side is timed again in a process of its own, and the targets are read
    there."""
    steps = {"einsumgrad": eg_step, "PyTorch eager": torch_step}
    ns = sorted({1, os.cpu_count() or 1})
    got = _alone(*alone, ns, rounds) if alone is not None else None
    solo, cores = got if got is not None else (None, {})
    for n in ns:
        times = {name: float("inf") for name in steps}
        with _threads(n):
            for _ in range(rounds):
                for name, step in steps.items():
                    # Several steps per sample, back to back as in training (one
                    # step a sample would time each right after the gc.collect
                    # between samples).
                    times[name] = min(times[name], median_time(step, min_time=2.0 / rounds))
        limit = threaded if n > 1 else target
        goal = {"PyTorch eager": limit} if limit is not None else {}
        each = f"{title}, {n} thread{'s' * (n > 1)} each"
        if solo is None:
            report(each, times, ours="einsumgrad", targets=goal)
        else:
            report(each, solo[n], ours="einsumgrad", targets=goal,
                   note="each framework in a process of its own")
            for name, line in cores.items():
                if n > 1 and line:
                    print(f"  cores busy during {name}'s steps (its own process): {line}")
            report("one process: " + each, times, ours="einsumgrad",
                   note="both frameworks in this process")
        if n > 1:  # where each side's time goes across the cores (the profile behind a miss)
            with _threads(n):
                for name, step in steps.items():
                    print(f"  cores busy during {name}'s steps (this process): "
                          f"{fmt_cores(cores_busy(step))}")


def _alone(module: str, case: str, state: dict, ns: list, rounds: int) -> tuple | None:
    """``({threads: {side: seconds per step}}, {side: its cores-busy line at every
    core})``, each side timed in a child process that imports only its framework
    (einsumgrad's with torch blocked; torch's with einsumgrad idle), on the weights
    and batch in ``state`` (``x``, ``y`` and the state dict, as NumPy arrays),
    glibc's malloc set as in this run. The sides' children take turns, twice,
    and each side keeps its best. None where a child fails (its error printed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    best: dict = {n: {} for n in ns}
    cores: dict = {}  # side -> its child's cores-busy line, at every core
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.npz")
        np.savez(path, **state)
        for _ in range(2):
            for side in ("einsumgrad", "PyTorch eager"):
                paths = [here, os.path.join(os.path.dirname(here), "examples")]
                code = (f"import sys; sys.path[:0] = {paths!r}; "
                        + ("sys.modules['torch'] = None; " if side == "einsumgrad" else "")
                        + f"import bench_nn; bench_nn._child({module!r}, {case!r}, {side!r}, "
                        f"{path!r}, {ns!r}, {rounds})")
                got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
                if got.returncode != 0:
                    print(f"  ({side} alone failed: {got.stderr.strip().splitlines()[-1:]})")
                    return None
                said = json.loads(got.stdout.strip().splitlines()[-1])
                for n, t in said["times"].items():
                    n = int(n)
                    best[n][side] = min(best[n].get(side, float("inf")), t)
                cores[side] = said["cores"]
    return best, cores


def _child(module: str, case: str, side: str, path: str, ns: list, rounds: int) -> None:
    """A child of :func:`_alone`: prints its side's seconds per step at each thread
    count, and its cores-busy line at the last, as JSON."""
    import importlib
    keep_freed_memory()
    with np.load(path) as f:
        state = {k: f[k] for k in f.files}
    step = importlib.import_module(module).alone_step(case, side, state)
    out, cores = {}, ""
    for n in ns:
        with _threads(n):
            out[n] = min(median_time(step, min_time=2.0 / rounds) for _ in range(rounds))
            if n > 1:
                cores = fmt_cores(cores_busy(step))
    print(json.dumps({"times": out, "cores": cores}))


def main() -> None:
    if torch is None:
        print("bench_nn: torch is not installed, skipped")
        return
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    x = rng.standard_normal((128, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    theirs = _cnn(torch.nn, {})
    eg_step, torch_step = _steps(_cnn(nn, dict(dtype="float32")), theirs, x, y)
    _time_both(eg_step, torch_step,
               "CNN training step (batch 128, 1x28x28, 2 conv + linear, Adam), float32", 1.5,
               threaded=1.0,  # issue 4's target at one thread, issue 19's at every core
               alone=("bench_nn", "cnn", _state(theirs, x, y)))

    d, heads, classes = 64, 4, 10
    x = rng.standard_normal((64, 32, d)).astype(np.float32)
    y = rng.integers(0, classes, (64, 32))
    theirs = _torch_attention_model(d, heads, classes)
    eg_step, torch_step = _steps(_attention_model(d, heads, classes), theirs, x, y)
    _time_both(eg_step, torch_step, "2-block attention training step (batch 64 x 32 tokens, "
               "d=64, 4 heads, Adam), float32", 1.3, threaded=1.0,
               alone=("bench_nn", "attention", _state(theirs, x, y)))


def _state(theirs, x, y) -> dict:
    """What a child of :func:`_alone` needs: the batch and torch's weights, as arrays."""
    return {"x": x, "y": y, **{k: v.detach().numpy() for k, v in theirs.state_dict().items()}}


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
