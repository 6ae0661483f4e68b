"""Learning-rate schedules with ``torch.optim.lr_scheduler``'s semantics.

A scheduler sets each group's ``lr`` when built (its ``initial_lr``, epoch 0)
and at every :meth:`LRScheduler.step` after that (call it after
``optimizer.step()``, once per epoch or per batch as the schedule is meant).
The rates follow torch's recursive (chainable) formulas, so they equal
torch's to the last bit, not only its closed forms.
"""
from __future__ import annotations

import abc
import math
from typing import Any

import numpy

from .optimizer import Optimizer

__all__ = ["LRScheduler", "StepLR", "CosineAnnealingLR"]


class LRScheduler(abc.ABC):
    """Base class: ``base_lrs``, ``last_epoch``, ``step()``, ``get_last_lr()``, state dicts.

    Args:
        optimizer: whose groups' ``lr`` this sets.
        last_epoch: -1 to start; a later epoch resumes, and then every group
            needs its ``initial_lr`` (from an optimizer state dict).
    """

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                               f"when resuming a scheduler at last_epoch {last_epoch}")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._step_count = 0
        self._is_initial = True  # the first step keeps the rates (torch 2.x's _initial_mode)
        try:
            self.step()  # epoch 0 (or the resumed epoch + 1), as torch's
        finally:
            self._is_initial = False

    @abc.abstractmethod
    def get_lr(self) -> list:
        """Each group's rate at ``last_epoch``, from its current rate (each schedule's own)."""

    def step(self) -> None:
        """Advance one epoch and set each group's ``lr``."""
        self._step_count += 1
        self.last_epoch += 1
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list:
        """The rates the last :meth:`step` set."""
        return self._last_lr

    def state_dict(self) -> dict:
        """Everything but the optimizer, as NumPy arrays: ``numpy.savez`` takes it."""
        return {k: numpy.array(v) for k, v in self.__dict__.items()
                if k != "optimizer" and v is not None}

    def load_state_dict(self, state: Any) -> None:
        """Restore what :meth:`state_dict` gave (or its ``numpy.load``), each value
        back in the type it has here (lists of rates, int epochs, float settings)."""
        for k in (state.keys() if hasattr(state, "keys") else state.files):
            v = numpy.asarray(state[k])
            have = self.__dict__.get(k)
            if isinstance(have, list):
                v = v.tolist()
            elif isinstance(have, bool):
                v = bool(v)
            elif isinstance(have, int):
                v = int(v)
            elif isinstance(have, float):
                v = float(v)
            elif v.ndim == 0:
                v = v.item()
            self.__dict__[k] = v


class StepLR(LRScheduler):
    """Multiply every rate by ``gamma`` each ``step_size`` epochs."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        groups = self.optimizer.param_groups
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return [g["lr"] for g in groups]
        return [g["lr"] * self.gamma for g in groups]


class CosineAnnealingLR(LRScheduler):
    """Anneal each rate from its base to ``eta_min`` along half a cosine over
    ``T_max`` epochs (then back up, and so on, as torch's):
    ``eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2``, computed as torch
    does from the previous epoch's rate."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        groups, t, T, lo = self.optimizer.param_groups, self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return [g["lr"] for g in groups]
        if self._step_count == 1 and t > 0:  # resumed: the closed form
            return [lo + (base - lo) * (1 + math.cos(t * math.pi / T)) / 2
                    for base in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:
            return [g["lr"] + (base - lo) * (1 - math.cos(math.pi / T)) / 2
                    for base, g in zip(self.base_lrs, groups)]
        return [(1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T))
                * (g["lr"] - lo) + lo for g in groups]
