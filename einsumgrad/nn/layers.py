"""Layers with ``torch.nn``'s constructors, parameter names and layouts.

Parameters start as NumPy arrays in ``dtype``, or the default dtype
(:func:`einsumgrad.defaults.get_default_dtype`, float64 unless set);
``module.to('cuda')`` or ``module.to(backend)`` moves them. An input of
another floating dtype than the layer's computes in the dtype NumPy's
promotion gives the two: a float32 input to a float64 layer gives float64
(torch would refuse the mix), a float64 input to a float32 layer float64 too.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy

from .. import rules as ops
from ..defaults import resolve
from ..tensor import Tensor, as_tensor
from . import functional as F
from . import init
from .module import Module, Parameter


class Linear(Module):
    """``y = x W^T + b``, the einsum ``'...i,oi->...o'``; ``weight`` is ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=None,
                 rng=None):
        super().__init__()
        dtype = resolve(dtype)
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


class _ConvNd(Module):
    """What Conv1d and Conv2d share: torch's arguments, checked, and the weight
    ``(F, C / groups, *kernel)`` with torch's initialization."""

    def __init__(self, n: int, in_channels: int, out_channels: int, kernel_size, stride,
                 padding, dilation, groups: int, bias: bool, padding_mode: str, dtype, rng):
        super().__init__()
        tup = (lambda v: (v,) * n if isinstance(v, int) else tuple(v))  # noqa: E731
        kernel = tup(kernel_size)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must "
                             f"be multiples of groups {groups}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode {padding_mode!r}: only 'zeros' is implemented")
        if isinstance(padding, str):
            F._conv_padding(padding, (1,) * n, (1,) * n, tup(stride))  # refused now, as torch
        else:
            padding = tup(padding)
        for name, v in (("kernel_size", kernel), ("stride", tup(stride)),
                        ("dilation", tup(dilation))):
            if any(type(n) is bool or n < 1 for n in v):  # a bias flag in dilation's place too
                raise ValueError(f"{name} must be positive integers, got {v}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = kernel, tup(stride), tup(dilation)
        self.padding, self.padding_mode = padding, padding_mode
        dtype = resolve(dtype)
        fan_in = in_channels // groups * int(numpy.prod(kernel))
        self.weight = Parameter(init.kaiming_uniform(
            (out_channels, in_channels // groups) + kernel, fan_in, dtype, rng))
        self.bias = Parameter(init.uniform((out_channels,), init.fan_in_bound(fan_in), dtype,
                                           rng)) if bias else None

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, " \
            f"stride={self.stride}"
        if self.padding != (0,) * len(self.kernel_size):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * len(self.kernel_size):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")


class Conv2d(_ConvNd):
    """2-D convolution, ``'bchwkl,fckl->bfhw'`` over image patches; ``weight`` is
    ``(F, C / groups, kh, kw)``.

    Args as ``torch.nn.Conv2d``: ``padding`` an int, a pair, ``"same"`` or
    ``"valid"``; ``dilation`` the step between window entries; ``groups``
    splits the channels (``groups == in_channels``: depthwise).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 dtype=None, rng=None):
        super().__init__(2, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, dtype, rng)

    def forward(self, x: Any) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Conv1d(_ConvNd):
    """1-D convolution over ``(B, C, L)``; ``weight`` is ``(F, C / groups, k)``.

    Arguments as :class:`Conv2d`'s (ints, or 1-tuples), as ``torch.nn.Conv1d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 dtype=None, rng=None):
        super().__init__(1, in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, dtype, rng)

    def forward(self, x: Any) -> Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


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
                 bias: bool = True, dtype=None):
        super().__init__()
        dtype = resolve(dtype)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(numpy.ones(shape, dtype)) if elementwise_affine else None
        self.bias = Parameter(numpy.zeros(shape, dtype)) if elementwise_affine and bias else None

    def forward(self, x: Any) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Embedding(Module):
    """A lookup table: integer ids pick rows of ``weight`` ``(num_embeddings, embedding_dim)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None, rng=None):
        super().__init__()
        dtype = resolve(dtype)
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


class Identity(Module):
    """Its input, unchanged (arguments are accepted and ignored, as torch's)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x: Any) -> Any:
        return x


class ReLU(Module):
    """``max(x, 0)``. ``inplace`` is accepted for torch's signature; the result is new."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x: Any) -> Tensor:
        return F.relu(x)


class GELU(Module):
    """GELU, ``approximate="none"`` (erf) or ``"tanh"``, as torch's."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Any) -> Tensor:
        return ops.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Tanh(Module):
    def forward(self, x: Any) -> Tensor:
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x: Any) -> Tensor:
        return ops.sigmoid(x)


def _legacy_softmax_dim(name: str, ndim: int) -> int:
    """torch's axis for a softmax built without ``dim`` (with its warning)."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                  f"to include dim=X as an argument.", UserWarning, stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(Module):
    """``softmax`` along ``dim``; without it, torch's legacy choice (and warning)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        dim = _legacy_softmax_dim("softmax", x.ndim) if self.dim is None else self.dim
        return ops.softmax(x, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """``log_softmax`` along ``dim`` (as :class:`Softmax` picks it)."""

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        dim = _legacy_softmax_dim("log_softmax", x.ndim) if self.dim is None else self.dim
        return ops.log_softmax(x, dim)


class Flatten(Module):
    """Merge axes ``start_dim`` to ``end_dim`` (all after the first by default), as torch's."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


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

    def __getitem__(self, i):
        mods = list(self._modules.values())
        return Sequential(*mods[i]) if isinstance(i, slice) else mods[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules.values()))

    def append(self, module: Module) -> "Sequential":
        setattr(self, str(len(self)), module)
        return self

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
                 dtype=None, rng=None):
        super().__init__()
        dtype = resolve(dtype)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.causal = embed_dim, num_heads, causal
        e = embed_dim
        self.in_proj_weight = Parameter(init.xavier_uniform((3 * e, e), dtype, rng))
        self.in_proj_bias = Parameter(numpy.zeros(3 * e, dtype)) if bias else None
        self.out_proj = Linear(e, e, bias, dtype=dtype, rng=rng)
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
