"""Microbenchmarks of the fused op: each implementation, forward and forward+backward (all
inputs trainable, and with a frozen vision tower: weight and bias gradients only).

Implementations:
* ``eager``   - what a user would write in plain PyTorch: cat + depthwise conv2d + residual +
  pool in the input dtype (``plain_aggregate``; PyTorch's CPU and CUDA convolutions and pools
  take fp16, bf16 and fp32);
* ``compile`` - the same under ``torch.compile`` (GPU: mode="max-autotune-no-cudagraphs";
  CPU: the default mode, since max-autotune only adds GEMM templates there; --compile-mode);
* ``reference`` / ``reference-compile`` - ``fused_aggregate_reference``, the op's executable
  spec, which computes in fp32 (fp64 for fp64) and converts back, eager and compiled
  (``reference-compile`` on request: --impls);
* ``triton``, ``cpu``, ``cuda`` - the fused backends of saep_kernels available on the device.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple

import torch

import saep_kernels
from saep_kernels import fused_aggregate, fused_aggregate_reference

from saep_kernels.configs import Config
from .harness import (Row, device_name, peak_memory_mb, time_interleaved, time_with_copy,
                      triton_version)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


BASELINES = ("eager", "compile", "reference", "reference-compile")


def available_impls(device: torch.device) -> List[str]:
    """The default implementations: the plain-PyTorch baselines, the reference, and each fused
    backend available on the device."""
    fused = [b for b in saep_kernels.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        fused = [b for b in fused if b != "triton"]  # the interpreter is for tests
    return ["eager", "compile", "reference"] + fused


def plain_aggregate(hidden_states, weight, bias=None, *, grid, num_prefix_tokens=0,
                    residual=True, pool="avg"):
    """The op as a user writes it in PyTorch, in the input dtype: concat the layers along
    channels, depthwise conv2d (+ residual), 2x2 pool with ceil mode, back to tokens."""
    h, w = grid
    x = torch.cat([t[:, num_prefix_tokens:] for t in hidden_states], dim=-1)
    b, _, kc = x.shape
    x = x.transpose(1, 2).reshape(b, kc, h, w)
    z = torch.nn.functional.conv2d(x, weight.to(x.dtype),
                                   None if bias is None else bias.to(x.dtype),
                                   padding=weight.shape[-1] // 2, groups=kc)
    if residual:
        z = z + x
    pool_fn = torch.nn.functional.avg_pool2d if pool == "avg" else torch.nn.functional.max_pool2d
    y = pool_fn(z, kernel_size=2, stride=2, ceil_mode=True)
    return y.flatten(2).transpose(1, 2).contiguous()


def op_bytes(cfg: Config, batch: int, dtype: torch.dtype, pool: str = "avg") -> Tuple[int, int]:
    """(forward, backward) bytes the op must move (docs/op.md section 4).

    forward: read K*B*H*W*C, write B*Ho*Wo*K*C. backward: read the inputs and grad_out, write
    the input grads (plus, for max, the saved argmax: one byte per output, written and read).
    """
    e = torch.empty((), dtype=dtype).element_size()
    n_in = cfg.layers * batch * cfg.height * cfg.width * cfg.channels
    n_out = batch * cfg.out_tokens * cfg.layers * cfg.channels
    argmax = n_out if pool == "max" else 0
    return (n_in + n_out) * e + argmax, (2 * n_in + n_out) * e + argmax


def make_inputs(cfg: Config, batch: int, dtype: torch.dtype, device: torch.device,
                requires_grad: bool):
    layers = [torch.randn(batch, cfg.tokens, cfg.channels, device=device, dtype=dtype,
                          requires_grad=requires_grad) for _ in range(cfg.layers)]
    kc = cfg.layers * cfg.channels
    w = (torch.randn(kc, 1, 3, 3, device=device) / 3).to(dtype).requires_grad_(requires_grad)
    b = torch.randn(kc, device=device, dtype=dtype, requires_grad=requires_grad)
    return layers, w, b


def default_compile_mode(device: torch.device) -> Optional[str]:
    """GPU: Inductor with autotuning, no CUDA graphs (a fair kernel-to-kernel comparison);
    CPU: the default mode (max-autotune only adds GEMM templates there)."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else None


