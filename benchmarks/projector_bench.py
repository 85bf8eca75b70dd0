"""Whole projectors side by side: SAEP (eager, compiled, each fused backend) and the
baselines of projectors.py, on the same vision features, device and dtype; forward and
forward+backward (parameter gradients: the vision tower is frozen, as in LLaVA training),
peak memory, parameters, output tokens; and how their cost grows with the number of tokens."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from . import projectors as P
from saep_kernels.configs import Config
from .harness import Row, device_name, peak_memory_mb, time_interleaved, triton_version
from .op_bench import DTYPES, default_compile_mode


def _inputs(cfg: Config, height: int, width: int, batch: int, dtype, device, requires_grad=False):
    tokens = cfg.prefix + height * width
    layers = [torch.randn(batch, tokens, cfg.channels, device=device, dtype=dtype)
              for _ in range(cfg.layers)]
    patches = layers[-1][:, cfg.prefix:]  # one layer, CLS dropped (LLaVA's "patch" feature)
    return layers, patches


def _callables(name: str, module: torch.nn.Module, cfg: Config, height: int, width: int,
               layers, patches, dtype, device):
    """(forward, forward+backward) closures of one projector."""
    grid = (height, width)
    if name.startswith("saep"):
        def call():
            return module(layers, grid=grid, num_prefix_tokens=cfg.prefix)
    else:
        def call():
            return module(patches, grid=grid)
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        out_shape = call().shape
    gy = torch.randn(out_shape, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            return call()

    def forward_backward():
        return torch.autograd.grad(call(), params, gy)

    return forward, forward_backward, out_shape[1]


def build_projector(name: str, cfg: Config, height: int, width: int, dtype, device,
                    compile_mode: Optional[str] = "auto"):
    module = P.build(name, cfg.channels, cfg.llm_dim, height, width, cfg.layers)
    module = module.to(device=device, dtype=dtype)
    if name == "saep-compile":
        mode = default_compile_mode(device) if compile_mode == "auto" else compile_mode
        module = torch.compile(module, mode=mode)
    return module


def bench_projectors(names: List[str], cfg: Config, batch: int, dtype_name: str,
                     device: torch.device, rounds: int, min_run_time: float, reps: int,
                     llm_ms: Optional[Dict[int, float]] = None, backward: bool = True,
                     progress: Optional[Callable[[str], None]] = None,
                     compile_mode: Optional[str] = "auto") -> List[Row]:
    dtype = DTYPES[dtype_name]
    images = batch * cfg.crops
    layers, patches = _inputs(cfg, cfg.height, cfg.width, images, dtype, device)
    runnable, skipped = {}, {}
    for name in names:
        why = P.supports(name, cfg.height, cfg.width)
        if why:
            skipped[name] = why
            continue
        if progress:
            progress(f"build {name}")
        module = build_projector(name, cfg, cfg.height, cfg.width, dtype, device, compile_mode)
        fwd, fb, out_tokens = _callables(name, module, cfg, cfg.height, cfg.width, layers,
                                         patches, dtype, device)
        runnable[name] = (module, fwd, fb, out_tokens)
    t_fwd = time_interleaved({n: r[1] for n, r in runnable.items()}, device, rounds, reps,
                             min_run_time, progress)
    t_fb = (time_interleaved({n: r[2] for n, r in runnable.items()}, device, rounds, reps,
                             min_run_time, progress) if backward else {})
    rows = []
    for name in names:
        row = Row(name=name, kind="projector", backend=name.split("-", 1)[1]
                  if name.startswith("saep") else "eager", config=cfg.name, batch=batch,
                  dtype=dtype_name, device=device_name(device), torch=torch.__version__,
                  triton=triton_version(), in_tokens=cfg.height * cfg.width)
        if name in skipped:
            row.note = f"not run: {skipped[name]} ({cfg.height}x{cfg.width})"
            rows.append(row)
            continue
        module, fwd, fb, out_tokens = runnable[name]
        row.params = P.trainable_params(module)
        row.out_tokens = out_tokens
        t = t_fwd[name]
        row.fwd_ms, row.fwd_p20_ms, row.fwd_p80_ms = t.median_ms, t.p20_ms, t.p80_ms
        if backward:
            u = t_fb[name]
            row.fwd_bwd_ms, row.fwd_bwd_p20_ms, row.fwd_bwd_p80_ms = u.median_ms, u.p20_ms, u.p80_ms
            row.peak_mem_mb = peak_memory_mb(fb, device)
        else:
            row.peak_mem_mb = peak_memory_mb(fwd, device)
        if llm_ms is not None and out_tokens in llm_ms:
            row.llm_ms = llm_ms[out_tokens]
        rows.append(row)
    return rows


def bench_sweep(names: List[str], cfg: Config, grids: List[int], batch: int, dtype_name: str,
                device: torch.device, min_run_time: float, reps: int,
                progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Forward latency of each projector on square grids of growing size (kind "sweep")."""
    dtype = DTYPES[dtype_name]
    rows = []
    for side in grids:
        layers, patches = _inputs(cfg, side, side, batch, dtype, device)
        fns, outs, params = {}, {}, {}
        for name in names:
            if P.supports(name, side, side):
                continue
            module = build_projector(name, cfg, side, side, dtype, device)
            fwd, _, out_tokens = _callables(name, module, cfg, side, side, layers, patches,
                                            dtype, device)
            fns[name], outs[name], params[name] = fwd, out_tokens, P.trainable_params(module)
        times = time_interleaved(fns, device, 1, reps, min_run_time,
                                 (lambda m, s=side: progress(f"{s}x{s}: {m}")) if progress else None)
        for name, t in times.items():
            rows.append(Row(name=name, kind="sweep", backend=name, config=f"{cfg.name}@{side}x{side}",
                            batch=batch, dtype=dtype_name, device=device_name(device),
                            torch=torch.__version__, triton=triton_version(),
                            fwd_ms=t.median_ms, fwd_p20_ms=t.p20_ms, fwd_p80_ms=t.p80_ms,
                            params=params[name], out_tokens=outs[name], in_tokens=side * side))
    return rows
