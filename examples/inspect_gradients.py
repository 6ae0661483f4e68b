"""What autograd does inside a conv layer and an attention layer, as einsum patterns.

``python examples/inspect_gradients.py`` prints, for each layer, the ops
``eg.trace`` records and the backward (VJP) pattern the engine derived for
each einsum; then ``eg.explain`` of the layer's central einsum. Read a VJP
pattern ``'bfhw,fckl->bchwkl'`` as: the gradient of operand 0 is the output's
cotangent ``bfhw`` contracted with the other operand(s).
"""
from __future__ import annotations

import numpy as np

import einsumgrad as eg
from einsumgrad.nn import functional as F


def rule(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * (60 - len(title))}")


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))

    rule("conv2d: recorded ops and derived VJPs")
    print(eg.trace(lambda x, w: F.conv2d(x, w, padding=1), x, w))
    print("\nThe patch op is linear: its VJP is 'unpatch' (overlap-add of each window back\n"
          "onto the image) and unpatch's VJP is the patch op again, so every derivative of\n"
          "a convolution, of any order, is patches, unpatch and einsums.")
    rule("conv2d: eg.explain('bchwkl,fckl->bfhw')")
    print(eg.explain("bchwkl,fckl->bfhw", (2, 3, 8, 8, 3, 3), (4, 3, 3, 3)))

    q, k, v = (rng.standard_normal((2, 4, 5, 8)) for _ in range(3))
    rule("attention: recorded ops and derived VJPs")
    print(eg.trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v))
    rule("attention scores: eg.explain('bhqd,bhkd->bhqk')")
    print(eg.explain("bhqd,bhkd->bhqk", (2, 4, 5, 8), (2, 4, 5, 8)))
    rule("attention: derived patterns of the value mix 'bhqk,bhkd->bhqd'")
    d = eg.derive("bhqk,bhkd->bhqd")
    print(f"  d/d(attention weights): {d.vjp(0)}")
    print(f"  d/d(values):            {d.vjp(1)}")
    print(f"  forward-mode, tangent in values: {d.jvp(1)}")


if __name__ == "__main__":
    main()
