"""Programs: trace a function once, read it, run it fast.

``eg.make_program(f)(*args)`` runs ``f`` once (any composition of transforms)
and records every step into a :class:`Program`: inputs, a straight list of
equations, outputs. ``str(program)`` prints one equation per line (einsums as
their specs in letters, with shapes and dtypes); ``program.source()`` is
standalone Python over NumPy and opt_einsum; ``program(*args)`` runs it with
no Tensor and no tape; a program pickles. ``eg.jit(f)`` traces on the first
call per signature and replays after that. A branch on a traced value
raises :class:`TraceError` naming the line.

What a program holds fixed, as JAX's jit does: arrays ``f`` closes over or
makes without its inputs (weights in a closure, a dropout mask drawn while
tracing) are constants, their values at the trace; Python numbers and other
non-array leaves among the arguments are static (a new value traces again).
Pass what changes between calls (weights being trained) as arguments.

* :mod:`.trace`: the Traced stand-ins and the recorder;
* :mod:`.core`: :class:`Program`: signature, running, pickling;
* :mod:`.compile`: a program as one generated Python function;
* :mod:`.render`, :mod:`.emit`: the program as text, and as NumPy source;
* :mod:`.passes`: exact rewrites (dead code, common subexpressions, constants,
  einsum chains, fused element-wise chains);
* :mod:`.jit`: ``make_program`` and ``jit``.
"""
from .core import Program
from .jit import jit, make_program
from .trace import TraceError

__all__ = ["Program", "TraceError", "jit", "make_program"]
