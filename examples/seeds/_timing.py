"""A tiny timer shared by the seed scripts (best of a few runs, in ms)."""
import time


def best_ms(fn, repeat: int = 3) -> float:
    """Best wall time of ``fn()`` over ``repeat`` runs, in milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def torch_or_none():
    """PyTorch when installed (the scripts then check against the user's code)."""
    try:
        import torch
        return torch
    except ImportError:
        print("(torch not installed: the comparison with the user's code is skipped)")
        return None
