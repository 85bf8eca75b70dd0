"""The main job: benchmark the fused op and the projectors on the present device, print the
tables, write JSON, CSV and PNG plots.

    python -m benchmarks                      # the default for the device (a few minutes)
    python -m benchmarks --quick              # tiny shapes, one short timing each: a smoke test
    python -m benchmarks --parts op --configs llava15-7b siglip-so400m --batch 1 8 32

Parts: ``op`` (the fused op, each backend vs plain PyTorch eager and torch.compile, and the
reference),
``projectors`` (SAEP vs the projectors users pick today), ``sweep`` (forward latency vs
input tokens), ``llm`` (Llama decoder layers over each projector's tokens), ``varlen`` (images
of different sizes in one batch: ``fused_aggregate_varlen`` vs padding to the largest grid vs
a per-image loop).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import projectors as P
from saep_kernels.configs import REFERENCE_BATCHES, Config
from saep_kernels.configs import IMAGE_MIXES, REFERENCE_CONFIGS as CONFIGS
from .harness import (fix_malloc_thresholds, format_table, metadata, run_in_fresh_process,
                      time_interleaved, write_results)
from .llm import DEFAULT_LLM, LLMConfig, llm_forward, transformers_available
from .op_bench import BASELINES, DTYPES, available_impls, bench_problem
from .plots import (plot_bandwidth_fraction, plot_op_latency, plot_projectors, plot_sweep,
                    plot_varlen)
from .projector_bench import bench_projectors, bench_sweep
from .varlen_bench import bench_varlen, speedups

PARTS = ("op", "projectors", "sweep", "llm", "varlen")
OP_TABLE = ["backend", "config", "batch", "dtype", "fwd_ms", "fwd_bwd_ms", "frozen_fwd_bwd_ms",
            "gbps", "copy_gbps", "bw_fraction", "fwd_bwd_bw_fraction", "peak_mem_mb"]
VARLEN_TABLE = ["backend", "config", "batch", "dtype", "in_tokens", "fwd_ms", "fwd_bwd_ms",
                "copy_gbps", "bw_fraction", "peak_mem_mb"]
PROJ_TABLE = ["name", "config", "batch", "dtype", "params", "out_tokens", "fwd_ms", "fwd_bwd_ms",
              "peak_mem_mb", "llm_ms", "note"]
QUICK = Config("quick", "tiny", 8, 8, 32, 1, 2, 128)
QUICK_MIX = IMAGE_MIXES["pixtral-mix8"].__class__(
    "quick-mix", "tiny", 32, 2, ((4, 6), (8, 4), (2, 2)), "3 tiny images")


def defaults(device: torch.device):
    if device.type == "cuda":
        return dict(configs=list(CONFIGS), batch=list(REFERENCE_BATCHES), dtypes=["bf16"],
                    proj_configs=["llava15-7b", "siglip-so400m"], proj_batch=8,
                    proj_dtype="bf16", sweep_grids=[12, 16, 24, 32, 48], sweep_batch=8)
    # CPU: the op at the sizes the issue targets; projectors at batch 1 in fp32 (this CPU has
    # no bf16 matrix units: bf16 GEMMs would only time the conversions)
    return dict(configs=["llava15-7b"], batch=[8], dtypes=["bf16", "fp32"],
                proj_configs=["llava15-7b"], proj_batch=1, proj_dtype="fp32",
                sweep_grids=[8, 12, 16, 24, 32], sweep_batch=1)


SWEEP_PROJECTORS = ["mlp2x_gelu", "resampler-144", "c-abstractor", "ldpv2", "pixel-shuffle"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="op: configurations")
    p.add_argument("--batch", nargs="+", type=int, help="op: images per batch")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="op: dtypes")
    p.add_argument("--impls", "--backends", dest="impls", nargs="+",
                   help="op: eager, compile (plain PyTorch in the input dtype), reference, "
                        "reference-compile, triton, cpu, cuda (default: all on the device but "
                        "reference-compile)")
    p.add_argument("--projectors", nargs="+", help="projectors (default: all); see "
                   "benchmarks/projectors.py")
    p.add_argument("--projector-configs", nargs="+", choices=list(CONFIGS))
    p.add_argument("--projector-batch", type=int)
    p.add_argument("--projector-dtype", choices=list(DTYPES))
    p.add_argument("--sweep-grids", nargs="+", type=int, help="sweep: grid sides")
    p.add_argument("--mixes", nargs="+", choices=list(IMAGE_MIXES),
                   help="varlen: image mixes (saep_kernels.configs.IMAGE_MIXES)")
    p.add_argument("--pool", default="avg", choices=["avg", "max"], help="op: pool mode")
    p.add_argument("--compile-mode", default="auto",
                   help="torch.compile mode of the compiled baselines (auto: "
                        "max-autotune-no-cudagraphs on GPU, default on CPU; 'default' compiles "
                        "faster)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--reps", type=int, default=100,
                   help="GPU: milliseconds of do_bench repetitions per timing")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved measurement rounds per implementation")
    p.add_argument("--min-run-time", type=float, default=2.0,
                   help="CPU: seconds of measurement per timing (split over the rounds)")
    p.add_argument("--malloc", default="fixed", choices=["fixed", "default"],
                   help="CPU: glibc malloc's mmap/trim thresholds fixed for the run (the "
                        "default; harness.fix_malloc_thresholds says why) or glibc's dynamic ones")
    p.add_argument("--shared-process", action="store_true",
                   help="op and varlen: time every problem in this process (by default each "
                        "runs in a fresh process: harness.run_in_fresh_process says why)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="tiny problem, one short timing each: a smoke test, not a measurement")
    return p.parse_args(argv)


class Progress:
    """A tqdm bar over the run's steps (plain lines when tqdm is missing)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="benchmarks", unit="step", file=sys.stderr)
        except ImportError:
            self.bar = None
        self.label = ""

    def step(self, label: str):
        self.label = label
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            print(f"[benchmarks] {label}", file=sys.stderr, flush=True)

    def detail(self, msg: str):
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.label}: {msg}")

    def done(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = defaults(device)
    op_configs = [CONFIGS[c] for c in (args.configs or d["configs"])]
    proj_configs = [CONFIGS[c] for c in (args.projector_configs or d["proj_configs"])]
    batches = args.batch or d["batch"]
    dtypes = args.dtypes or d["dtypes"]
    proj_batch = args.projector_batch or d["proj_batch"]
    proj_dtype = args.projector_dtype or d["proj_dtype"]
    sweep_grids = args.sweep_grids or d["sweep_grids"]
    impls = args.impls or available_impls(device)
    unknown = set(impls) - set(available_impls(device)) - set(BASELINES)
    if unknown:
        print(f"not available on {device.type}: {sorted(unknown)}; available: "
              f"{available_impls(device)}", file=sys.stderr)
        return 2
    saep_rows = P.saep_variants(device)
    projector_names = args.projectors or (list(P.BASELINES) + saep_rows)
    unknown = set(projector_names) - set(P.BASELINES) - set(saep_rows)
    if unknown:
        print(f"unknown projectors {sorted(unknown)}; available: "
              f"{list(P.BASELINES) + saep_rows}", file=sys.stderr)
        return 2
    llm_cfg = DEFAULT_LLM[device.type]
    rounds, min_run_time, reps = args.rounds, args.min_run_time, args.reps
    compile_mode = None if args.compile_mode == "default" else args.compile_mode
    sweep_names = [n for n in SWEEP_PROJECTORS if n in projector_names] + \
        (saep_rows[2:] or ["saep-eager"])
    if args.quick:
        op_configs = proj_configs = [QUICK]
        batches, dtypes, proj_batch, proj_dtype = [2], ["fp32"], 2, "fp32"
        sweep_grids, llm_cfg = [4, 8], LLMConfig(dim=128, layers=1, text_tokens=8)
        rounds, min_run_time, reps = 1, 0.01, 10
    mixes = [IMAGE_MIXES[m] for m in (args.mixes or list(IMAGE_MIXES))]
    if args.quick:
        mixes = [QUICK_MIX]
    parts = list(args.parts)
    if "llm" in parts and not transformers_available():
        print("llm part skipped: transformers is not installed (pip install transformers)",
              file=sys.stderr)
        parts.remove("llm")

    meta = metadata(device)
    meta.update(parts=parts, rounds=rounds, cpu_min_run_time_s=min_run_time,
                gpu_reps_ms=reps, quick=args.quick, compile_mode=args.compile_mode)
    if device.type == "cpu":
        meta["malloc"] = "default" if args.malloc == "default" else \
            fix_malloc_thresholds() or "not glibc"
    meta["process"] = "shared" if args.shared_process else "fresh per op and varlen problem"
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']}")
    rows = []
    steps = (len(op_configs) * len(batches) * len(dtypes) if "op" in parts else 0) + \
        (len(proj_configs) if "projectors" in parts else 0) + (1 if "sweep" in parts else 0) + \
        (1 if "llm" in parts else 0) + (len(mixes) * len(dtypes) if "varlen" in parts else 0)
    progress = Progress(steps)

    def run_problem(bench, **kw):
        """One op or varlen problem's rows: bench(**kw) in a fresh process, or here with
        --shared-process (then with the progress bar's details)."""
        if args.shared_process:
            torch._dynamo.reset()
            return bench(progress=progress.detail, **kw)
        return run_in_fresh_process(bench, malloc_fixed=isinstance(meta.get("malloc"), dict),
                                    **kw)

    if "op" in parts:
        for cfg in op_configs:
            for batch in batches:
                for dt in dtypes:
                    progress.step(f"op {cfg.name} B={batch} {dt}")
                    rows += run_problem(bench_problem, impls=impls, cfg=cfg, batch=batch,
                                        dtype_name=dt, device=device, pool=args.pool,
                                        backward=not args.no_backward, rounds=rounds,
                                        min_run_time=min_run_time, reps=reps,
                                        compile_mode=compile_mode)
                    progress.done()

    if "varlen" in parts:
        meta["image_mixes"] = {m.name: dict(grids=[list(g) for g in m.grids], channels=m.channels,
                                            layers=m.layers, description=m.description)
                               for m in mixes}
        for mix in mixes:
            for dt in dtypes:
                progress.step(f"varlen {mix.name} {dt}")
                rows += run_problem(bench_varlen, mix=mix, dtype_name=dt, device=device,
                                    pool=args.pool, backward=not args.no_backward,
                                    rounds=rounds, min_run_time=min_run_time, reps=reps)
                progress.done()

    if "projectors" in parts:
        for cfg in proj_configs:
            progress.step(f"projectors {cfg.name} B={proj_batch} {proj_dtype}")
            torch._dynamo.reset()
            rows += bench_projectors(projector_names, cfg, proj_batch, proj_dtype, device,
                                     rounds, min_run_time, reps, None, not args.no_backward,
                                     progress.detail, compile_mode)
            progress.done()

    if "sweep" in parts:
        progress.step(f"sweep {proj_configs[0].name} grids {sweep_grids}")
        torch._dynamo.reset()
        rows += bench_sweep(sweep_names, proj_configs[0], sweep_grids, proj_batch, proj_dtype,
                            device, min_run_time, reps, progress.detail)
        progress.done()

    if "llm" in parts:
        progress.step(f"llm: {llm_cfg.describe}")
        meta["llm"] = llm_cfg.describe
        token_counts = sorted({r.out_tokens for r in rows
                               if r.kind == "projector" and r.out_tokens})
        if not token_counts:  # no projectors were run: the counts LLaVA and SAEP give
            token_counts = sorted({proj_configs[0].height * proj_configs[0].width,
                                   proj_configs[0].out_tokens})
        fns = {f"{n} tokens": llm_forward(llm_cfg, proj_batch, n, DTYPES[proj_dtype], device)
               for n in token_counts}
        times = time_interleaved(fns, device, rounds, reps, min_run_time, progress.detail)
        llm_ms = {n: times[f"{n} tokens"].median_ms for n in token_counts}
        meta["llm_ms_by_tokens"] = llm_ms
        for r in rows:
            if r.kind == "projector" and r.out_tokens in llm_ms:
                r.llm_ms = llm_ms[r.out_tokens]
        progress.done()
    progress.close()

    op_rows = [r for r in rows if r.kind == "op"]
    proj_rows = [r for r in rows if r.kind == "projector"]
    sweep_rows = [r for r in rows if r.kind == "sweep"]
    varlen_rows = [r for r in rows if r.kind == "varlen"]
    if op_rows:
        print("\nfused_aggregate (ms, median; bw_fraction = achieved bytes/s / copy_gbps, a "
              "device copy timed in the same rounds)")
        print(format_table(op_rows, OP_TABLE))
    if varlen_rows:
        print("\nimages of different sizes in one batch (ms, median): fused_aggregate_varlen vs "
              "a per-image loop vs padding to the largest grid")
        for mix in mixes:
            print(f"  {mix.name}: {mix.description}")
        print(format_table(varlen_rows, VARLEN_TABLE))
        for line in speedups(varlen_rows):
            print("  " + line)
    if proj_rows:
        print(f"\nprojectors (ms, median; llm_ms = {meta.get('llm', 'not run')})")
        print(format_table(proj_rows, PROJ_TABLE))
    if sweep_rows:
        print("\nsweep: forward ms by input tokens")
        names = list(dict.fromkeys(r.name for r in sweep_rows))
        tokens = sorted({r.in_tokens for r in sweep_rows})
        print("  ".join(["tokens".ljust(8)] + [n[:14].ljust(14) for n in names]))
        for t in tokens:
            cells = []
            for n in names:
                hit = [r.fwd_ms for r in sweep_rows if r.name == n and r.in_tokens == t]
                cells.append((f"{hit[0]:.3g}" if hit else "-").ljust(14))
            print("  ".join([str(t).ljust(8)] + cells))

    stem = f"results_{device.type}"
    paths = write_results(rows, meta, args.out, stem)
    where = meta["device"]
    if op_rows:
        paths["op_latency_png"] = plot_op_latency(
            op_rows, args.out / f"{stem}_op_latency.png", f"fused_aggregate on {where}")
        paths["op_bandwidth_png"] = plot_bandwidth_fraction(
            op_rows, args.out / f"{stem}_op_bandwidth.png", f"fused_aggregate on {where}")
    if varlen_rows:
        paths["varlen_png"] = plot_varlen(
            varlen_rows, args.out / f"{stem}_varlen.png",
            f"images of different sizes in one batch, on {where}")
    if proj_rows:
        cfg = proj_rows[0]
        paths["projectors_png"] = plot_projectors(
            proj_rows, args.out / f"{stem}_projectors.png",
            f"projectors, {cfg.config}, B={cfg.batch}, {cfg.dtype}, on {where}")
    if sweep_rows:
        paths["sweep_png"] = plot_sweep(
            sweep_rows, args.out / f"{stem}_sweep.png",
            f"projector forward vs input tokens, B={proj_batch}, {proj_dtype}, on {where}")
    print()
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
