"""Neural-network layers built from einsum strings, with ``torch.nn``'s names and layouts.

>>> import einsumgrad.nn as nn
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

Every layer's linear algebra is one readable einsum (``Linear``:
``'...i,oi->...o'``; ``Conv2d``: ``'bchwkl,fckl->bfhw'`` over image patches;
attention: ``'bhqd,bhkd->bhqk'``), so its gradients are derived patterns the
engine can print (``eg.trace``, ``eg.explain``).
"""
from . import functional, init
from .init import manual_seed
from .layers import (GELU, AvgPool2d, Conv2d, Dropout, Embedding, Flatten, LayerNorm, Linear,
                     MaxPool2d, MultiHeadAttention, ReLU, Sequential, Tanh)
from .module import Module, Parameter
from ..rules import patches, unpatch

MultiheadAttention = MultiHeadAttention  # torch's spelling

__all__ = ["Module", "Parameter", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "LayerNorm",
           "Embedding", "Dropout", "MultiHeadAttention", "MultiheadAttention", "Sequential",
           "ReLU", "GELU", "Tanh", "Flatten", "functional", "init", "manual_seed", "patches",
           "unpatch"]
