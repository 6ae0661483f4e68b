"""Seed 003: "Einsum Jacobian", the diagonal embedding then collapse, done right.

The post builds ``zeros(x.shape + w.shape + x.shape)``, writes ``w`` onto a
diagonal and sums the embedding down: right, but "so enormous you run out of
RAM with anything more than toy examples". einsumgrad derives the same pattern
symbolically and prints it; ``materialize`` writes the other operands'
contraction straight onto J's generalized diagonal (memory: J itself), and
``jvp`` / ``vjp`` give ``J @ v`` and ``u @ J`` without building J at all.
"""
import numpy as np

import einsumgrad as eg
from _timing import best_ms, torch_or_none

rng = np.random.default_rng(0)
CASES = [  # the post's four patterns and shapes
    ("ij,jk->ik", (2, 3), (3, 4)),
    ("bij,bjk->bik", (5, 3, 8), (5, 8, 9)),
    ("bchwkt,fckt->bfhw", (1, 3, 16, 16, 2, 2), (2, 3, 2, 2)),
    ("abcd,efd->", (1, 2, 3, 4), (9, 10, 4)),
]


def main() -> dict:
    patterns = {}
    for ptrn, xs, ws in CASES:
        jac = eg.derive(ptrn).jacobian(0)
        patterns[ptrn] = str(jac)
        print(f"{ptrn:<20} d/dx: {jac}    (vjp: {eg.derive(ptrn).vjp(0)})")
    ptrn, xs, ws = CASES[1]
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    jac = eg.derive(ptrn).jacobian(0)
    J = np.asarray(jac.materialize(x, w))                      # (5, 3, 9, 5, 3, 8)
    v, u = rng.standard_normal(xs), rng.standard_normal(J.shape[:3])
    Jv = np.asarray(jac.jvp(v, x, w))                           # J @ v, J never built
    uJ = np.asarray(jac.vjp(u, x, w))                           # u @ J, J never built
    assert np.allclose(Jv, np.tensordot(J, v, 3)) and np.allclose(uJ, np.tensordot(u, J, 3))
    print(f"{ptrn}: J {J.shape}; J @ v and u @ J agree with the materialized J")
    ours_ms = best_ms(lambda: jac.materialize(x, w))

    torch = torch_or_none()
    if torch is not None:
        from torch.autograd.functional import jacobian

        def einsum_jacobian(ptrn, x, w):  # the post's function
            op1, op2 = ptrn.split("->")[0].split(",")
            diag = f"{op1 + op2 + op1}->{''.join(c for c in op1 if c not in op2) + op2}"
            start, end = ptrn.replace(",", "").split("->")
            j = torch.zeros(*x.shape, *w.shape, *x.shape, dtype=x.dtype)
            torch.einsum(diag, j)[:] = w
            return torch.einsum(f"{start}...->{end}...", j)
        for p, xs_, ws_ in CASES:
            a, b = rng.standard_normal(xs_), rng.standard_normal(ws_)
            ours = np.asarray(eg.derive(p).jacobian(0).materialize(a, b))
            at, bt = torch.tensor(a), torch.tensor(b)
            assert np.allclose(ours, jacobian(lambda t: torch.einsum(p, t, bt), at).numpy())
            assert np.allclose(ours, einsum_jacobian(p, at, bt).numpy())
        xt, wt = torch.tensor(x), torch.tensor(w)
        post_ms = best_ms(lambda: einsum_jacobian(ptrn, xt, wt))
        torch_ms = best_ms(lambda: jacobian(lambda t: torch.einsum(ptrn, t, wt), xt))
        print(f"all four patterns match the post and torch's jacobian; {ptrn}: einsumgrad "
              f"{ours_ms:.3f} ms, the post's embedding {post_ms:.3f} ms, torch jacobian "
              f"{torch_ms:.3f} ms")
    else:
        print(f"einsumgrad {ours_ms:.3f} ms")
    return {"patterns": patterns, "J": J}


if __name__ == "__main__":
    main()
