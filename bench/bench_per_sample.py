"""Per-sample gradients, their norms, and vmap (issue 18): ``python bench/run.py per_sample``.

Three cases, float32, each timed beside its peer in this one run (each contender's
median, the best of a few rounds taken in turn):

* per-sample gradients of an MLP 784-256-256-10 (tanh, cross-entropy), B = 256:
  ``eg.per_sample_grad`` against ``torch.func.vmap(torch.func.grad(loss))``
  (target <= 0.8x), and against Opacus's ``GradSampleModule`` and BackPACK's
  ``BatchGrad`` where they are installed (target: faster; each checked to give
  the same gradients first);
* per-sample gradient norms of a sequence model (``'bti,oi->bto'`` layers
  512-512-512, tanh, squared error), B = 32, T = 16: ``eg.per_sample_grad_norm``
  against ``vmap(grad)`` and the norms of its result (targets <= 0.3x the time,
  <= 0.2x the peak memory, each measured in a child process of its own: the peak
  resident memory above what the process held before the call);
* ``eg.vmap`` of a per-example MLP (784-256-256-10, tanh) on 256 examples against
  the same MLP written for batches (target <= 1.2x);
* per-sample gradients of a CNN (3x3 convolution to 8 channels, ReLU, 2x2 max
  pooling, linear to 10, cross-entropy) on 16384 28x28 images:
  ``eg.jit(eg.vmap(eg.grad(loss)))`` against ``torch.func.vmap(grad)``, the time
  and (in child processes) the peak memory of a call, and our first call (the
  trace, on a block of the batch's rows). No target: a case to keep in view.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import einsumgrad as eg  # noqa: E402
from einsumgrad.nn import functional as F  # noqa: E402
from einsumgrad.vmap import per_sample_grad, per_sample_grad_norm, vmap  # noqa: E402

from common import median_time, report  # noqa: E402

try:
    import torch
    from torch.func import grad as t_grad, vmap as t_vmap
except ImportError:  # the torch columns are skipped
    torch = None

MLP, B_MLP = (784, 256, 256, 10), 256
SEQ, B_SEQ, T_SEQ = (512, 512, 512), 32, 16
CNN_CHANNELS, B_CNN = 8, 16384


def _layers(sizes, rng):
    return [((rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32),
             (0.1 * rng.standard_normal(o)).astype(np.float32))
            for i, o in zip(sizes[:-1], sizes[1:])]


def mlp_case(rng):
    """The MLP's parameters (a dict), inputs and labels; our per-example loss and torch's."""
    layers = _layers(MLP, rng)
    params = {f"{k}{n}": v for n, (w, b) in enumerate(layers) for k, v in (("w", w), ("b", b))}
    x = rng.standard_normal((B_MLP, MLP[0])).astype(np.float32)
    y = rng.integers(0, MLP[-1], B_MLP)

    def loss(p, x, y):
        h = x
        for n in range(len(layers)):
            h = F.linear(h, p[f"w{n}"], p[f"b{n}"])
            h = eg.tanh(h) if n < len(layers) - 1 else h
        return F.cross_entropy(h, y, reduction="none")

    def t_loss(p, x, y):  # one example
        h = x
        for n in range(len(layers)):
            h = h @ p[f"w{n}"].T + p[f"b{n}"]
            h = torch.tanh(h) if n < len(layers) - 1 else h
        return torch.nn.functional.cross_entropy(h[None], y[None])
    return params, x, y, loss, t_loss


def seq_case(rng):
    w = {f"w{n}": w for n, (w, _) in enumerate(_layers(SEQ, rng))}
    x = rng.standard_normal((B_SEQ, T_SEQ, SEQ[0])).astype(np.float32)
    y = rng.standard_normal((B_SEQ, T_SEQ, SEQ[-1])).astype(np.float32)

    def loss(p, x, y):
        h = eg.tanh(eg.einsum("bti,oi->bto", x, p["w0"]))
        return ((eg.einsum("bti,oi->bto", h, p["w1"]) - y) ** 2).sum(axis=(1, 2))

    def t_loss(p, x, y):  # one example
        h = torch.tanh(torch.einsum("ti,oi->to", x, p["w0"]))
        return ((torch.einsum("ti,oi->to", h, p["w1"]) - y) ** 2).sum()
    return w, x, y, loss, t_loss


def cnn_case(rng):
    """The CNN's parameters, images and labels; our per-example gradient function
    (``vmap(grad)``, to jit) and torch's."""
    c = CNN_CHANNELS
    p = {"w": rng.standard_normal((c, 1, 3, 3)) / 3, "b": 0.1 * rng.standard_normal(c),
         "w2": rng.standard_normal((10, c * 14 * 14)) / np.sqrt(c * 196),
         "b2": 0.1 * rng.standard_normal(10)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    x = rng.standard_normal((B_CNN, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, B_CNN)

    def loss(p, x, y):  # one example
        h = F.max_pool2d(eg.relu(F.conv2d(x[None], p["w"], p["b"], padding=1)), 2)
        return F.cross_entropy(F.linear(eg.reshape(h, (1, -1)), p["w2"], p["b2"]), y[None])

    def t_loss(p, x, y):
        tf = torch.nn.functional
        h = tf.max_pool2d(torch.relu(tf.conv2d(x[None], p["w"], p["b"], padding=1)), 2)
        return tf.cross_entropy(tf.linear(h.reshape(1, -1), p["w2"], p["b2"]), y[None])
    return p, x, y, vmap(eg.grad(loss), in_axes=(None, 0, 0)), t_loss


def timed(contenders: dict, rounds: int = 3, repeat: int = 7) -> dict:
    """Each contender's median time, the best of ``rounds`` rounds taken in turn: on a
    shared machine a burst of load then hits one round, not one contender."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            best[name] = min(best[name], median_time(fn, repeat=repeat))
    return best


def _torch(tree):
    return {k: torch.tensor(v) for k, v in tree.items()}


def _torch_norms(t_loss, tp, tx, ty):
    g = t_vmap(t_grad(t_loss), in_dims=(None, 0, 0))(tp, tx, ty)
    return torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1) for v in g.values()))


def child_peak(which: str, case: str = "seq") -> dict:
    """In a child process: the peak resident memory one call of the norms (or of the
    CNN's per-sample gradients) takes above what the process held before it (the
    kernel's peak counter reset just before)."""
    import ctypes
    import gc
    rng = np.random.default_rng(0)
    if case == "cnn":
        w, x, y, ours, t_loss = cnn_case(rng)
        if which == "ours":
            j = eg.jit(ours)
            call = lambda: j(w, x, y)  # noqa: E731
        else:
            tp, tx, ty = _torch(w), torch.tensor(x), torch.tensor(y)
            f = t_vmap(t_grad(t_loss), in_dims=(None, 0, 0))
            call = lambda: f(tp, tx, ty)  # noqa: E731
    else:
        w, x, y, loss, t_loss = seq_case(rng)
        if which == "ours":
            call = lambda: np.asarray(per_sample_grad_norm(loss)(w, x, y))  # noqa: E731
        else:
            tp, tx, ty = _torch(w), torch.tensor(x), torch.tensor(y)
            call = lambda: _torch_norms(t_loss, tp, tx, ty).numpy()  # noqa: E731
    call()  # plans, caches, lazy initialisation
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM, the peak resident set size
    before = _status("VmRSS")
    call()
    return {"peak": _status("VmHWM") - before}


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak(which: str, case: str = "seq") -> int | None:
    env = {k: v for k, v in os.environ.items() if k != "EINSUMGRAD_BENCH_MALLOC"}
    env["EINSUMGRAD_BENCH_MALLOC"] = "default"
    done = subprocess.run([sys.executable, __file__, "--peak", which, case],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        print(done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def _torch_mlp(params: dict):
    """The MLP as a ``torch.nn.Sequential`` with our weights (for Opacus and BackPACK)."""
    layers = []
    for n in range(len(MLP) - 1):
        lin = torch.nn.Linear(MLP[n], MLP[n + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(params[f"w{n}"]))
            lin.bias.copy_(torch.tensor(params[f"b{n}"]))
        layers += [lin] + ([torch.nn.Tanh()] if n < len(MLP) - 2 else [])
    return torch.nn.Sequential(*layers)


def _layer_peers(params: dict, tx, ty) -> dict:
    """Opacus's ``GradSampleModule`` and BackPACK's ``BatchGrad``, where they install:
    each a function returning the per-sample gradients as ``{w0: ..., b0: ..., ...}``."""
    names = [f"{k}{n}" for n in range(len(MLP) - 1) for k in ("w", "b")]
    peers = {}
    try:
        from opacus import GradSampleModule
    except ImportError:
        print("  (Opacus not installed: pip install opacus)")
    else:
        gsm = GradSampleModule(_torch_mlp(params), loss_reduction="sum")

        def opacus():
            gsm.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(gsm(tx), ty, reduction="sum").backward()
            return dict(zip(names, (p.grad_sample for p in gsm.parameters())))
        peers["Opacus GradSampleModule"] = opacus
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        print("  (BackPACK not installed: pip install backpack-for-pytorch)")
    else:
        model = extend(_torch_mlp(params))
        loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def backpack_batch_grad():
            model.zero_grad()
            with backpack(BatchGrad()):
                loss(model(tx), ty).backward()
            return dict(zip(names, (p.grad_batch for p in model.parameters())))
        peers["BackPACK BatchGrad"] = backpack_batch_grad
    return peers


def main() -> None:
    rng = np.random.default_rng(0)
    params, x, y, loss, t_loss = mlp_case(rng)
    fns = {"eg.per_sample_grad": lambda: per_sample_grad(loss)(params, x, y)}
    targets = {}
    if torch is not None:
        tp, tx, ty = _torch(params), torch.tensor(x), torch.tensor(y)
        f = t_vmap(t_grad(t_loss), in_dims=(None, 0, 0))
        fns["torch.func.vmap(grad)"] = lambda: f(tp, tx, ty)
        targets["torch.func.vmap(grad)"] = 0.8
        ours = fns["eg.per_sample_grad"]()
        for name, peer in _layer_peers(params, tx, ty).items():
            theirs = peer()  # the same numbers first: a peer computing something else is none
            for k, v in ours.items():
                np.testing.assert_allclose(np.asarray(v), theirs[k].numpy(), rtol=2e-3, atol=1e-5,
                                           err_msg=f"{name}: {k}")
            fns[name], targets[name] = peer, 1.0
    times = timed(fns)
    report(f"per-sample gradients, MLP {'-'.join(map(str, MLP))} tanh + cross-entropy, "
           f"B={B_MLP}, float32", times, ours="eg.per_sample_grad", targets=targets)

    w, xs, ys, sloss, st_loss = seq_case(rng)
    fns = {"eg.per_sample_grad_norm": lambda: per_sample_grad_norm(sloss)(w, xs, ys)}
    if torch is not None:
        tp, tx, ty = _torch(w), torch.tensor(xs), torch.tensor(ys)
        fns["torch.func.vmap(grad) + norms"] = lambda: _torch_norms(st_loss, tp, tx, ty)
    times = timed(fns)
    report(f"per-sample gradient norms, 'bti,oi->bto' {'-'.join(map(str, SEQ))} tanh, "
           f"B={B_SEQ}, T={T_SEQ}, float32", times, ours="eg.per_sample_grad_norm",
           targets={"torch.func.vmap(grad) + norms": 0.3})
    print("  " + per_sample_grad_norm(sloss).explain(w, xs, ys).replace("\n", "\n  "))
    if torch is not None and os.path.exists("/proc/self/clear_refs"):
        ours, theirs = _peak("ours"), _peak("torch")
        if ours is not None and theirs:
            r = ours / theirs
            print(f"  peak memory above the inputs: ours {ours / 2 ** 20:.1f} MiB, torch "
                  f"{theirs / 2 ** 20:.1f} MiB: {r:.3f}x (target <= 0.2x: "
                  f"{'met' if r <= 0.2 else 'MISSED'})")

    layers = _layers(MLP, rng)
    xb = rng.standard_normal((B_MLP, MLP[0])).astype(np.float32)

    def one(x):  # written for one example
        for n, (w_, b_) in enumerate(layers):
            x = eg.einsum("oi,i->o", w_, x) + b_
            x = eg.tanh(x) if n < len(layers) - 1 else x
        return x

    def batch(x):  # the same, written for batches
        for n, (w_, b_) in enumerate(layers):
            x = eg.einsum("bi,oi->bo", x, w_) + b_
            x = eg.tanh(x) if n < len(layers) - 1 else x
        return x
    np.testing.assert_allclose(np.asarray(vmap(one)(xb)), np.asarray(batch(xb)), rtol=1e-4,
                               atol=1e-5)
    times = timed({"eg.vmap(per-example MLP)": lambda: vmap(one)(xb),
                   "the MLP written for batches": lambda: batch(xb)}, rounds=5)
    report(f"vmap, MLP {'-'.join(map(str, MLP))} tanh forward, {B_MLP} examples, float32",
           times, ours="eg.vmap(per-example MLP)", targets={"the MLP written for batches": 1.2})
    cnn(rng)


def cnn(rng) -> None:
    import time
    p, x, y, ours, t_loss = cnn_case(rng)
    j = eg.jit(ours)
    t = time.perf_counter()
    got = j(p, x, y)
    first = time.perf_counter() - t
    fns = {"eg.jit(vmap(grad))": lambda: j(p, x, y)}
    if torch is not None:
        tp, tx, ty = _torch(p), torch.tensor(x), torch.tensor(y)
        f = t_vmap(t_grad(t_loss), in_dims=(None, 0, 0))
        theirs = f(tp, tx, ty)
        for k in p:  # the same numbers, but where a pooling window ties in float32:
            a, t = np.asarray(got[k]), theirs[k].numpy()  # torch routes to one entry, we split
            same = np.isclose(a, t, rtol=2e-3, atol=1e-5).reshape(B_CNN, -1).all(1)
            assert same.mean() > 0.999, f"{k}: {int((~same).sum())} examples differ from torch"
        fns["torch.func.vmap(grad)"] = lambda: f(tp, tx, ty)
    times = timed(fns, rounds=2, repeat=3)  # a call takes seconds
    report(f"per-sample gradients, CNN conv3x3({CNN_CHANNELS})-ReLU-maxpool2-linear(10) + "
           f"cross-entropy, {B_CNN} 28x28 images, float32", times, ours="eg.jit(vmap(grad))")
    print(f"  our first call (trace on a block of rows, compile): {first:.2f} s")
    if torch is not None and os.path.exists("/proc/self/clear_refs"):
        ours_peak, theirs_peak = _peak("ours", "cnn"), _peak("torch", "cnn")
        if ours_peak is not None and theirs_peak:
            result = sum(np.asarray(v).nbytes for v in got.values())
            print(f"  peak memory of a call above the inputs: ours {ours_peak / 2 ** 20:.0f} MiB, "
                  f"torch {theirs_peak / 2 ** 20:.0f} MiB: {ours_peak / theirs_peak:.3f}x (the "
                  f"result itself: {result / 2 ** 20:.0f} MiB)")


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--peak":
        print(json.dumps(child_peak(*sys.argv[2:])))
    else:
        from common import keep_freed_memory
        print(keep_freed_memory())
        if torch is not None:
            torch.set_num_threads(os.cpu_count() or 1)
            print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        main()
