"""Compile the Triton kernels for a GPU target without a GPU (Triton's ahead-of-time path).

``triton.compile`` lowers a kernel to PTX and runs ptxas for ``GPUTarget("cuda", arch, 32)``
on any machine, so CI without a GPU still proves the kernels build for sm_80 and sm_90 and can
read the PTX. Run as a script (the interpreter must be off, as it is on a GPU machine):

    python tests/_triton_aot.py   ->  JSON {config name: {"ptx_stats"...} or {"error": ...}}
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from saep_kernels.configs import REFERENCE_CONFIGS

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
           torch.float64: "fp64", torch.uint8: "u8"}


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
    order) and the constexpr values ``consts`` (by name)."""
    names = list(inspect.signature(jit_fn.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    runtime = iter(args)
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        else:
            signature[name] = _spec(next(runtime), (i,), constexprs, attrs)
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


# llava15-7b (docs/op.md section 3), batch 32
CFG = REFERENCE_CONFIGS["llava15-7b"]
B = 32

CONFIGS = {
    "sm90-fwd-bf16-avg": (90, "fwd", torch.bfloat16, "avg"),
    "sm90-fwd-bf16-max": (90, "fwd", torch.bfloat16, "max"),
    "sm90-bwd-bf16-avg": (90, "bwd", torch.bfloat16, "avg"),
    "sm90-bwd-bf16-max": (90, "bwd", torch.bfloat16, "max"),
    "sm80-fwd-fp16-avg": (80, "fwd", torch.float16, "avg"),
    "sm80-bwd-fp32-max": (80, "bwd", torch.float32, "max"),
}


def _launch(direction, dtype, pool, ksize=3):
    from saep_kernels.spec import AggregateSpec
    from saep_kernels.triton_kernels import fused_aggregate_bwd as bwd
    from saep_kernels.triton_kernels import fused_aggregate_fwd as fwd
    from saep_kernels.triton_kernels.shared import launch_config

    spec = AggregateSpec(CFG.height, CFG.width, CFG.prefix, True, pool, B, CFG.tokens,
                         CFG.channels, CFG.layers, ksize)
    kc = spec.out_channels
    cfg = launch_config(spec.out_tokens, spec.channels, interpret=False)
    xs = [torch.empty(B, spec.tokens, spec.channels, dtype=dtype) for _ in range(CFG.layers)]
    w = torch.empty(spec.taps, kc)  # tap-major, compute dtype
    out = torch.empty(spec.out_shape, dtype=dtype)
    am = torch.empty(spec.out_shape, dtype=torch.uint8) if pool == "max" else None
    if direction == "fwd":
        _, args, consts = fwd.fwd_launch(spec, xs, w, torch.empty(kc), out, am, cfg)
        return fwd.fused_aggregate_fwd_kernel, args, consts, cfg
    rows = bwd.partial_rows(spec, cfg)
    gxs = [torch.empty_like(x) for x in xs]
    gw = torch.empty(rows, spec.taps, kc)
    gb = torch.empty(rows, kc)
    _, args, consts = bwd.bwd_launch(spec, out, xs, w, am, gxs, gw, gb, cfg)
    return bwd.fused_aggregate_bwd_kernel, args, consts, cfg


def autotune_configs():
    """Compile every forward autotune config (bf16, sm_90): name -> stats or error."""
    from saep_kernels.triton_kernels.fused_aggregate_fwd import FWD_AUTOTUNE_CONFIGS

    results = {}
    kernel, args, consts, _ = _launch("fwd", torch.bfloat16, "avg")
    for cfg in FWD_AUTOTUNE_CONFIGS:
        name = "autotune-" + "-".join(f"{k}{v}" for k, v in cfg.kwargs.items()) + \
            f"-w{cfg.num_warps}"
        try:
            c = dict(consts, **cfg.kwargs)
            ptx = compile_kernel(kernel, args, c, 90, cfg.num_warps).asm["ptx"]
            results[name] = {"ld_global_v4": ptx.count("ld.global.v4"), "local": ptx.count(".local")}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    return results


def main(names):
    results = {}
    for name in names:
        arch, direction, dtype, pool = CONFIGS[name]
        try:
            kernel, args, consts, cfg = _launch(direction, dtype, pool)
            ptx = compile_kernel(kernel, args, consts, arch, cfg.num_warps).asm["ptx"]
            results[name] = {
                "ld_global_v4": ptx.count("ld.global.v4"),
                "st_global_v": ptx.count("st.global.v"),
                "local": ptx.count(".local"),
            }
        except Exception:  # reported to the test, which fails with the traceback
            results[name] = {"error": traceback.format_exc()}
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET unset: the AOT path compiles real kernels")
    out = main(sys.argv[1:] or list(CONFIGS))
    out.update(autotune_configs())
    print(json.dumps(out))
