"""``Module``: parameters found by attribute, state dicts with torch's names."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy

from ..backends import Backend, backend_of, device_backend, to_backend
from ..tensor import Tensor


def Parameter(data: Any) -> Tensor:
    """A leaf Tensor that requires grad: what a Module registers as a parameter.

    A Tensor's array is taken as it is (as torch's ``Parameter`` shares the
    tensor's storage); a CuPy array stays on its GPU, anything else becomes a
    NumPy array.

    Raises:
        TypeError: ``data`` is not floating-point, as ``eg.tensor(data,
            requires_grad=True)``.
    """
    data = data.data if isinstance(data, Tensor) else data
    if backend_of(data).name == "numpy" and not isinstance(data, numpy.ndarray):
        data = numpy.asarray(data)  # lists and Python numbers, as eg.tensor
    if data.dtype.kind != "f":  # checked here too: a layer's weights are real floats
        raise TypeError(f"only floating-point tensors can require grad, got dtype {data.dtype}")
    return Tensor(data, requires_grad=True)


class StateDictError(KeyError, ValueError, TypeError, RuntimeError):
    """``load_state_dict`` refused the state: every bad key, each with why.

    One error for all the kinds: a caller catches it as ``KeyError`` (names
    missing or unexpected, as before), ``ValueError`` (shapes), ``TypeError``
    (values that are not numeric arrays) or, as torch's, ``RuntimeError``.
    """

    def __str__(self) -> str:
        return self.args[0]  # the message as written, not KeyError's repr of it


def _array(v: Any) -> Any:
    """The array a state-dict value holds: a backend array, an einsumgrad
    Tensor's, or a torch tensor's as NumPy (torch imported only by its caller).

    Raises:
        TypeError: ``v`` is none of those (torch's ``load_state_dict`` takes
            tensors only: a list, a number or None is refused, not guessed at).
    """
    if isinstance(v, Tensor):
        return v.data
    if isinstance(v, numpy.ndarray) or backend_of(v).name != "numpy":
        return v
    if all(callable(getattr(v, f, None)) for f in ("detach", "cpu", "numpy")):  # torch's
        t = v.detach().cpu()
        try:
            return t.numpy()
        except TypeError as e:  # a dtype NumPy lacks
            if t.is_floating_point():
                return t.float().numpy()  # bfloat16, float8: exact in float32
            raise TypeError(f"a torch tensor NumPy cannot take ({e})") from None
    raise TypeError(f"a {type(v).__name__}, not an array (give a NumPy array, an einsumgrad "
                    f"Tensor or a torch tensor)")


class Module:
    """Base class of layers and models, with ``torch.nn.Module``'s surface.

    Assigning a Tensor that requires grad registers a parameter; assigning a
    Module registers a submodule. Names follow torch (``'0.weight'``,
    ``'out_proj.bias'``), so a PyTorch ``state_dict`` converted to NumPy loads.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        params, mods = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise AttributeError("call Module.__init__() before assigning attributes")
        buffers = self._buffers
        if name in buffers and not (isinstance(value, Tensor) and value.requires_grad):
            # A registered buffer stays one (as torch): a Tensor, an array or None.
            buffers[name] = value if value is None or isinstance(value, Tensor) else Tensor(value)
            object.__setattr__(self, name, buffers[name])
            return
        params.pop(name, None)
        mods.pop(name, None)
        buffers.pop(name, None)
        if isinstance(value, Tensor) and value.requires_grad:
            params[name] = value
        elif isinstance(value, Module):
            mods[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value: Any, persistent: bool = True) -> None:
        """Register state that is not a parameter (BatchNorm's running statistics).

        A buffer is a Tensor that no optimizer updates; it moves with
        :meth:`to`, and a persistent one is in :meth:`state_dict` under its
        name, as torch's.

        Args:
            name: the attribute name.
            value: a Tensor or backend array (held as a Tensor), or None.
            persistent: False keeps it out of the state dict.
        """
        if value is not None and not isinstance(value, Tensor):
            value = Tensor(value)
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        self._buffers[name] = value
        (self._non_persistent.discard if persistent else self._non_persistent.add)(name)
        object.__setattr__(self, name, value)

    def add_module(self, name: str, module: "Module | None") -> None:
        """Register ``module`` as the submodule ``name`` (as ``setattr``)."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {type(module).__name__} is not a Module")
        setattr(self, name, module)

    register_module = add_module

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal ------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple]:
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple]:
        return ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self) -> Iterator["Module"]:
        return (m for _, m in self.named_children())

    def apply(self, fn) -> "Module":
        """Call ``fn`` on every submodule, then on this module (as torch); returns self."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def named_parameters(self, remove_duplicate: bool = True) -> Iterator[tuple]:
        """``(name, parameter)`` pairs in registration order, submodules' included.

        Args:
            remove_duplicate: a parameter registered under several names (tied
                weights) comes once, under its first name; False: under each.
        """
        seen = set()
        for prefix, m in self.named_modules():
            for name, p in m._parameters.items():
                if id(p) not in seen or not remove_duplicate:
                    seen.add(id(p))
                    yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> Iterator[Tensor]:
        return (p for _, p in self.named_parameters())

    def named_buffers(self, remove_duplicate: bool = True) -> Iterator[tuple]:
        """``(name, buffer)`` pairs, submodules' included (None buffers left out)."""
        seen = set()
        for prefix, m in self.named_modules():
            for name, b in m._buffers.items():
                if b is not None and (id(b) not in seen or not remove_duplicate):
                    seen.add(id(b))
                    yield (f"{prefix}.{name}" if prefix else name), b

    def buffers(self) -> Iterator[Tensor]:
        return (b for _, b in self.named_buffers())

    def _state_tensors(self, remove_duplicate: bool = False) -> Iterator[tuple]:
        """What the state dict holds, in torch's order: each module's parameters,
        then its persistent buffers, then its submodules', depth first."""
        seen = set()
        for prefix, m in self.named_modules():
            own = list(m._parameters.items()) + [(n, b) for n, b in m._buffers.items()
                                                 if n not in m._non_persistent]
            for name, t in own:
                if t is not None and (id(t) not in seen or not remove_duplicate):
                    seen.add(id(t))
                    yield (f"{prefix}.{name}" if prefix else name), t

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
        """Every parameter and persistent buffer as a NumPy array (a copy), under
        torch's names and in torch's order: a tied parameter under each of its
        names, as torch's.

        ``numpy.savez(path, **model.state_dict())`` saves it; loading the file's
        arrays with :meth:`load_state_dict` restores the model bit for bit.
        """
        return OrderedDict((n, numpy.array(backend_of(p.data).to_numpy(p.data)))
                           for n, p in self._state_tensors())

    def load_state_dict(self, state: Any, strict: bool = True) -> None:
        """Copy arrays into the parameters and buffers of the same names, all or nothing.

        Values may be NumPy or backend arrays, einsumgrad Tensors or torch
        tensors. Each lands on its tensor's backend and dtype, cast as torch's
        ``copy_`` casts (float32 into float64, integers into floats, a float
        into an integer buffer such as ``num_batches_tracked``). Every key is
        checked before anything changes; a changed parameter's or buffer's
        version counter moves on, so a backward through values recorded
        before the load raises.

        A tied parameter (one registered under several names) loads from any
        of its names; names of it given together must hold equal values.

        Raises:
            StateDictError: one error naming every bad key and why, the model
                untouched: with ``strict``, a parameter or persistent buffer
                none of whose names is given, or a name of none; anywhere, a
                value that is not an array, a dtype that is not a real number
                (bool, complex, object, text), a shape that differs from the
                tensor's, or tied names with different values.
        """
        names = list(state.keys()) if hasattr(state, "keys") else list(state.files)
        own = dict(self._state_tensors())
        buffers = {id(b) for b in self.buffers()}
        kind = lambda t: "buffer" if id(t) in buffers else "parameter"  # noqa: E731
        bad = []
        if strict:
            given = {id(own[n]) for n in names if n in own}
            missing = [n for n, p in self._state_tensors(remove_duplicate=True)
                       if id(p) not in given]
            bad += [f"{n!r}: missing" for n in missing]
            bad += [f"{n!r}: unexpected, no parameter or buffer has this name"
                    for n in names if n not in own]
        new, source = {}, {}  # id(tensor) -> its new array, and the name it came from
        for name in names:
            p = own.get(name)
            if p is None:
                continue
            try:
                v = _array(state[name])
            except TypeError as e:
                bad.append(f"{name!r}: {e}")
                continue
            if v.dtype.kind not in "fiu":
                bad.append(f"{name!r}: dtype {v.dtype}, not real numbers for a {p.dtype} "
                           f"{kind(p)}")
            elif tuple(v.shape) != p.shape:
                bad.append(f"{name!r}: shape {tuple(v.shape)}, the {kind(p)}'s {p.shape}")
            else:
                xp = backend_of(p.data)
                v = to_backend(v, xp).astype(p.dtype, copy=True)
                first = source.setdefault(id(p), name)
                if first != name and not bool(xp.array_equal(new[id(p)], v, equal_nan=True)):
                    bad.append(f"{name!r}: tied to {first!r} (one {kind(p)}) but the values "
                               f"differ")
                new[id(p)] = v
        if bad:
            raise StateDictError(f"load_state_dict: {len(bad)} bad key(s), nothing loaded:\n  "
                                 + "\n  ".join(bad))
        for _, p in self._state_tensors(remove_duplicate=True):
            if id(p) in new:
                p.data = new[id(p)]
                p.version += 1  # recorded ops that saved the old values now refuse backward
                p.grad = None

    def to(self, *args: Any, device: Any = None, dtype: Any = None) -> "Module":
        """Move parameters and buffers to a device and/or cast them to a dtype, in place.

        As torch's: ``to(dtype)``, ``to(device)``, ``to(device, dtype)`` or by
        keyword. A device is ``'cpu'``, ``'cuda'`` or a Backend. A dtype casts
        the floating parameters and buffers only (``num_batches_tracked``
        stays an integer). Gradients are dropped. Build the optimizer after.
        """
        for a in args:
            if isinstance(a, Backend) or a is None:
                device = a if a is not None else device
                continue
            try:
                dtype = numpy.dtype(a)
            except TypeError:  # 'cpu', 'cuda': not a dtype
                device = a
        xp = device_backend(device) if isinstance(device, str) else device
        if xp is not None and not isinstance(xp, Backend):
            raise TypeError(f"to(): device must be 'cpu', 'cuda' or a Backend, not {device!r}")
        if dtype is not None and numpy.dtype(dtype).kind != "f":
            raise TypeError(f"to(): modules take floating dtypes only, not {numpy.dtype(dtype)}")
        for p in list(self.parameters()) + list(self.buffers()):
            if xp is not None:
                p.data = to_backend(p.data, xp)
            if dtype is not None and p.dtype.kind == "f":
                p.data = p.data.astype(dtype)
            p.grad = None
        return self

    def float(self) -> "Module":
        """Floating parameters and buffers cast to float32 (torch's ``float``)."""
        return self.to(numpy.float32)

    def double(self) -> "Module":
        """Floating parameters and buffers cast to float64."""
        return self.to(numpy.float64)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"

    def extra_repr(self) -> str:
        return ""
