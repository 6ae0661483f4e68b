"""Optimizers matching ``torch.optim`` step for step, updating parameters in place.

Each step reads ``p.grad`` and rewrites ``p.data`` with in-place array ops on
the parameter's own backend (NumPy, CuPy, ...); state arrays live there too.
Parameters without a gradient are skipped, as in torch.
"""
from __future__ import annotations

import math
from typing import Iterable

from .backends import backend_of
from .tensor import Tensor


class Optimizer:
    """Base class: holds the parameters, walks them on ``step``, clears their gradients.

    A subclass gives its rule as ``update(p, d)``, where ``d`` is the gradient
    with L2 weight decay already added (both torch optimizers add it first).
    """

    def __init__(self, params: Iterable[Tensor], weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.weight_decay = weight_decay
        self.state: dict = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient (the others are skipped, as in torch)."""
        for p in self.params:
            if p.grad is None:
                continue
            d = p.grad.data
            if self.weight_decay:
                d = d + self.weight_decay * p.data
            self.update(p, d)
            p.version += 1  # an op recorded before the step no longer sees p's values

    def update(self, p: Tensor, d) -> None:
        """Rewrite ``p.data`` in place from the decayed gradient ``d``."""
        raise TypeError(f"{type(self).__name__} defines no update rule")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and L2 weight decay (torch's form).

    ``d = g + wd * p``; with momentum, ``buf = d`` on the first step, then
    ``buf = momentum * buf + d``; ``p -= lr * buf``.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        super().__init__(params, weight_decay)
        self.lr, self.momentum = lr, momentum

    def update(self, p: Tensor, d) -> None:
        if self.momentum:
            buf = self.state.get(id(p))
            if buf is None:
                # asarray: a 0-d parameter's decayed gradient is a NumPy scalar,
                # and `buf *=` below must update the stored buffer, not rebind.
                buf = self.state[id(p)] = backend_of(p.data).asarray(d).copy()
            else:
                buf *= self.momentum
                buf += d
            d = buf
        p.data -= self.lr * d


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction and L2 weight decay, as ``torch.optim.Adam``."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, weight_decay)
        self.lr, self.betas, self.eps = lr, betas, eps

    def update(self, p: Tensor, g) -> None:
        b1, b2 = self.betas
        st = self.state.get(id(p))
        if st is None:
            xp = backend_of(p.data)
            st = self.state[id(p)] = [0, xp.zeros_like(p.data), xp.zeros_like(p.data)]
        st[0] += 1
        t, m, v = st
        m += (1 - b1) * (g - m)  # torch's lerp form
        v *= b2
        v += (1 - b2) * g * g
        step_size = self.lr / (1 - b1 ** t)
        denom = backend_of(v).sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
        p.data -= step_size * (m / denom)
