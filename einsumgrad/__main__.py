"""``python -m einsumgrad explain SPEC [--shapes 2x3 3x4]``."""
from __future__ import annotations

import argparse
import sys

from . import EinsumError, explain


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
        shapes = [tuple(int(n) for n in s.split("x")) if s else () for s in args.shapes]
        print(explain(args.spec, *shapes))
    except (EinsumError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` closed the pipe: not an error
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
