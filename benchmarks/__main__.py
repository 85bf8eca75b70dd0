"""The main job: benchmark the fused op on the present device, print a table, write results.

    python -m benchmarks                      # default for the device (a few minutes)
    python -m benchmarks --quick              # tiny smoke run
    python -m benchmarks --configs llava15-7b siglip-so400m --batch 1 8 32 --dtypes bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .configs import CONFIGS, Config
from .harness import copy_bandwidth, format_table, metadata, write_results
from .op_bench import DTYPES, available_impls, bench_problem, op_bytes
from .plots import plot_bandwidth_fraction, plot_op_latency

TABLE = ["backend", "config", "batch", "dtype", "fwd_ms", "fwd_bwd_ms", "gbps", "bw_fraction",
         "fwd_bwd_bw_fraction", "peak_mem_mb"]


def defaults(device: torch.device):
    if device.type == "cuda":
        return dict(configs=list(CONFIGS), batch=[1, 8, 32], dtypes=["bf16"])
    return dict(configs=["llava15-7b"], batch=[8], dtypes=["bf16", "fp32"])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="reference configurations")
    p.add_argument("--batch", nargs="+", type=int, help="images per batch")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", help="eager, compile, triton, cpu, cuda (default: all "
                   "available on the device)")
    p.add_argument("--pool", default="avg", choices=["avg", "max"])
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--reps", type=int, default=100,
                   help="GPU: milliseconds of do_bench repetitions per timing")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved measurement rounds per implementation")
    p.add_argument("--min-run-time", type=float, default=2.0,
                   help="CPU: seconds of measurement per timing (split over the rounds)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="tiny problem, one short timing each: a smoke test, not a measurement")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = defaults(device)
    configs = [CONFIGS[c] for c in (args.configs or d["configs"])]
    batches = args.batch or d["batch"]
    dtypes = args.dtypes or d["dtypes"]
    impls = args.impls or available_impls(device)
    unknown = set(impls) - set(available_impls(device))
    if unknown:
        print(f"not available on {device.type}: {sorted(unknown)}; available: "
              f"{available_impls(device)}", file=sys.stderr)
        return 2
    min_run_time = args.min_run_time
    if args.quick:
        configs = [Config("quick", "tiny", 6, 6, 16, 1, 2, 32)]
        batches, dtypes, min_run_time = [2], ["fp32"], 0.01
        args.rounds, args.reps = 1, 10

    meta = metadata(device)
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']}")
    biggest = max(op_bytes(c, b * c.crops, DTYPES[dt])[0]
                  for c in configs for b in batches for dt in dtypes)
    copy_bps = copy_bandwidth(biggest // 2, device, min_run_time=min_run_time)
    meta["copy_bandwidth_gbps"] = copy_bps / 1e9
    print(f"device copy bandwidth (same run): {copy_bps / 1e9:.1f} GB/s")

    problems = [(c, b, dt) for c in configs for b in batches for dt in dtypes]
    try:
        from tqdm import tqdm
        progress = tqdm(problems, desc="benchmarks", unit="problem", file=sys.stderr)
    except ImportError:
        progress = problems
    rows = []
    for cfg, batch, dt in progress:
        label = f"{cfg.name} B={batch} {dt}"
        report = (lambda msg: progress.set_postfix_str(f"{label}: {msg}")) \
            if hasattr(progress, "set_postfix_str") else None
        torch._dynamo.reset()
        rows += bench_problem(impls, cfg, batch, dt, device, copy_bps, pool=args.pool,
                              backward=not args.no_backward, rounds=args.rounds,
                              min_run_time=min_run_time, reps=args.reps, progress=report)

    print()
    print(format_table(rows, TABLE))
    stem = f"op_{device.type}"
    paths = write_results(rows, meta, args.out, stem)
    title = f"fused_aggregate on {meta['device']}"
    paths["latency_png"] = plot_op_latency(rows, args.out / f"{stem}_latency.png", title)
    paths["bandwidth_png"] = plot_bandwidth_fraction(rows, args.out / f"{stem}_bandwidth.png",
                                                     title)
    print()
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
