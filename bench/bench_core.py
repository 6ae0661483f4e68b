"""Issue 2's cases: per-call overhead of one einsum, and an MLP training step.

(a) ``eg.einsum('ij,jk->ik')`` on 8x8 operands against ``np.einsum`` and
    ``torch.einsum``: the engine's fixed cost per op (target <= 3x np.einsum).
(b) forward + backward of an MLP 512-1024-1024-10 (batch 256, float32, tanh,
    softmax cross-entropy) against PyTorch eager and against the same step
    written by hand in NumPy, the engine's overhead floor (targets <= 1.3x
    PyTorch, <= 1.1x hand NumPy).
"""
from __future__ import annotations

import numpy as np

import einsumgrad as eg
from common import median_time, report

try:
    import torch
except ImportError:  # the torch columns are skipped
    torch = None


def per_call() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    ta, tb = eg.tensor(a), eg.tensor(b)
    times = {"einsumgrad eg.einsum (Tensors)": median_time(lambda: eg.einsum("ij,jk->ik", ta, tb)),
             "np.einsum": median_time(lambda: np.einsum("ij,jk->ik", a, b))}
    if torch is not None:
        pa, pb = torch.from_numpy(a), torch.from_numpy(b)
        times["torch.einsum"] = median_time(lambda: torch.einsum("ij,jk->ik", pa, pb))
    report("(a) per-call einsum 'ij,jk->ik', 8x8 float64", times,
           ours="einsumgrad eg.einsum (Tensors)", targets={"np.einsum": 3.0})


def mlp_step() -> None:
    rng = np.random.default_rng(0)
    B, sizes = 256, [512, 1024, 1024, 10]
    f32 = np.float32
    x = rng.standard_normal((B, sizes[0])).astype(f32)
    y = rng.integers(0, sizes[-1], B)
    onehot = np.eye(sizes[-1], dtype=f32)[y]
    Ws = [(rng.standard_normal((o, i)) / np.sqrt(i)).astype(f32) for i, o in zip(sizes, sizes[1:])]
    bs = [np.zeros(o, f32) for o in sizes[1:]]

    params = [eg.tensor(p, requires_grad=True) for p in Ws + bs]
    tx, toh = eg.tensor(x), eg.tensor(onehot)

    def eg_step():
        for p in params:
            p.grad = None
        h = tx
        for i in range(3):
            h = eg.einsum("bi,oi->bo", h, params[i]) + params[3 + i]
            if i < 2:
                h = eg.tanh(h)
        loss = -(eg.log_softmax(h) * toh).sum() * (1.0 / B)
        loss.backward()
        return loss

    def np_step():
        hs, h = [x], x
        for i in range(3):
            h = h @ Ws[i].T + bs[i]
            if i < 2:
                h = np.tanh(h)
            hs.append(h)
        m = h.max(axis=1, keepdims=True)
        e = np.exp(h - m)
        p = e / e.sum(axis=1, keepdims=True)
        g = (p - onehot) / B
        grads = []
        for i in (2, 1, 0):
            grads.append((g.T @ hs[i], g.sum(0)))
            if i:
                g = (g @ Ws[i]) * (1 - hs[i] * hs[i])
        return grads

    times = {"einsumgrad": median_time(eg_step, min_time=2.0), "hand-written NumPy": median_time(np_step, min_time=2.0)}
    targets = {"hand-written NumPy": 1.1}
    if torch is not None:
        tparams = [torch.tensor(p, requires_grad=True) for p in Ws + bs]
        px, py = torch.from_numpy(x), torch.from_numpy(y)

        def torch_step():
            for p in tparams:
                p.grad = None
            h = px
            for i in range(3):
                h = torch.nn.functional.linear(h, tparams[i], tparams[3 + i])
                if i < 2:
                    h = torch.tanh(h)
            loss = torch.nn.functional.cross_entropy(h, py)
            loss.backward()
            return loss

        times["PyTorch eager"] = median_time(torch_step, min_time=2.0)
        targets["PyTorch eager"] = 1.3
        # Same numbers, gradients included: the step is the step.
        l_eg, l_t = float(eg_step().item()), float(torch_step().item())
        assert abs(l_eg - l_t) < 1e-4, (l_eg, l_t)
        for p, q in zip(params, tparams):
            assert np.allclose(p.grad.numpy(), q.grad.numpy(), atol=1e-5), "gradients differ"
    report("(b) MLP 512-1024-1024-10 forward+backward, batch 256, float32", times,
           ours="einsumgrad", targets=targets)


def main() -> None:
    per_call()
    mlp_step()


if __name__ == "__main__":
    main()
