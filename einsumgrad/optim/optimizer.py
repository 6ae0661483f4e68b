"""Optimizers matching ``torch.optim`` step for step, updating parameters in place.

Each step reads ``p.grad`` and rewrites ``p.data`` with in-place array ops on
the parameter's own backend (NumPy, CuPy, ...); state arrays live there too.
Parameters without a gradient are skipped, as in torch. Hyperparameters live
in ``param_groups`` (a list of dicts, as torch's), read at every step, so a
scheduler or a hand edit of ``group['lr']`` takes effect at the next one.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy

from ..backends import backend_of, to_backend
from ..tensor import Tensor, enable_grad


class Optimizer:
    """Base class: parameter groups, per-parameter state, ``step``, ``zero_grad``,
    and a state dict that round-trips through ``numpy.savez``.

    A subclass gives its rule as ``update(p, g, group)``: rewrite ``p.data`` in
    place from the gradient array ``g`` with the hyperparameters of ``group``,
    keeping what it needs between steps in ``self.state[p]`` (a dict, torch's
    names: ``step``, ``exp_avg``, ``momentum_buffer``, ...).

    Args:
        params: Tensors, or dicts each with ``'params'`` (Tensors) and any
            hyperparameters that differ from ``defaults`` for that group.
        defaults: every hyperparameter's value where a group does not say.
    """

    def __init__(self, params: Iterable, defaults: dict):
        self.defaults = dict(defaults)
        self.state: dict = {}  # parameter -> its state (keyed by identity, as torch)
        self.param_groups: list = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        for g in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(g)

    @property
    def params(self) -> list:
        """Every parameter, group after group."""
        return [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, group: dict) -> None:
        """Add a group: its ``'params'`` and hyperparameters (the defaults fill the rest).

        Raises:
            TypeError: a parameter that is not a Tensor.
            ValueError: a parameter already in a group.
        """
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        for p in ps:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
        have = {id(p) for p in self.params}
        if any(id(p) in have for p in ps) or len({id(p) for p in ps}) < len(ps):
            raise ValueError("some parameters appear in more than one parameter group")
        group["params"] = ps
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = Tensor(backend_of(p.grad.data).zeros_like(p.grad.data))

    def step(self, closure: Callable | None = None) -> Any:
        """Update every parameter that has a gradient (the others are skipped, as in torch).

        Args:
            closure: re-evaluates the model and returns the loss (run first,
                with recording on).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.data
                self.update(p, -g if group.get("maximize") else g, group)
                p.version += 1  # an op recorded before the step no longer sees p's values
        return loss

    def update(self, p: Tensor, g, group: dict) -> None:
        """Rewrite ``p.data`` in place from the gradient ``g``."""
        raise TypeError(f"{type(self).__name__} defines no update rule")

    # -- state --------------------------------------------------------------------
    _INT_STATE = ("step",)  # per-parameter state kept as a Python int, not an array

    def state_dict(self) -> dict:
        """The optimizer's state as a flat dict of NumPy arrays: ``numpy.savez(path,
        **opt.state_dict())`` saves it, :meth:`load_state_dict` of the loaded file
        resumes bit for bit.

        Keys follow torch's layout, flattened: ``'param_groups.<g>.<name>'`` for
        each hyperparameter of group ``g`` (``'param_groups.<g>.params'``: the
        indices of its parameters, counted over all groups in order) and
        ``'state.<i>.<name>'`` for the state of parameter ``i``.
        """
        out, index = {}, {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                index[id(p)] = len(index)
            out[f"param_groups.{gi}.params"] = numpy.array(
                [index[id(p)] for p in group["params"]], dtype=numpy.int64)
            for k, v in group.items():
                if k != "params" and v is not None:  # None (torch's 'foreach') has no array
                    out[f"param_groups.{gi}.{k}"] = numpy.array(v)
        for p in self.params:
            for k, v in self.state.get(p, {}).items():
                host = backend_of(v).to_numpy(v) if hasattr(v, "shape") else v
                out[f"state.{index[id(p)]}.{k}"] = numpy.array(host)
        return out

    def load_state_dict(self, state: Any) -> None:
        """Restore a state saved by :meth:`state_dict`, all or nothing.

        Takes the flat dict (or the ``numpy.load`` of a file saved from it),
        or torch's nested ``{'state': ..., 'param_groups': ...}`` (torch tensors
        accepted). Group hyperparameters replace the current ones; state
        arrays land on each parameter's backend and dtype.

        Raises:
            ValueError: the groups or their sizes differ from this optimizer's,
                a state array's shape is not its parameter's, or a key is not
                understood; nothing changes.
        """
        flat = _flatten_torch(state) if _is_nested(state) else \
            {k: state[k] for k in (state.keys() if hasattr(state, "keys") else state.files)}
        params, bad = self.params, []
        groups: dict = {}
        states: dict = {}
        for key, v in flat.items():
            part, _, rest = key.partition(".")
            num, _, name = rest.partition(".")
            if part not in ("param_groups", "state") or not num.isdigit() or not name:
                bad.append(f"{key!r}: not a key of an optimizer state dict")
                continue
            (groups if part == "param_groups" else states).setdefault(int(num), {})[name] = v
        if sorted(groups) != list(range(len(self.param_groups))):
            bad.append(f"{len(groups)} parameter group(s) saved, this optimizer has "
                       f"{len(self.param_groups)}")
        for gi, saved in groups.items():
            if gi < len(self.param_groups):
                n = len(numpy.asarray(saved.get("params", [])))
                if n != len(self.param_groups[gi]["params"]):
                    bad.append(f"group {gi}: {n} parameter(s) saved, "
                               f"{len(self.param_groups[gi]['params'])} here")
        new_state = {}
        for i, saved in states.items():
            if i >= len(params):
                bad.append(f"state of parameter {i}: there are {len(params)} parameters")
                continue
            p, st = params[i], {}
            for name, v in saved.items():
                v = _host(v)
                if name in self._INT_STATE:
                    st[name] = int(numpy.asarray(v).reshape(()).item())
                elif tuple(numpy.shape(v)) != p.shape:
                    bad.append(f"state.{i}.{name}: shape {tuple(numpy.shape(v))}, the "
                               f"parameter's {p.shape}")
                else:
                    st[name] = to_backend(numpy.asarray(v), backend_of(p.data)).astype(
                        p.dtype, copy=True)
            new_state[p] = st
        if bad:
            raise ValueError("load_state_dict: nothing loaded:\n  " + "\n  ".join(bad))
        for gi, saved in groups.items():
            group = self.param_groups[gi]
            for name, v in saved.items():
                if name != "params":
                    group[name] = _python_value(_host(v))
        self.state = new_state


def _is_nested(state: Any) -> bool:
    return hasattr(state, "keys") and set(state.keys()) == {"state", "param_groups"}


def _host(v: Any) -> Any:
    """A saved value as NumPy (a torch tensor's values; a backend array copied)."""
    if isinstance(v, Tensor):
        return v.numpy()
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch's
        return v.detach().cpu().numpy()
    return backend_of(v).to_numpy(v) if hasattr(v, "shape") else v


def _python_value(v: Any) -> Any:
    """A saved hyperparameter back as Python: a number, a bool, or a tuple (betas)."""
    a = numpy.asarray(v)
    return a.item() if a.ndim == 0 else tuple(a.tolist())


def _flatten_torch(state: dict) -> dict:
    """torch's nested optimizer state dict in the flat layout of :meth:`Optimizer.state_dict`."""
    flat = {}
    for gi, group in enumerate(state["param_groups"]):
        for k, v in group.items():
            if v is not None:
                flat[f"param_groups.{gi}.{k}"] = v
    for i, st in state["state"].items():
        for k, v in st.items():
            flat[f"state.{i}.{k}"] = v
    return flat


def _check(name: str, value: float, low: float = 0.0, high: float = math.inf) -> None:
    if not low <= value < high:
        raise ValueError(f"Invalid {name} value: {value}")


class SGD(Optimizer):
    """Stochastic gradient descent as ``torch.optim.SGD``: L2 weight decay,
    momentum with dampening, Nesterov.

    ``d = g + wd * p``; with momentum, ``buf = d`` on the first step, then
    ``buf = momentum * buf + (1 - dampening) * d``, and ``d = buf`` (Nesterov:
    ``d + momentum * buf``); ``p -= lr * d``. The positional order is einsumgrad's
    contract, ``(params, lr, momentum, weight_decay)``; torch's ``dampening`` and
    ``nesterov`` (positional there) are keywords here.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, dampening: float = 0.0, nesterov: bool = False,
                 maximize: bool = False):
        _check("learning rate", lr)
        _check("momentum", momentum)
        _check("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize))

    def update(self, p: Tensor, g, group: dict) -> None:
        wd, momentum = group["weight_decay"], group["momentum"]
        d = g + wd * p.data if wd else g
        if momentum:
            st = self.state.setdefault(p, {})
            buf = st.get("momentum_buffer")
            if buf is None:
                # asarray: a 0-d parameter's decayed gradient is a NumPy scalar,
                # and `buf *=` below must update the stored buffer, not rebind.
                buf = st["momentum_buffer"] = backend_of(p.data).asarray(d).copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * d
            d = d + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * d


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam``: L2 weight
    decay added to the gradient, or decoupled (``p *= 1 - lr * wd`` first: AdamW);
    ``amsgrad`` keeps the largest second moment seen."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False):
        _check("learning rate", lr)
        _check("epsilon", eps)
        _check("beta parameter at index 0", betas[0], high=1.0)
        _check("beta parameter at index 1", betas[1], high=1.0)
        _check("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay))

    def update(self, p: Tensor, g, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st = self.state.get(p)
        if not st:
            xp = backend_of(p.data)
            st = self.state[p] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                  "exp_avg_sq": xp.zeros_like(p.data)}
            if group["amsgrad"]:
                st["max_exp_avg_sq"] = xp.zeros_like(p.data)
        st["step"] += 1
        t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
        kernel = backend_of(p.data).adam  # the same step in one pass, where a backend has one
        if not group["amsgrad"] and kernel is not None and kernel(
                p.data, g, m, v, lr=lr, betas=(b1, b2), eps=eps, step=t, weight_decay=wd,
                decoupled=group["decoupled_weight_decay"]):
            return
        if wd:
            if group["decoupled_weight_decay"]:
                p.data *= 1 - lr * wd
            else:
                g = g + wd * p.data
        m += (1 - b1) * (g - m)  # torch's lerp form
        v *= b2
        v += (1 - b2) * g * g
        step_size = lr / (1 - b1 ** t)
        if group["amsgrad"]:
            v = backend_of(v).maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
        denom = backend_of(v).sqrt(v) / (1 - b2 ** t) ** 0.5 + eps
        p.data -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as ``torch.optim.AdamW``:
    each step first shrinks ``p`` by ``1 - lr * weight_decay``; the default decay is 0.01."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True)
