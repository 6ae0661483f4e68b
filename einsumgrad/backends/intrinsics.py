"""Two LLVM operations numba has no spelling for, for the compiled kernels.

Imported only by code that compiles kernels (it imports numba): the pooling
and other row kernels (:mod:`.kernels`) and the fused chains' generated
modules (``einsumgrad.program.vecmath``'s prelude imports them by name).
"""
from __future__ import annotations

from numba import types
from numba.extending import intrinsic


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once: one instruction, which LLVM vectorizes."""
    sig = types.float64(types.float64, types.float64, types.float64)
    return sig, lambda context, builder, sig, args: builder.fma(*args)


@intrinsic
def wide(typingctx):
    """Called first in a kernel: LLVM may use 512-bit vectors in it.

    LLVM's tuning for AVX-512 server chips prefers 256-bit vectors, and loops
    over short rows (16 float32 channels, a pooling window's) then run their
    remainder in scalar code; 512 bits run them as one vector. A no-op where
    there are none.
    """
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen
