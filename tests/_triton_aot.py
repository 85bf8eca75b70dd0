"""Compile the Triton kernels for a GPU target without a GPU (Triton's own ahead-of-time path).

``triton.compile`` lowers a kernel to PTX and runs ptxas for ``GPUTarget("cuda", arch, 32)``
on any machine, so CI without a GPU still proves the kernels build for sm_80 and sm_90 and
lets tests read the PTX (vectorised loads, no local-memory spills).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
           torch.float64: "fp64", torch.uint8: "u8"}


def _unwrap(jit_fn):
    # In the interpreter a kernel is an InterpretedFunction; the AOT path needs a JITFunction.
    fn = getattr(jit_fn, "fn", jit_fn)
    return fn if isinstance(fn, triton.runtime.jit.JITFunction) else triton.jit(fn)


def _spec(value, path, constexprs, attrs):
    """Type string of a runtime argument; ints equal to 1 become constants, pointers and ints
    divisible by 16 carry the divisibility hint, as Triton's launcher would specialise them."""
    if isinstance(value, tuple):
        return tuple(_spec(v, path + (i,), constexprs, attrs) for i, v in enumerate(value))
    if isinstance(value, torch.Tensor):
        attrs[path] = [["tt.divisibility", 16]]
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if value == 1:
            constexprs[path] = 1
            return "constexpr"
        if value % 16 == 0:
            attrs[path] = [["tt.divisibility", 16]]
        return "i64" if abs(value) >= 2**31 else "i32"
    raise TypeError(f"unsupported argument {value!r}")


def compile_kernel(jit_fn, args, consts, arch: int, num_warps: int = 4):
    """Compile ``jit_fn`` for sm_<arch> given sample runtime ``args`` (positional, in signature
    order) and the constexpr values ``consts`` (by name). Returns the compiled kernel."""
    fn = _unwrap(jit_fn)
    names = list(inspect.signature(fn.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    runtime = iter(args)
    for i, name in enumerate(names):
        if name in consts:
            value = consts[name]
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[name] = _spec(next(runtime), (i,), constexprs, attrs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
