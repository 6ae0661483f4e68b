"""einsumgrad on CuPy beside torch on CUDA (issue #5), float32, in one run.

Two cases, each timed with a device synchronize before every clock read:

* the MLP training step: batch 4096, 1024-4096-4096-10 (ReLU), cross-entropy,
  SGD, against the same ``torch.nn`` model and ``torch.optim.SGD`` on CUDA;
* seed 002: per-point Jacobians of an MLP 3-64-64-3 (tanh) on 1,000,000
  points with ``eg.batch_jacobian``, against ``torch.func.vmap(jacrev(f))``.

Target: within 1.5x of torch CUDA on both. Runs only with
``EINSUMGRAD_BENCH_GPU=1`` (``make bench-gpu``) and CuPy with a device present;
otherwise it prints one line saying why it skipped.
"""
from __future__ import annotations

import os

import numpy as np

import einsumgrad as eg
from common import median_time, report

TARGET = 1.5


def _why_skip() -> str | None:
    """Why this machine cannot run the GPU cases, or None when it can."""
    if os.environ.get("EINSUMGRAD_BENCH_GPU") != "1":
        return "EINSUMGRAD_BENCH_GPU=1 not set (make bench-gpu sets it)"
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except ImportError:
        return "CuPy is not installed (pip install -e '.[gpu]')"
    except Exception as e:  # CUDA driver or runtime missing
        return f"CuPy cannot reach a CUDA device ({type(e).__name__}: {e})"
    try:
        import torch
    except ImportError:
        return "torch is not installed: nothing to compare against"
    if not torch.cuda.is_available():
        return "torch has no CUDA (a CPU-only build?): nothing to compare against"
    return None


def _check(name: str, ours, theirs) -> None:
    err = float(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(theirs, np.float64)).max())
    print(f"  check {name}: max |ours - torch| = {err:.1e}")


def mlp_step(device: str = "cuda", batch: int = 4096, sizes=(1024, 4096, 4096, 10),
             lr: float = 1e-3, repeat: int = 7) -> None:
    """One SGD step of a ReLU MLP, einsumgrad against torch, from the same weights."""
    import torch
    from einsumgrad import nn, optim
    from einsumgrad.nn import functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], batch)
    layers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(i, o, dtype=np.float32, rng=rng), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    weights = model.state_dict()
    model.to(device)
    opt = optim.SGD(model.parameters(), lr=lr)
    xd, yd = eg.tensor(x).to(device), eg.tensor(y).to(device)

    def ours():
        opt.zero_grad()
        loss = F.cross_entropy(model(xd), yd)
        loss.backward()
        opt.step()
        return loss

    tdev = "cuda" if device == "cuda" else "cpu"
    tlayers = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        tlayers += [torch.nn.Linear(i, o), torch.nn.ReLU()]
    tmodel = torch.nn.Sequential(*tlayers[:-1])
    tmodel.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    tmodel.to(tdev)
    topt = torch.optim.SGD(tmodel.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x).to(tdev), torch.from_numpy(y).to(tdev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def theirs():
        topt.zero_grad()
        loss = loss_fn(tmodel(xt), yt)
        loss.backward()
        topt.step()
        return loss

    _check("first loss", ours().item(), theirs().item())
    sync_ours, sync_theirs = _syncs(device)
    times = {"einsumgrad (CuPy)" if device == "cuda" else "einsumgrad":
             median_time(ours, repeat=repeat, sync=sync_ours),
             f"torch ({tdev})": median_time(theirs, repeat=repeat, sync=sync_theirs)}
    report(f"MLP training step, batch {batch}, {'-'.join(map(str, sizes))}, float32", times,
           ours=next(iter(times)), targets={f"torch ({tdev})": TARGET})


def seed002(device: str = "cuda", n_points: int = 1_000_000, repeat: int = 7) -> None:
    """Per-point Jacobians of a point-wise tanh MLP 3-64-64-3, against vmap(jacrev)."""
    import torch
    from torch.func import jacrev, vmap

    rng = np.random.default_rng(0)
    params = [(rng.standard_normal((o, i), dtype=np.float32) / np.float32(np.sqrt(i)),
               0.1 * rng.standard_normal(o, dtype=np.float32))
              for i, o in zip((3, 64, 64), (64, 64, 3))]
    x = rng.standard_normal((n_points, 3), dtype=np.float32)
    eps = [(eg.tensor(w).to(device), eg.tensor(b).to(device)) for w, b in params]
    xd = eg.tensor(x).to(device)

    def f(h):
        for n, (w, b) in enumerate(eps):
            h = eg.einsum("...i,oi->...o", h, w) + b
            h = eg.tanh(h) if n < len(eps) - 1 else h
        return h

    tdev = "cuda" if device == "cuda" else "cpu"
    tps = [(torch.from_numpy(w).to(tdev), torch.from_numpy(b).to(tdev)) for w, b in params]
    xt = torch.from_numpy(x).to(tdev)

    def ft(h):
        for n, (w, b) in enumerate(tps):
            h = h @ w.T + b
            h = torch.tanh(h) if n < len(tps) - 1 else h
        return h

    ours = lambda: eg.batch_jacobian(f)(xd)
    theirs = lambda: vmap(jacrev(ft))(xt)
    _check("Jacobians", ours().numpy()[:1000], theirs()[:1000].cpu().numpy())
    sync_ours, sync_theirs = _syncs(device)
    times = {"einsumgrad batch_jacobian" + (" (CuPy)" if device == "cuda" else ""):
             median_time(ours, repeat=repeat, sync=sync_ours),
             f"torch.func vmap(jacrev) ({tdev})": median_time(theirs, repeat=repeat,
                                                              sync=sync_theirs)}
    report(f"seed 002: per-point Jacobians, MLP 3-64-64-3 tanh, {n_points:,} points, float32",
           times, ours=next(iter(times)), targets={f"torch.func vmap(jacrev) ({tdev})": TARGET})


def _syncs(device: str):
    """Functions that wait for all queued GPU work (None on the CPU)."""
    if device != "cuda":
        return None, None
    import cupy
    import torch
    return cupy.cuda.get_current_stream().synchronize, torch.cuda.synchronize


def main() -> None:
    why = _why_skip()
    if why is not None:
        print(f"bench_gpu: skipped: {why}")
        return
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"\ncupy {cupy.__version__} on {props['name'].decode()}")
    mlp_step()
    seed002()


if __name__ == "__main__":
    main()
