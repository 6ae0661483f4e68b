"""Layers with ``torch.nn``'s constructors, parameter names and layouts.

Parameters start as NumPy arrays (float64 unless ``dtype`` says otherwise);
``module.to('cuda')`` or ``module.to(backend)`` moves them.
"""
from __future__ import annotations

from typing import Any

import numpy

from .. import rules as ops
from ..tensor import Tensor, as_tensor
from . import functional as F
from . import init
from .module import Module, Parameter


class Linear(Module):
    """``y = x W^T + b``, the einsum ``'...i,oi->...o'``; ``weight`` is ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype=numpy.float64, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(init.kaiming_uniform((out_features, in_features), in_features,
                                                     dtype, rng))
        self.bias = Parameter(init.uniform((out_features,), init.fan_in_bound(in_features),
                                           dtype, rng)) if bias else None

    def forward(self, x: Any) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution, ``'bchwkl,fckl->bfhw'`` over image patches; ``weight`` is ``(F, C, kh, kw)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, dtype=numpy.float64, rng=None):
        super().__init__()
        kh, kw = ops.as_pair(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), ops.as_pair(stride), ops.as_pair(padding)
        fan_in = in_channels * kh * kw
        self.weight = Parameter(init.kaiming_uniform((out_channels, in_channels, kh, kw), fan_in,
                                                     dtype, rng))
        self.bias = Parameter(init.uniform((out_channels,), init.fan_in_bound(fan_in), dtype,
                                           rng)) if bias else None

    def forward(self, x: Any) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " \
               f"stride={self.stride}, padding={self.padding}"


class MaxPool2d(Module):
    """Maximum over windows of the last two axes (``stride`` defaults to the window)."""

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Any) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class AvgPool2d(MaxPool2d):
    """Mean over windows of the last two axes (``stride`` defaults to the window)."""

    def forward(self, x: Any) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride)


class LayerNorm(Module):
    """Normalize the trailing ``normalized_shape`` axes, then scale by ``weight``, shift by ``bias``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 dtype=numpy.float64):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(numpy.ones(shape, dtype)) if elementwise_affine else None
        self.bias = Parameter(numpy.zeros(shape, dtype)) if elementwise_affine else None

    def forward(self, x: Any) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Embedding(Module):
    """A lookup table: integer ids pick rows of ``weight`` ``(num_embeddings, embedding_dim)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=numpy.float64, rng=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(init.normal((num_embeddings, embedding_dim), dtype, rng))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Dropout(Module):
    """Zero entries with probability ``p`` while training; the identity in ``eval()``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = F.dropout_probability(p)  # refused now, as torch, not at the first forward

    def forward(self, x: Any) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLU(Module):
    def forward(self, x: Any) -> Tensor:
        return ops.relu(x)


class GELU(Module):
    def forward(self, x: Any) -> Tensor:
        return ops.gelu(x)


class Tanh(Module):
    def forward(self, x: Any) -> Tensor:
        return ops.tanh(x)


class Flatten(Module):
    """Merge all axes after the first (as ``torch.nn.Flatten()``)."""

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        return ops.reshape(x, (x.shape[0], -1))


class Sequential(Module):
    """Modules applied in order; their parameters are named ``'0.weight'``, ``'1.bias'``, ...

    A ``ReLU`` followed directly by a ``MaxPool2d`` runs pool first, then ReLU:
    the two commute (both are monotone), values and derivatives of every order
    alike, ties included. The ReLU and its gradient then touch a quarter of the
    data after a 2x2 pool (bench CNN step about 3.5 ms faster at 2 threads).
    """

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x: Any) -> Any:
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            if type(mods[i]) is ReLU and i + 1 < len(mods) and type(mods[i + 1]) is MaxPool2d:
                x, i = mods[i](mods[i + 1](x)), i + 2  # max(relu(x)) == relu(max(x))
            else:
                x, i = mods[i](x), i + 1
        return x


class MultiHeadAttention(Module):
    """Multi-head self- (or cross-) attention, laid out as ``torch.nn.MultiheadAttention``.

    Inputs are batch-first ``(B, L, E)``. ``in_proj_weight`` ``(3E, E)`` holds the
    query, key and value projections; heads are split by a reshape, and the
    scores are ``'bhqd,bhkd->bhqk'``. ``causal=True`` lets each position attend
    only to itself and earlier ones.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, causal: bool = False,
                 dtype=numpy.float64, rng=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.causal = embed_dim, num_heads, causal
        e = embed_dim
        self.in_proj_weight = Parameter(init.xavier_uniform((3 * e, e), dtype, rng))
        self.in_proj_bias = Parameter(numpy.zeros(3 * e, dtype)) if bias else None
        self.out_proj = Linear(e, e, bias, dtype, rng)
        if bias:
            self.out_proj.bias = Parameter(numpy.zeros(e, dtype))

    def forward(self, query: Any, key: Any = None, value: Any = None, mask: Any = None) -> Tensor:
        """Attend from ``query`` to ``key``/``value`` (both default to ``query``).

        Args:
            mask: boolean ``(Lq, Lk)`` (True: may attend) or additive float mask.
        """
        query = as_tensor(query)
        key = query if key is None else as_tensor(key)
        value = key if value is None else as_tensor(value)
        e, h = self.embed_dim, self.num_heads
        # Split heads inside the projections: weights viewed as (3, heads, head_dim, E).
        w3 = ops.reshape(self.in_proj_weight, (3, h, e // h, e))
        b3 = None if self.in_proj_bias is None else ops.reshape(self.in_proj_bias, (3, h, 1, e // h))
        if query is key and key is value:
            # Self-attention: q, k and v as one product and its three slices
            # (one wider GEMM each way; backward the slices' cotangents go
            # back into one buffer, read by one GEMM for x and one for W).
            qkv = ops.einsum("ble,thde->tbhld", query, w3)
            if b3 is not None:
                qkv = ops.add_bias(qkv, ops.reshape(b3, (3, 1, h, 1, e // h)))
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = (ops.einsum("ble,hde->bhld", x, w3[i]) if b3 is None else
                       ops.add_bias(ops.einsum("ble,hde->bhld", x, w3[i]), b3[i])
                       for i, x in enumerate((query, key, value)))
        o = F.scaled_dot_product_attention(q, k, v, mask, self.causal)
        wo = ops.reshape(self.out_proj.weight, (e, h, e // h))
        y = ops.einsum("bhld,ehd->ble", o, wo)
        return y if self.out_proj.bias is None else ops.add_bias(y, self.out_proj.bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}"
