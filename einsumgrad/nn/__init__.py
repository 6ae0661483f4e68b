"""Neural-network layers built from einsum strings, with ``torch.nn``'s names and layouts.

>>> import einsumgrad.nn as nn
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

Every layer's linear algebra is one readable einsum (``Linear``:
``'...i,oi->...o'``; ``Conv2d``: ``'bchwkl,fckl->bfhw'`` over image patches,
``'bgchwkl,gfckl->bgfhw'`` with groups; attention: ``'bhqd,bhkd->bhqk'``), so
its gradients are derived patterns the engine can print (``eg.trace``,
``eg.explain``). Layers take ``dtype=`` (the default dtype otherwise, see
:mod:`einsumgrad.defaults`); ``module.to(dtype)``, ``float()`` and
``double()`` cast them.
"""
from . import functional, init, utils
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .containers import ModuleDict, ModuleList
from .init import manual_seed
from .layers import (GELU, AvgPool2d, Conv1d, Conv2d, Dropout, Embedding, Flatten, Identity,
                     LayerNorm, Linear, LogSoftmax, MaxPool2d, MultiHeadAttention, ReLU,
                     Sequential, Sigmoid, Softmax, Tanh)
from .module import Module, Parameter, StateDictError
from ..rules import patches, unpatch

MultiheadAttention = MultiHeadAttention  # torch's spelling

__all__ = ["Module", "Parameter", "StateDictError", "Linear", "Conv1d", "Conv2d", "MaxPool2d",
           "AvgPool2d", "LayerNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Embedding",
           "Dropout", "MultiHeadAttention", "MultiheadAttention", "Sequential", "ModuleList",
           "ModuleDict", "Identity", "ReLU", "GELU", "Tanh", "Sigmoid", "Softmax", "LogSoftmax",
           "Flatten", "functional", "init", "utils", "manual_seed", "patches", "unpatch"]
