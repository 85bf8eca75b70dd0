"""Images of different sizes in one batch (saep_kernels.configs.IMAGE_MIXES): the packed op
``fused_aggregate_varlen`` against the two ways to get the same result from the fixed-grid op.

Implementations (``<how>[<backend>]``):
* ``varlen[b]`` - ``fused_aggregate_varlen`` on the packed tokens: one launch per direction;
* ``loop[b]``   - one ``fused_aggregate`` call per image on its slice of the packed tokens,
  then ``torch.cat`` (``loop[eager]``: the same loop in plain PyTorch, cat + depthwise conv2d +
  pool per image, as a user would write it today);
* ``pad[b]``    - every image zero-padded to the largest grid (one ``index_copy`` per layer
  into a [n, Hmax*Wmax, C] batch), one fixed-grid call, the valid outputs gathered back (one
  ``index_select``). With even grids (as the native-resolution processors make them) the
  zero padding reproduces each image's own edges, so the result is the same.

All three give the same tokens in the same order; the benchmark checks that before timing.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

import saep_kernels
from saep_kernels import fused_aggregate, fused_aggregate_varlen
from saep_kernels.backends import fused_backend
from saep_kernels.configs import ImageMix

from .harness import (Row, device_name, peak_memory_mb, time_interleaved, time_with_copy,
                      triton_version)
from .op_bench import DTYPES, plain_aggregate


def packed_backends(device: torch.device) -> List[str]:
    """The fused backends on ``device`` whose kernels take packed grids (the Triton
    interpreter is for tests, not timed)."""
    names = [b for b in saep_kernels.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        names = [b for b in names if b != "triton"]
    return [b for b in names if fused_backend(b).takes_packed_grids]


def varlen_bytes(mix: ImageMix, dtype: torch.dtype) -> tuple:
    """(forward, backward) bytes the packed op must move, as op_bench.op_bytes."""
    e = torch.empty((), dtype=dtype).element_size()
    n_in = mix.layers * mix.tokens * mix.channels
    n_out = mix.out_tokens * mix.layers * mix.channels
    return (n_in + n_out) * e, (2 * n_in + n_out) * e


def _pad_indices(mix: ImageMix, device: torch.device):
    """(rows of the packed tokens in the padded [n * Hmax * Wmax] batch, rows of the valid
    outputs in the pooled [n * ceil(Hmax/2) * ceil(Wmax/2)] batch), and (Hmax, Wmax)."""
    hm = max(h for h, _ in mix.grids)
    wm = max(w for _, w in mix.grids)
    ho, wo = math.ceil(hm / 2), math.ceil(wm / 2)
    rows_in, rows_out = [], []
    for i, (h, w) in enumerate(mix.grids):
        rows_in += [(i * hm + r) * wm + c for r in range(h) for c in range(w)]
        rows_out += [(i * ho + r) * wo + c for r in range(math.ceil(h / 2))
                     for c in range(math.ceil(w / 2))]
    as_index = lambda v: torch.tensor(v, device=device, dtype=torch.long)  # noqa: E731
    return as_index(rows_in), as_index(rows_out), (hm, wm)


def varlen_functions(impls: List[str], mix: ImageMix, pool: str,
                     device: torch.device) -> Dict[str, Callable]:
    """name -> fn(layers [N, C] each, weight, bias) -> [M, K*C] for each implementation."""
    grids = list(mix.grids)
    splits = [h * w for h, w in grids]
    idx_in, idx_out, (hm, wm) = _pad_indices(mix, device)
    n, kc = len(grids), mix.layers * mix.channels

    def varlen(backend):
        return lambda xs, w, b: fused_aggregate_varlen(xs, w, b, grids=grids, pool=pool,
                                                       backend=backend)[0]

    def loop(backend):
        def run(xs, w, b):
            parts = [x.split(splits) for x in xs]
            outs = []
            for i, grid in enumerate(grids):
                layers = [p[i][None] for p in parts]
                if backend == "eager":
                    outs.append(plain_aggregate(layers, w, b, grid=grid, pool=pool)[0])
                else:
                    outs.append(fused_aggregate(layers, w, b, grid=grid, pool=pool,
                                                backend=backend)[0])
            return torch.cat(outs)
        return run

    def pad(backend):
        def run(xs, w, b):
            padded = [x.new_zeros(n * hm * wm, x.shape[-1]).index_copy(0, idx_in, x)
                      .view(n, hm * wm, -1) for x in xs]
            out = fused_aggregate(padded, w, b, grid=(hm, wm), pool=pool, backend=backend)
            return out.reshape(-1, kc).index_select(0, idx_out)
        return run

    make = {"varlen": varlen, "loop": loop, "pad": pad}
    fns = {}
    for impl in impls:
        how, backend = impl.rstrip("]").split("[")
        fns[impl] = make[how](backend)
    return fns


def default_impls(device: torch.device) -> List[str]:
    out = []
    for b in packed_backends(device):
        out += [f"varlen[{b}]", f"loop[{b}]", f"pad[{b}]"]
    return out + ["loop[eager]"]


def bench_varlen(mix: ImageMix, dtype_name: str, device: torch.device, pool: str = "avg",
                 backward: bool = True, rounds: int = 5,
                 min_run_time: float = 1.0, reps: int = 100, progress=None,
                 impls: Optional[List[str]] = None) -> List[Row]:
    """Rows for every implementation on one mix, timed interleaved (see harness), the device
    copy of the forward's bytes in the forward's rounds."""
    dtype = DTYPES[dtype_name]
    impls = impls or default_impls(device)
    torch.manual_seed(0)
    layers = [torch.randn(mix.tokens, mix.channels, device=device, dtype=dtype,
                          requires_grad=backward) for _ in range(mix.layers)]
    kc = mix.layers * mix.channels
    w = (torch.randn(kc, 1, 3, 3, device=device) / 3).to(dtype).requires_grad_(backward)
    b = torch.randn(kc, device=device, dtype=dtype, requires_grad=backward)
    gy = torch.randn(mix.out_tokens, kc, device=device, dtype=dtype)
    fns = varlen_functions(impls, mix, pool, device)

    with torch.no_grad():  # the same tokens in the same order, whatever the implementation
        outs = {impl: fn(layers, w, b) for impl, fn in fns.items()}
    first = outs[impls[0]]
    for impl, out in outs.items():
        torch.testing.assert_close(out.float(), first.float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda m, impl=impl: f"{impl} vs {impls[0]}: {m}")
    del outs, first

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(layers, w, b)
        return run

    def forward_backward(fn):
        return lambda: torch.autograd.grad(fn(layers, w, b), [*layers, w, b], gy)

    fwd_bytes, bwd_bytes = varlen_bytes(mix, dtype)
    fwd, copy_bps = time_with_copy({i: forward(f) for i, f in fns.items()}, fwd_bytes, device,
                                   rounds, reps, min_run_time, progress)
    fb = time_interleaved({i: forward_backward(f) for i, f in fns.items()}, device, rounds,
                          reps, min_run_time, progress) if backward else {}
    note = f"pool={pool}, k=3, {len(mix.grids)} images" + (
        f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    rows = []
    for impl, fn in fns.items():
        t = fwd[impl]
        row = Row(name=f"fused_aggregate_varlen:{impl}", kind="varlen", backend=impl,
                  config=mix.name, batch=len(mix.grids), dtype=dtype_name,
                  device=device_name(device), torch=torch.__version__, triton=triton_version(),
                  fwd_ms=t.median_ms, fwd_p20_ms=t.p20_ms, fwd_p80_ms=t.p80_ms,
                  in_tokens=mix.tokens, out_tokens=mix.out_tokens, note=note)
        row.gbps = fwd_bytes / (t.median_ms * 1e-3) / 1e9
        row.copy_gbps = copy_bps / 1e9
        row.bw_fraction = fwd_bytes / (t.median_ms * 1e-3) / copy_bps
        if backward:
            u = fb[impl]
            row.fwd_bwd_ms, row.fwd_bwd_p20_ms, row.fwd_bwd_p80_ms = u.median_ms, u.p20_ms, u.p80_ms
            row.peak_mem_mb = peak_memory_mb(forward_backward(fn), device)
        else:
            row.peak_mem_mb = peak_memory_mb(forward(fn), device)
        rows.append(row)
    return rows


def speedups(rows: List[Row]) -> List[str]:
    """Lines "how[b]: x.xx / y.yy of varlen[b]" (forward / forward+backward time ratios)."""
    lines = []
    by = {(r.config, r.dtype, r.backend): r for r in rows}
    for (config, dtype, impl), r in by.items():
        if impl.startswith("varlen["):
            continue
        backend = impl[impl.index("[") + 1:-1]
        ref = by.get((config, dtype, f"varlen[{backend}]")) or next(
            (v for k, v in by.items() if k[:2] == (config, dtype) and k[2].startswith("varlen[")),
            None)
        if ref is None:
            continue
        fb = (f" / {r.fwd_bwd_ms / ref.fwd_bwd_ms:.2f}x fwd+bwd" if r.fwd_bwd_ms and
              ref.fwd_bwd_ms else "")
        mem = (f", peak memory {r.peak_mem_mb / ref.peak_mem_mb:.2f}x" if r.peak_mem_mb and
               ref.peak_mem_mb else "")
        lines.append(f"{config} {dtype}: {impl} takes {r.fwd_ms / ref.fwd_ms:.2f}x fwd{fb} the "
                     f"time of {ref.backend}{mem}")
    return lines
