"""``python -m einsumgrad explain SPEC [--shapes 2x3 3x4]``."""
from __future__ import annotations

import argparse
import sys

from . import EinsumError, explain


def parse_shape(text: str, k: int) -> tuple:
    """``'2x3'`` as ``(2, 3)`` ('' is a scalar's shape).

    Raises:
        EinsumError: a size that is not a whole number or is negative, naming
            operand ``k`` and the axis.
    """
    if not text.strip():
        return ()
    shape = []
    for ax, n in enumerate(text.split("x")):
        try:
            shape.append(int(n))
        except ValueError:
            raise EinsumError(f"operand {k}, axis {ax}: size {n!r} in shape {text!r} is not an "
                              f"integer (write shapes as 2x3)") from None
        if shape[-1] < 0:
            raise EinsumError(f"operand {k}, axis {ax}: size {shape[-1]} in shape {text!r} "
                              f"is negative")
    return tuple(shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m einsumgrad",
                                 description="Read the derivatives einsumgrad derives.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("explain", help="patterns, path and cost of one einsum")
    ex.add_argument("spec", help="an einsum spec, e.g. 'ij,jk->ik'")
    ex.add_argument("--shapes", nargs="*", default=[],
                    help="operand shapes, e.g. 2x3 3x4 (a scalar is '')")
    args = ap.parse_args(argv)
    try:
        shapes = [parse_shape(s, k) for k, s in enumerate(args.shapes)]
        print(explain(args.spec, *shapes))
    except (EinsumError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
