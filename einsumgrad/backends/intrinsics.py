"""LLVM operations numba has no spelling for, and the scalar helpers the compiled
kernels inline.

Imported only by code that compiles kernels (it imports numba): the pooling
and other row kernels (:mod:`.kernels`) and the fused chains' generated
modules (``einsumgrad.program.vecmath``'s prelude imports them by name).
"""
from __future__ import annotations

import numba
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


def _gemm(bits: int):
    """The typing of a CBLAS ``?gemm`` call whose integers are ``bits`` wide (32:
    MKL's and most CBLAS; 64: an ILP64 build, as NumPy's own OpenBLAS)."""
    def typing(typingctx, address, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc):
        real = beta
        if real not in (types.float32, types.float64):
            return None
        ints = (trans_a, trans_b, m, n, k, lda, ldb, ldc)
        if not all(isinstance(t, types.Integer) for t in (address, a, b, c) + ints):
            return None
        sig = types.void(address, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc)

        def codegen(context, builder, sig, args):
            from llvmlite import ir
            # sizes and leading dimensions ``bits`` wide (ni); the enums stay C ints
            i32, ni, fl = ir.IntType(32), ir.IntType(bits), context.get_value_type(real)
            ptr = fl.as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, ni, ni, ni, fl, ptr, ni, ptr,
                                                   ni, fl, ptr, ni])
            (addr, ta, tb, vm, vn, vk, va, vlda, vb, vldb, vbeta, vc, vldc) = args
            tys = sig.args
            as_int = {32: types.int32, 64: types.int64}[bits]
            enum = lambda v, t: context.cast(builder, v, t, types.int32)  # noqa: E731
            size = lambda v, t: context.cast(builder, v, t, as_int)  # noqa: E731
            fn = builder.inttoptr(addr, fnty.as_pointer())
            builder.call(fn, [ir.Constant(i32, 101), enum(ta, tys[1]), enum(tb, tys[2]),
                              size(vm, tys[3]), size(vn, tys[4]), size(vk, tys[5]),
                              ir.Constant(fl, 1.0), builder.inttoptr(va, ptr), size(vlda, tys[7]),
                              builder.inttoptr(vb, ptr), size(vldb, tys[9]), vbeta,
                              builder.inttoptr(vc, ptr), size(vldc, tys[12])])
            return context.get_dummy_value()
        return sig, codegen
    typing.__name__ = typing.__qualname__ = "gemm" if bits == 32 else f"gemm{bits}"
    return typing


gemm = intrinsic(_gemm(32))
gemm.__doc__ = """``c = op(a) @ op(b) + beta * c``, row-major, by the CBLAS ``?gemm`` at
``address`` (``cblas_sgemm`` where ``beta`` is a float32, ``cblas_dgemm``
for a float64); ``a``, ``b`` and ``c`` are the matrices' addresses, the
transposes CBLAS's codes. A call through an address a kernel takes as an
argument, not a ctypes function in its globals: numba caches such a kernel
on disk."""
gemm64 = intrinsic(_gemm(64))
gemm64.__doc__ = "``gemm`` for a CBLAS built with 64-bit integers (ILP64)."


@intrinsic
def call_int(typingctx, address, value):
    """``f(value)`` for the C function ``int f(int)`` at ``address`` (MKL's
    ``MKL_Set_Num_Threads_Local``, per thread of a kernel's team)."""
    if not (isinstance(address, types.Integer) and isinstance(value, types.Integer)):
        return None
    sig = types.int32(address, value)

    def codegen(context, builder, sig, args):
        from llvmlite import ir
        i32 = ir.IntType(32)
        fn = builder.inttoptr(args[0], ir.FunctionType(i32, [i32]).as_pointer())
        return builder.call(fn, [context.cast(builder, args[1], sig.args[1], types.int32)])
    return sig, codegen


# The scalar helpers live here, not beside the kernels that inline them: numba
# keys a kernel's disk cache on its closure, pickled, and a jitted function in
# a closure pickles differently in each process (see kernels._build). It keys
# them on kernels.py's own timestamp too, not on this file's: a change here
# reaches their cache once kernels.py changes (the fused chains' sources carry
# this file's digest, see einsumgrad.program.vecmath).
@numba.njit(inline="always", error_model="numpy")
def clipped(v, tail):
    """``v`` clipped to ``[-tail, tail]``."""
    return -tail if v < -tail else tail if v > tail else v


@numba.njit(inline="always", error_model="numpy")
def relu_grad(g, y):
    """ReLU's rule on its output ``y``: ``g`` where ``y > 0``, 0 where ``y`` is 0,
    NaN at NaN."""
    return g if y > 0 else g * 0 if y == 0 else g * y
