"""Seed 004: partial derivatives of f(t, k) = t*k + 2*t*k^2 on a grid.

``autograd.grad`` sums over the outputs (it is a VJP with a ones cotangent),
so the user got a vector; the answer given builds the full Jacobian of the
meshgrid and filters ``> 0``. ``eg.elementwise_grad`` returns the diagonal of
an element-wise function's Jacobian in one reverse pass: on meshgrid inputs
``T[i, j] = t[i]``, ``K[i, j] = k[j]`` that is exactly ``df/dt`` and ``df/dk``
at every grid point.
"""
import numpy as np

import einsumgrad as eg
from _timing import best_ms, torch_or_none

t, k = np.array([1.0, 2.0, 4.0]), np.array([2.0, 3.0])
T, K = np.meshgrid(t, k, indexing="ij")


def f(t, k):
    return t * k + 2 * t * k ** 2


def main() -> dict:
    dfdt, dfdk = eg.elementwise_grad(f, argnums=(0, 1))(T, K)
    print("gamma:\n", np.asarray(f(T, K)))
    print("df/dt:\n", np.asarray(dfdt))
    print("df/dk:\n", np.asarray(dfdk))
    ours_ms = best_ms(lambda: eg.elementwise_grad(f, argnums=(0, 1))(T, K))

    torch = torch_or_none()
    if torch is not None:
        def answer():  # the accepted answer's code
            Tt, Kt = torch.meshgrid(torch.tensor(t), torch.tensor(k), indexing="ij")
            jt, jk = torch.autograd.functional.jacobian(f, (Tt, Kt))
            return (jt[jt > 0].reshape(len(t), len(k)), jk[jk > 0].reshape(len(t), len(k)))
        at, ak = answer()
        assert np.allclose(np.asarray(dfdt), at.numpy())
        assert np.allclose(np.asarray(dfdk), ak.numpy())
        print(f"matches the answer's jacobian-and-filter; einsumgrad {ours_ms:.3f} ms, "
              f"answer {best_ms(answer):.3f} ms")
    else:
        print(f"einsumgrad {ours_ms:.3f} ms")
    return {"dfdt": np.asarray(dfdt), "dfdk": np.asarray(dfdk)}


if __name__ == "__main__":
    main()
