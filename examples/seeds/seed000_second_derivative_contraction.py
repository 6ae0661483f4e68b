"""Seed 000: per-sample Jacobian and Hessian of a network, then einsum('bi,bijk,bk->bj').

The user nests ``torch.autograd.functional.jacobian`` (building the B x B
blocks and summing them away) and loops over samples and outputs for the
contraction. einsumgrad gives the per-sample Jacobian (B, out, in) and Hessian
(B, out, in, in) directly, and the contraction ``x^T H_j x`` as the second
directional derivative ``d^2/dt^2 f(x + t x)``, which never builds H.
"""
import numpy as np

import einsumgrad as eg
from _timing import best_ms, torch_or_none

x = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])   # 2 samples, 3 features
c = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=float)


def calculation(x):
    return (x @ c) ** 2


def main() -> dict:
    J = eg.batch_jacobian(calculation)(x)            # (B, out, in)
    H = eg.batch_hessian(calculation)(x)             # (B, out, in, in)
    result = eg.directional(calculation, 2)(x, x)    # x^T H_j x per sample, H never built
    via_h = np.einsum("bi,bjik,bk->bj", x, np.asarray(H), x)
    assert np.allclose(np.asarray(result), via_h)
    print("Jacobian (B, out, in):\n", np.asarray(J))
    print("result = einsum('bi,bjik,bk->bj', x, H, x):\n", np.asarray(result))
    ours_ms = best_ms(lambda: eg.directional(calculation, 2)(x, x))

    torch = torch_or_none()
    if torch is not None:
        xt = torch.tensor(x)
        ct = torch.tensor(c)

        def users_code():  # the post's code, in float64
            calc = lambda a: (a @ ct) ** 2
            gg = torch.autograd.functional.jacobian(
                lambda a: torch.sum(torch.autograd.functional.jacobian(
                    calc, a, create_graph=True), dim=0).transpose(0, 1), xt, create_graph=True)
            second = torch.sum(gg, dim=0).transpose(1, 2).transpose(0, 1)
            g = torch.autograd.functional.jacobian(calc, xt, create_graph=True)
            rows = [[(xt[i:i + 1] @ second[i][ii] @ xt[i:i + 1].T).item() for ii in range(3)]
                    for i in range(2)]
            return torch.sum(g, dim=0).transpose(0, 1), second, torch.tensor(rows)
        jac_t, second_t, result_t = users_code()
        assert np.allclose(np.asarray(result), result_t.numpy())
        assert np.allclose(np.asarray(H).transpose(0, 1, 3, 2), second_t.detach().numpy())
        assert np.allclose(np.asarray(J), jac_t.detach().numpy())
        theirs_ms = best_ms(users_code)
        print(f"matches the user's loop; einsumgrad {ours_ms:.2f} ms, "
              f"user's code {theirs_ms:.2f} ms")
    else:
        print(f"einsumgrad {ours_ms:.2f} ms")
    return {"J": np.asarray(J), "H": np.asarray(H), "result": np.asarray(result)}


if __name__ == "__main__":
    main()
