"""``ModuleList`` and ``ModuleDict``: submodules held in a list or a dict, as torch's.

Their modules are registered (parameters, buffers, ``train()``, ``to()``,
state dicts), under the names torch gives them: ``'blocks.0.weight'`` for a
list, ``'heads.digits.bias'`` for a dict. Neither has a ``forward``: the
model that holds them says how they run.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Iterator, Mapping

from .module import Module


class ModuleList(Module):
    """A list of modules, named ``'0'``, ``'1'``, ... in the state dict."""

    def __init__(self, modules: Iterable[Module] | None = None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _index(self, i: int) -> int:
        n = len(self)
        i = operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a ModuleList of {n}")
        return i % n

    def __getitem__(self, i) -> Any:
        mods = list(self._modules.values())
        return ModuleList(mods[i]) if isinstance(i, slice) else mods[self._index(i)]

    def __setitem__(self, i: int, module: Module) -> None:
        self.add_module(str(self._index(i)), module)

    def __delitem__(self, i) -> None:
        mods = list(self._modules.values())
        del mods[i if isinstance(i, slice) else self._index(i)]
        self._modules.clear()  # renumbered from 0, as torch's
        for k in list(self.__dict__):
            if k.isdigit():
                del self.__dict__[k]
        self.extend(mods)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __iadd__(self, modules: Iterable[Module]) -> "ModuleList":
        return self.extend(modules)

    def append(self, module: Module) -> "ModuleList":
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module: Module) -> None:
        mods = list(self._modules.values())
        mods.insert(index, module)
        self._modules.clear()
        self.extend(mods)


class ModuleDict(Module):
    """A dict of modules, in insertion order, named by their keys in the state dict."""

    def __init__(self, modules: Mapping[str, Module] | Iterable[tuple] | None = None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        if not isinstance(key, str) or not key or "." in key:
            raise KeyError(f"ModuleDict keys are non-empty strings without '.', not {key!r}")
        if not isinstance(module, Module):
            raise TypeError(f"ModuleDict holds Modules, not {type(module).__name__}")
        if hasattr(self, key) and key not in self._modules:  # 'keys', 'training': as torch
            raise KeyError(f"attribute '{key}' already exists")
        self._modules[key] = module  # read back as an attribute by __getattr__

    def __getattr__(self, name: str) -> Module:
        mods = self.__dict__.get("_modules", {})
        if name in mods:
            return mods[name]
        raise AttributeError(f"'ModuleDict' object has no attribute {name!r}")

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._modules))

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def pop(self, key: str) -> Module:
        m = self[key]
        del self[key]
        return m

    def clear(self) -> None:
        for k in list(self._modules):
            del self[k]

    def update(self, modules: Mapping[str, Module] | Iterable[tuple]) -> None:
        pairs = modules.items() if hasattr(modules, "items") else modules
        for key, m in pairs:
            self[key] = m
