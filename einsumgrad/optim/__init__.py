"""Optimizers and learning-rate schedules with ``torch.optim``'s names and semantics.

>>> from einsumgrad import optim
>>> opt = optim.AdamW(model.parameters(), lr=1e-3)                  # doctest: +SKIP
>>> sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)    # doctest: +SKIP

Every optimizer takes parameter groups (``[{'params': ..., 'lr': ...}, ...]``)
and saves its state as a flat dict of NumPy arrays (``numpy.savez`` takes it).
"""
from . import lr_scheduler
from .optimizer import SGD, Adam, AdamW, Optimizer

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler"]
