"""``Module``: parameters found by attribute, state dicts with torch's names."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy

from ..backends import Backend, backend_of, device_backend, to_backend
from ..tensor import Tensor


def Parameter(data: Any) -> Tensor:
    """A leaf Tensor that requires grad: what a Module registers as a parameter."""
    return Tensor(data, requires_grad=True)


class Module:
    """Base class of layers and models, with ``torch.nn.Module``'s surface.

    Assigning a Tensor that requires grad registers a parameter; assigning a
    Module registers a submodule. Names follow torch (``'0.weight'``,
    ``'out_proj.bias'``), so a PyTorch ``state_dict`` converted to NumPy loads.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        params, mods = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise AttributeError("call Module.__init__() before assigning attributes")
        params.pop(name, None)
        mods.pop(name, None)
        if isinstance(value, Tensor) and value.requires_grad:
            params[name] = value
        elif isinstance(value, Module):
            mods[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal ------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        return (m for _, m in self.named_modules())

    def children(self) -> Iterator["Module"]:
        return iter(self._modules.values())

    def named_parameters(self) -> Iterator[tuple]:
        """``(name, parameter)`` pairs in registration order, submodules' included."""
        seen = set()
        for prefix, m in self.named_modules():
            for name, p in m._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> Iterator[Tensor]:
        return (p for _, p in self.named_parameters())

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- state --------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, numpy.ndarray]":
        """Every parameter as a NumPy array (a copy), under torch's names.

        ``numpy.savez(path, **model.state_dict())`` saves it; loading the file's
        arrays with :meth:`load_state_dict` restores the model bit for bit.
        """
        return OrderedDict((n, numpy.array(backend_of(p.data).to_numpy(p.data)))
                           for n, p in self.named_parameters())

    def load_state_dict(self, state: Any, strict: bool = True) -> None:
        """Copy arrays (NumPy, backend or Tensors) into the parameters of the same names.

        Each value lands on its parameter's backend and dtype (as torch copies
        into existing parameters).

        Raises:
            KeyError: with ``strict``, a name missing on either side.
            ValueError: a shape that does not match.
        """
        own = dict(self.named_parameters())
        names = set(state.keys()) if hasattr(state, "keys") else set(state.files)
        if strict and names != set(own):
            raise KeyError(f"load_state_dict: missing {sorted(set(own) - names)}, "
                           f"unexpected {sorted(names - set(own))}")
        for name, p in own.items():
            if name not in names:
                continue
            v = state[name]
            v = v.data if isinstance(v, Tensor) else v
            if tuple(v.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(v.shape)}, "
                                 f"the parameter {p.shape}")
            xp = backend_of(p.data)
            p.data = to_backend(v, xp).astype(p.dtype, copy=True)
            p.grad = None

    def to(self, device: Any = None, dtype: Any = None) -> "Module":
        """Move every parameter to ``device`` ('cpu', 'cuda' or a Backend) and/or ``dtype``, in place."""
        xp = device_backend(device) if isinstance(device, str) else device
        if xp is not None and not isinstance(xp, Backend):
            raise TypeError(f"to(): device must be 'cpu', 'cuda' or a Backend, not {device!r}")
        for p in self.parameters():
            if xp is not None:
                p.data = to_backend(p.data, xp)
            if dtype is not None:
                p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self) -> str:
        return ""
