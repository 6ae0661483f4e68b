"""Seed 002: per-point Jacobians (B, N, 3, 3) of a point-wise MLP R^3 -> R^3.

``torch.autograd.functional.jacobian`` on the flattened points builds
``(B*N, 3, B*N, 3)``, almost all zeros. ``eg.batch_jacobian(f, batch_ndim=2)``
treats both leading axes as batch axes (the points are flattened for ``f``, so
a point-wise ``f`` runs unchanged) and pushes a 3-vector basis through the
network: about three forward passes, memory linear in the number of points.
A function that does mix points raises ``eg.BatchMixingError`` instead of
returning a silently wrong answer.
"""
import numpy as np

import einsumgrad as eg
from _timing import best_ms, torch_or_none

rng = np.random.default_rng(0)
B, N, H = 4, 256, 64
params = [(rng.standard_normal((o, i)) / np.sqrt(i), 0.1 * rng.standard_normal(o))
          for i, o in ((3, H), (H, H), (H, 3))]
x = rng.standard_normal((B, N, 3))


def mlp(p):  # point-wise: acts on the last axis only
    for n, (w, b) in enumerate(params):
        p = eg.einsum("...i,oi->...o", p, w) + b
        p = eg.tanh(p) if n < len(params) - 1 else p
    return p


def main() -> dict:
    J = eg.batch_jacobian(mlp, batch_ndim=2)(x)     # (B, N, 3, 3)
    Jn = np.asarray(J)
    print(f"per-point Jacobians: {Jn.shape}")
    try:
        eg.batch_jacobian(lambda p: mlp(p - p.mean(axis=0)), batch_ndim=2)(x)
        raise AssertionError("a function mixing points must raise")
    except eg.BatchMixingError as e:
        error = str(e)
        print(f"a function that centres the cloud mixes points: BatchMixingError: {error}")
    ours_ms = best_ms(lambda: eg.batch_jacobian(mlp, batch_ndim=2)(x))

    torch = torch_or_none()
    if torch is not None:
        tp = [(torch.tensor(w), torch.tensor(b)) for w, b in params]

        def net(p):
            for n, (w, b) in enumerate(tp):
                p = p @ w.T + b
                p = torch.tanh(p) if n < len(tp) - 1 else p
            return p

        def compute_jacobian_batch(inp, out):  # the user's code
            u, v, w = out[:, :, 0], out[:, :, 1], out[:, :, 2]
            n_batch = inp.size(0)
            ones = torch.ones_like(u)
            grads = [torch.autograd.grad(o, [inp], grad_outputs=ones, create_graph=True)[0]
                     for o in (u, v, w)]
            return torch.cat(grads, dim=-1).reshape(n_batch, -1, 3, 3)

        def users_code():
            inp = torch.tensor(x, requires_grad=True)
            return compute_jacobian_batch(inp, net(inp))
        assert np.allclose(Jn, users_code().detach().numpy())
        flat = torch.tensor(x[:1, :64].reshape(-1, 3))  # the forum route, on 64 points
        forum = torch.autograd.functional.jacobian(net, flat).sum(dim=2).numpy()
        assert np.allclose(Jn[0, :64], forum)
        theirs_ms = best_ms(users_code)
        print(f"matches the user's code and the forum's jacobian(...).sum(dim=2); "
              f"einsumgrad {ours_ms:.2f} ms, user's code {theirs_ms:.2f} ms")
    else:
        print(f"einsumgrad {ours_ms:.2f} ms")
    return {"J": Jn, "error": error}


if __name__ == "__main__":
    main()