def op_function(impl: str, cfg: Config, pool: str, device: torch.device,
                compile_mode: Optional[str] = "auto") -> Callable:
    kw = dict(grid=(cfg.height, cfg.width), num_prefix_tokens=cfg.prefix, pool=pool)
    if impl in BASELINES:
        base = plain_aggregate if impl in ("eager", "compile") else fused_aggregate_reference
        fn = functools.partial(base, **kw)
        if impl.endswith("compile"):
            mode = default_compile_mode(device) if compile_mode == "auto" else compile_mode
            fn = torch.compile(fn, mode=mode)
        return fn
    return functools.partial(fused_aggregate, backend=impl, **kw)


def bench_problem(impls: List[str], cfg: Config, batch: int, dtype_name: str,
                  device: torch.device, pool: str = "avg",
                  backward: bool = True, rounds: int = 5, min_run_time: float = 1.0,
                  reps: int = 100, progress=None, compile_mode: Optional[str] = "auto") -> List[Row]:
    """Rows for every implementation on one problem, timed interleaved (see harness), the
    device copy of the forward's bytes in the forward's rounds."""
    dtype = DTYPES[dtype_name]
    images = batch * cfg.crops
    layers, w, b = make_inputs(cfg, images, dtype, device, requires_grad=backward)
    fwd_bytes, bwd_bytes = op_bytes(cfg, images, dtype, pool)
    gy = torch.randn(images, cfg.out_tokens, cfg.layers * cfg.channels, device=device,
                     dtype=dtype)
    inputs = [*layers, w, b]
    fns = {impl: op_function(impl, cfg, pool, device, compile_mode) for impl in impls}

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(layers, w, b)
        return run

    def forward_backward(fn, xs=layers, wrt=inputs):
        return lambda: torch.autograd.grad(fn(xs, w, b), wrt, gy)

    # a frozen vision tower: gradients of the weight and bias only, timed in the same rounds
    frozen = [h.detach() for h in layers]
    fwd, copy_bps = time_with_copy({i: forward(f) for i, f in fns.items()}, fwd_bytes, device,
                                   rounds, reps, min_run_time, progress)
    fb = {}
    if backward:
        fb = time_interleaved(
            {**{i: forward_backward(f) for i, f in fns.items()},
             **{f"{i} frozen": forward_backward(f, frozen, [w, b]) for i, f in fns.items()}},
            device, rounds, reps, min_run_time, progress)
    note = f"pool={pool}, k=3" + (f", {torch.get_num_threads()} threads"
                                  if device.type == "cpu" else "")
    rows = []
    for impl, fn in fns.items():
        t = fwd[impl]
        row = Row(name=f"fused_aggregate[{impl}]", kind="op", backend=impl, config=cfg.name,
                  batch=batch, dtype=dtype_name, device=device_name(device),
                  torch=torch.__version__, triton=triton_version(),
                  fwd_ms=t.median_ms, fwd_p20_ms=t.p20_ms, fwd_p80_ms=t.p80_ms,
                  out_tokens=cfg.out_tokens, params=w.numel() + b.numel(), note=note)
        row.gbps = fwd_bytes / (t.median_ms * 1e-3) / 1e9
        row.copy_gbps = copy_bps / 1e9
        row.bw_fraction = fwd_bytes / (t.median_ms * 1e-3) / copy_bps
        if backward:
            u = fb[impl]
            row.fwd_bwd_ms, row.fwd_bwd_p20_ms, row.fwd_bwd_p80_ms = u.median_ms, u.p20_ms, u.p80_ms
            row.frozen_fwd_bwd_ms = fb[f"{impl} frozen"].median_ms
            total = fwd_bytes + bwd_bytes
            row.fwd_bwd_gbps = total / (u.median_ms * 1e-3) / 1e9
            row.fwd_bwd_bw_fraction = total / (u.median_ms * 1e-3) / copy_bps
            row.peak_mem_mb = peak_memory_mb(forward_backward(fn), device)
        else:
            row.peak_mem_mb = peak_memory_mb(forward(fn), device)
        rows.append(row)
    return rows
