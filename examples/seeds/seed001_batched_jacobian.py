"""Seed 001: the gradient [BATCH, CLASSES, DIM] of a classifier, in one call.

The user loops over classes, one ``autograd.grad`` per class, and is told that
autograd "only does vector-Jacobian products". In einsum terms, for
``y = f(x)`` with ``y[b, c]`` and ``x[b, d]``, the Jacobian is
``J[b, c, b', d] = dy[b, c] / dx[b', d]``, and

* a VJP contracts a cotangent with J's output indices:
  ``vjp(u)[b', d] = einsum('bc,bcBd->Bd', u, J)`` (one backward pass);
* a JVP contracts a tangent with J's input indices:
  ``jvp(v)[b, c] = einsum('bcBd,Bd->bc', J, v)`` (one forward pass).

For a classifier rows never mix (J is zero unless b == b'), so the per-sample
Jacobian ``(B, C, D)`` is all there is. ``eg.batch_jacobian`` gets it in one
pass by carrying a basis over the C classes as one more einsum index, and it
checks while tracing that no op mixes rows.
"""
import numpy as np

import einsumgrad as eg
from _timing import best_ms, torch_or_none

rng = np.random.default_rng(0)
B, D, HID, C = 64, 784, 256, 10
w1, b1 = rng.standard_normal((HID, D)) / np.sqrt(D), np.zeros(HID)
w2, b2 = rng.standard_normal((C, HID)) / np.sqrt(HID), np.zeros(C)
x = rng.standard_normal((B, D))


def model(x):
    h = eg.relu(eg.einsum("bd,hd->bh", x, w1) + b1)
    return eg.einsum("bh,ch->bc", h, w2) + b2


def main() -> dict:
    J = eg.batch_jacobian(model)(x)                   # (B, C, D) in one call
    Jn = np.asarray(J)
    u, v = rng.standard_normal((B, C)), rng.standard_normal((B, D))
    _, vjp_fn = eg.vjp(model, x)
    assert np.allclose(np.asarray(vjp_fn(u)[0]), np.einsum("bc,bcd->bd", u, Jn))
    _, jvp_out = eg.jvp(model, (x,), (v,))
    assert np.allclose(np.asarray(jvp_out), np.einsum("bcd,bd->bc", Jn, v))
    print(f"J: {Jn.shape}; vjp(u) == einsum('bc,bcd->bd', u, J), "
          f"jvp(v) == einsum('bcd,bd->bc', J, v)")
    ours_ms = best_ms(lambda: eg.batch_jacobian(model)(x))

    torch = torch_or_none()
    if torch is not None:
        net = torch.nn.Sequential(torch.nn.Linear(D, HID), torch.nn.ReLU(),
                                  torch.nn.Linear(HID, C)).double()
        with torch.no_grad():
            for layer, (w, b) in zip((net[0], net[2]), ((w1, b1), (w2, b2))):
                layer.weight.copy_(torch.tensor(w))
                layer.bias.copy_(torch.tensor(b))

        def compute_grad(input, model):  # the user's code
            input.requires_grad_(True)
            grad = []
            output = model(input)
            for i in range(output.size(1)):
                grad.append(torch.autograd.grad(outputs=output[:, i], inputs=input,
                                                grad_outputs=torch.ones(len(input)),
                                                retain_graph=True, create_graph=True)[0])
            input.requires_grad_(False)
            return torch.stack(grad)                  # (C, B, D)
        xt = torch.tensor(x)
        theirs = compute_grad(xt, net).detach().numpy()
        assert np.allclose(Jn, theirs.transpose(1, 0, 2))
        theirs_ms = best_ms(lambda: compute_grad(xt, net))
        print(f"matches the user's loop; einsumgrad {ours_ms:.2f} ms, "
              f"user's loop {theirs_ms:.2f} ms")
    else:
        print(f"einsumgrad {ours_ms:.2f} ms")
    return {"J": Jn}


if __name__ == "__main__":
    main()
