"""Exact rewrites of a program (filled in below)."""
from __future__ import annotations


def optimize(p) -> None:
    """Rewrite ``p`` in place."""
