"""GPU checks outside pytest, for tools that wrap a whole process:

    compute-sanitizer --tool memcheck python scripts/gpu_check.py --small
    compute-sanitizer --tool racecheck python scripts/gpu_check.py --small
    ncu --set full -k regex:fused_aggregate -c 8 -o prof python scripts/gpu_check.py --profile

Runs forward and backward (avg and max, every dtype, odd and even grids, prefix tokens) of
every GPU backend and compares with the reference; --profile runs llava15-7b, batch 32, bf16
once per backend instead. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch

import saep_kernels
from saep_kernels import fused_aggregate, fused_aggregate_reference
from saep_kernels.configs import REFERENCE_CONFIGS
from saep_kernels.testing import assert_forward_close, assert_grad_close


def run(backend, batch, height, width, channels, layers, prefix, ksize, pool, dtype, check):
    torch.manual_seed(0)
    xs = [torch.randn(batch, prefix + height * width, channels, device="cuda", dtype=dtype,
                      requires_grad=True) for _ in range(layers)]
    w = (torch.randn(layers * channels, 1, ksize, ksize, device="cuda") / ksize).to(dtype)
    w.requires_grad_()
    b = torch.randn(layers * channels, device="cuda", dtype=dtype, requires_grad=True)
    kw = dict(grid=(height, width), num_prefix_tokens=prefix, pool=pool)
    out = fused_aggregate(xs, w, b, backend=backend, **kw)
    gy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*xs, w, b], gy)
    torch.cuda.synchronize()
    if not check:
        return True
    ref = fused_aggregate_reference(xs, w, b, **kw)
    want = torch.autograd.grad(ref, [*xs, w, b], gy)
    try:
        assert_forward_close(out, ref)
        for i, (g, r) in enumerate(zip(grads, want)):
            assert_grad_close(g, r, f"input {i}", reduction=i >= layers)
    except AssertionError as exc:
        print(f"mismatch: {backend} {dtype} {pool} k={ksize}: {exc}"[:2000], file=sys.stderr)
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="many small shapes (sanitizers)")
    p.add_argument("--profile", action="store_true", help="llava15-7b, B=32, bf16, once")
    args = p.parse_args(argv)
    backends = [b for b in saep_kernels.available_backends("cuda") if b != "reference"]
    print("GPU backends:", backends, "on", torch.cuda.get_device_name())
    failed = []
    if args.profile:
        cfg = REFERENCE_CONFIGS["llava15-7b"]
        for backend in backends:
            run(backend, 32, cfg.height, cfg.width, cfg.channels, cfg.layers, cfg.prefix, 3,
                "avg", torch.bfloat16, check=False)
        return 0
    shapes = [(2, 5, 7, 64, 2, 1), (1, 4, 4, 24, 1, 0), (3, 27, 27, 40, 2, 0), (2, 24, 24, 128, 4, 1)]
    for backend in backends:
        for (batch, h, w, c, k_layers, prefix) in shapes:
            for ksize in (1, 3, 7):
                for pool in ("avg", "max"):
                    for dtype in (torch.float32, torch.bfloat16, torch.float16):
                        ok = run(backend, batch, h, w, c, k_layers, prefix, ksize, pool, dtype,
                                 check=True)
                        if not ok:
                            failed.append((backend, batch, h, w, c, k_layers, prefix, ksize, pool,
                                           str(dtype)))
    print(f"{len(failed)} mismatches", *failed, sep="\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
