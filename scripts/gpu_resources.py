"""What each GPU kernel variant costs in registers, spills and shared memory, and whether its
global loads and stores are 16 bytes wide: read off the compiled code, without a GPU.

    python scripts/gpu_resources.py                       # covering set, sm_90: table + checks
    python scripts/gpu_resources.py --all --arch 90 80 --markdown docs/gpu_resources.md
    python scripts/gpu_resources.py --json out.json       # the rows, for tests

Every Triton kernel is compiled ahead of time with ``triton.compile`` for ``GPUTarget("cuda",
arch, 32)`` (no GPU needed), specialised as Triton's launcher would specialise it for the
llava15-7b shapes (docs/op.md section 3); the CUDA kernels are compiled by nvcc. The figures come
from the cubins: registers, stack and static shared memory from ``cuobjdump -res-usage``; local
loads/stores (spills) and 128-bit global loads/stores counted in the SASS (``cuobjdump
-sass``); for CUDA also ptxas's own spill report. Theoretical occupancy is computed from the
registers, the threads of a block and its shared memory for sm_80/sm_90 (65,536 registers,
64 warps, 32 blocks per SM).

Checks (exit status 1 when one fails): no variant spills (no stack, no local loads or stores);
the forward's default tiles reach at least 50% theoretical occupancy; every variant on the
channel-contiguous path has 16-byte global loads and the forward 16-byte global stores.

``--all`` compiles every variant a user can reach (minutes on 2 cores: ``make gpu-resources``);
the default covering set compiles each kernel at each pool mode, kernel size and dtype class
(16- and 32-bit) once, with its default tiles (what ``make test`` checks).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import inspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = ("bf16", "fp16", "fp32")
KERNEL_SIZES = (1, 3, 5, 7)
MIN_FWD_OCCUPANCY = 0.5


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: which kernel, at which options and tiles, for which GPU."""

    backend: str  # "triton" or "cuda"
    kernel: str  # fwd, bwd_input, bwd_weight
    pool: str
    ksize: int
    dtype: str
    arch: int
    tile: str = ""  # Triton: "PxCxwarps"; CUDA: "vec=N"
    default: bool = True  # the tiles a call takes without autotuning
    channels: int = 1024  # C (llava15-7b); 1000 checks 16-byte vectors at C % 16 != 0
    varlen: bool = False  # Triton: packed grids (fused_aggregate_varlen)


@dataclasses.dataclass
class Resources:
    registers: int = 0
    stack: int = 0
    shared: int = 0  # static shared memory (bytes)
    local_ops: int = 0  # LDL/STL instructions in the SASS: spills
    spill_bytes: int = 0  # ptxas's report (CUDA)
    ld128: int = 0  # 128-bit global loads in the SASS
    st128: int = 0  # 128-bit global stores
    threads: int = 0
    occupancy: float = 0.0
    error: str = ""


def _tools() -> Dict[str, str]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tools = {"cuobjdump": str(bin_dir / "cuobjdump")}
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
                                    / "bin" / "nvcc")
    tools["nvcc"] = str(nvcc) if Path(nvcc).exists() else ""
    return tools


def occupancy(registers: int, threads: int, shared: int, arch: int) -> float:
    """Theoretical occupancy (resident warps / 64) of blocks of ``threads`` threads using
    ``registers`` a thread and ``shared`` bytes of shared memory, on sm_80 / sm_90."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(65536 // (regs_per_warp * warps), 32, 64 // warps)
    if shared:
        smem = (228 if arch >= 90 else 164) * 1024
        blocks = min(blocks, smem // (shared + 1024))
    return blocks * warps / 64


def cubin_resources(cubin: Path, function: Optional[str], cuobjdump: str) -> Resources:
    """Registers, stack, shared memory, spills and 128-bit accesses of one function of a cubin
    (the only one when ``function`` is None)."""
    fun = ["-fun", function] if function else []
    usage = subprocess.run([cuobjdump, "-res-usage", *fun, str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    line = next(x for x in usage.splitlines() if "REG:" in x)
    fields = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    sass = subprocess.run([cuobjdump, "-sass", *fun, str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    return Resources(registers=fields["REG"], stack=fields["STACK"], shared=fields["SHARED"],
                     local_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                     ld128=len(re.findall(r"\bLDG\.E[.\w]*\.128\b", sass)),
                     st128=len(re.findall(r"\bSTG\.E[.\w]*\.128\b", sass)))


# ------------------------------------------------------------------------------------- Triton

_TORCH_TYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _signature_of(value, path, constexprs, attrs):
    """Triton type of a runtime argument, specialised as Triton's launcher would: ints equal
    to 1 become constants, pointers and ints divisible by 16 carry the divisibility hint."""
    import torch

    if isinstance(value, tuple):
        return tuple(_signature_of(v, path + (i,), constexprs, attrs) for i, v in enumerate(value))
    if isinstance(value, torch.Tensor):
        attrs[path] = [["tt.divisibility", 16]]
        names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.float64: "fp64", torch.uint8: "u8", torch.int64: "i64"}
        return "*" + names[value.dtype]
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


def compile_triton_kernel(jit_fn, args, consts, arch: int, num_warps: int):
    """``triton.compile`` of ``jit_fn`` for sm_<arch>, given sample runtime ``args`` (in
    signature order) and the constexpr values ``consts`` (by name)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(jit_fn.fn).parameters)
    signature, constexprs, attrs = {}, {}, {}
    runtime = iter(args)
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        else:
            signature[name] = _signature_of(next(runtime), (i,), constexprs, attrs)
    src = ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def triton_launch(variant: Variant, batch: int = 32):
    """(jit kernel, runtime args, constexprs, num_warps) of a Triton variant at the llava15-7b
    shapes, through the launchers' own argument builders; a packed-grids variant packs the
    batch's images (and their prefix tokens) into one sequence."""
    import torch

    from saep_kernels.configs import REFERENCE_CONFIGS
    from saep_kernels.spec import AggregateSpec
    from saep_kernels.triton_kernels import fused_aggregate_bwd as bwd
    from saep_kernels.triton_kernels import fused_aggregate_fwd as fwd
    from saep_kernels.triton_kernels.shared import LaunchConfig, packed_grids
    from saep_kernels.varlen import VarlenSpec, image_table

    cfg = REFERENCE_CONFIGS["llava15-7b"]
    dtype = getattr(torch, _TORCH_TYPES[variant.dtype])
    spec = AggregateSpec(cfg.height, cfg.width, cfg.prefix, True, variant.pool, batch,
                         cfg.tokens, variant.channels, cfg.layers, variant.ksize)
    block_p, block_c, warps = (int(x) for x in variant.tile.split("x"))
    tiles = LaunchConfig(block_p, block_c, warps)
    packed = None
    if variant.varlen:
        table, offsets = image_table([(cfg.height, cfg.width)] * batch, [cfg.prefix] * batch)
        spec = VarlenSpec(True, variant.pool, batch, batch * spec.tokens, int(offsets[-1]),
                          spec.channels, spec.num_layers, spec.kernel_size)
        packed = packed_grids(table, block_p, torch.device("cpu"))
    shape = (1, spec.tokens) if variant.varlen else (batch, spec.tokens)
    out_shape = (1, spec.out_tokens, spec.out_channels) if variant.varlen else spec.out_shape
    layers = [torch.empty(*shape, spec.channels, dtype=dtype) for _ in range(spec.num_layers)]
    weight = torch.empty(spec.taps, spec.out_channels)
    out = torch.empty(out_shape, dtype=dtype)
    argmax = torch.empty(out_shape, dtype=torch.uint8) if variant.pool == "max" else None
    if variant.kernel == "fwd":
        _, args, consts = fwd.fwd_launch(spec, layers, weight, torch.empty(spec.out_channels),
                                         out, argmax, tiles, packed)
        return fwd.fused_aggregate_fwd_kernel, args, consts, warps
    if variant.kernel == "bwd_input":
        grads = [torch.empty_like(x) for x in layers]
        _, args, consts = bwd.input_launch(spec, out, argmax, weight, grads, tiles, packed)
        return bwd.fused_aggregate_bwd_input_kernel, args, consts, warps
    parts = torch.empty(batch, spec.taps, spec.out_channels)
    _, args, consts = bwd.weight_launch(spec, out, argmax, layers, parts,
                                        torch.empty(batch, spec.out_channels), tiles, packed)
    return bwd.fused_aggregate_bwd_weight_kernel, args, consts, warps


def triton_variants(all_variants: bool, archs: List[int]) -> List[Variant]:
    """The Triton kernels a user can reach: the forward at every autotune tile that fits its
    dtype (on a GPU the autotuner picks among them) and at the fixed tiles, the two backward
    kernels at their fixed tiles. The covering set: the fixed tiles, bf16 and fp32 only."""
    from saep_kernels.configs import REFERENCE_CONFIGS
    from saep_kernels.triton_kernels.fused_aggregate_fwd import FWD_TILES, one_vector_per_thread
    from saep_kernels.triton_kernels.shared import launch_config

    cfg = REFERENCE_CONFIGS["llava15-7b"]
    sizes = {"bf16": 2, "fp16": 2, "fp32": 4}
    out = []
    for arch in archs:
        for dtype in (DTYPE_NAMES if all_variants else ("bf16", "fp32")):
            fixed = launch_config(cfg.out_tokens, cfg.channels, sizes[dtype], interpret=False)
            fixed_tile = f"{fixed.block_p}x{fixed.block_c}x{fixed.num_warps}"
            tuned = [f"{p}x{c}x{w}" for p, c, w in FWD_TILES
                     if one_vector_per_thread(p, c, w, sizes[dtype])] if all_variants else []
            for pool in ("avg", "max"):
                for k in KERNEL_SIZES:
                    for tile in dict.fromkeys([fixed_tile] + tuned):
                        out.append(Variant("triton", "fwd", pool, k, dtype, arch, tile))
                    for kernel in ("bwd_input", "bwd_weight"):
                        out.append(Variant("triton", kernel, pool, k, dtype, arch, fixed_tile))
            # a channel count that is a multiple of 8 but not of 16 (e.g. C=1000)
            for kernel in ("fwd", "bwd_input", "bwd_weight"):
                out.append(Variant("triton", kernel, "avg", 3, dtype, arch, fixed_tile,
                                   channels=1000))
            # packed grids (the fixed tiles): every kernel size with --all, else the widest
            for pool in ("avg", "max"):
                for k in (KERNEL_SIZES if all_variants else (7,)):
                    for kernel in ("fwd", "bwd_input", "bwd_weight"):
                        out.append(Variant("triton", kernel, pool, k, dtype, arch, fixed_tile,
                                           varlen=True))
    return out


def triton_resources(variant: Variant) -> Resources:
    """Compile one Triton variant and read its cubin."""
    kernel, args, consts, warps = triton_launch(variant)
    try:
        compiled = compile_triton_kernel(kernel, args, consts, variant.arch, warps)
    except Exception as exc:  # reported in the table and failed by the checks
        return Resources(error=f"{type(exc).__name__}: {exc}"[:300])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = cubin_resources(cubin, None, _tools()["cuobjdump"])
    res.shared = max(res.shared, int(compiled.metadata.shared))
    res.threads = 32 * warps
    res.occupancy = occupancy(res.registers, res.threads, res.shared, variant.arch)
    return res


# --------------------------------------------------------------------------------------- CUDA

CUDA_SOURCES = {"fwd": "csrc/cuda/fused_aggregate_fwd.cu", "bwd": "csrc/cuda/fused_aggregate_bwd.cu"}
CUDA_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64"}
# plan.h's blocks for the reference configurations: up to 128 threads
CUDA_THREADS = 128


def compile_cuda(direction: str, arch: int) -> List[tuple]:
    """nvcc one direction's kernels for sm_<arch>: [(Variant, Resources)] for every kernel
    instance (dtype, vector width, kernel size, fixed grid or packed inputs; the pool mode is a
    runtime branch)."""
    tools = _tools()
    if not tools["nvcc"]:
        return [(Variant("cuda", direction, "any", 0, "-", arch), Resources(error="nvcc not found"))]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{direction}.cubin"
        proc = subprocess.run(
            [tools["nvcc"], "-O3", "-std=c++17", "-lineinfo", f"-arch=sm_{arch}", "-cubin",
             "-Xptxas", "-v", "-I", str(ROOT / "csrc"), str(ROOT / CUDA_SOURCES[direction]),
             "-o", str(cubin)], capture_output=True, text=True)
        if proc.returncode != 0:
            return [(Variant("cuda", direction, "any", 0, "-", arch),
                     Resources(error=proc.stderr[-300:]))]
        spills = {}  # mangled name -> ptxas's spill bytes
        current = None
        for line in proc.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = m.group(1)
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and current:
                spills[current] = int(m.group(1)) + int(m.group(2))
        rows = []
        for name, spill in spills.items():
            demangled = subprocess.run(["c++filt", name], capture_output=True,
                                       text=True).stdout.strip()
            m = re.search(r"fused_aggregate_(\w+)_kernel<([\w:]+), (\d+), (\d+), (true|false)>",
                          demangled)
            kernel, dtype = m.group(1), CUDA_TYPES[m.group(2)]
            vec, ksize = int(m.group(3)), int(m.group(4))
            packed = ", packed" if m.group(5) == "true" else ""  # packed inputs (varlen)
            res = cubin_resources(cubin, name, tools["cuobjdump"])
            res.spill_bytes = spill
            res.threads = CUDA_THREADS
            res.occupancy = occupancy(res.registers, res.threads, 0, arch)
            rows.append((Variant("cuda", kernel, "any", ksize, dtype, arch, f"vec={vec}{packed}"),
                         res))
    return rows


# ------------------------------------------------------------------------------------- report

def checks(rows: List[tuple]) -> List[str]:
    """The failures of the rows: errors, spills, low forward occupancy, narrow accesses."""
    failed = []
    for v, r in rows:
        name = (f"{v.backend} {v.kernel} {v.pool} k={v.ksize} {v.dtype} sm_{v.arch} "
                f"{v.tile}" + ("" if v.channels == 1024 else f" C={v.channels}")
                + (" varlen" if v.varlen else "")).strip()
        if r.error:
            failed.append(f"{name}: {r.error}")
            continue
        if r.stack or r.local_ops or r.spill_bytes:
            failed.append(f"{name}: spills (stack {r.stack} B, {r.local_ops} local loads/stores, "
                          f"{r.spill_bytes} B spilled)")
        if v.kernel == "fwd" and v.default and r.occupancy < MIN_FWD_OCCUPANCY:
            failed.append(f"{name}: {r.registers} registers, occupancy {r.occupancy:.0%} < "
                          f"{MIN_FWD_OCCUPANCY:.0%}")
        vectors = v.backend == "triton" or v.tile.split(",")[0] != "vec=1"
        if vectors and v.ksize > 1 and r.ld128 == 0:
            failed.append(f"{name}: no 16-byte global loads")
        if vectors and v.kernel in ("fwd", "bwd_input") and r.st128 == 0:
            failed.append(f"{name}: no 16-byte global stores")
    return failed


COLUMNS = ["backend", "kernel", "pool", "k", "dtype", "arch", "tiles", "regs", "stack",
           "spills", "smem", "ld.128", "st.128", "occupancy"]


def table_rows(rows: List[tuple]) -> List[List[str]]:
    out = []
    for v, r in rows:
        spills = "-" if r.error else str(r.local_ops + r.spill_bytes)
        out.append([v.backend, v.kernel, v.pool, str(v.ksize), v.dtype, f"sm_{v.arch}",
                    v.tile + ("" if v.default else " (autotune)")
                    + ("" if v.channels == 1024 else f" C={v.channels}")
                    + (" varlen" if v.varlen else ""),
                    str(r.registers) if not r.error else "error", str(r.stack), spills,
                    str(r.shared), str(r.ld128), str(r.st128), f"{r.occupancy:.0%}"])
    return out


def _versions() -> str:
    import triton

    nvcc = _tools()["nvcc"]
    release = ""
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release ([\d.]+)", out).group(1)
    return f"triton {triton.__version__}" + (f", nvcc {release}" if release else "")


def markdown(rows: List[tuple], failed: List[str]) -> str:
    """The report: a summary line per (backend, kernel, arch), then every variant."""
    lines = ["# GPU kernels: resources, compiled offline", "",
             f"Written by `make gpu-resources` (`scripts/gpu_resources.py --all --arch 90 80`; "
             f"{_versions()}). Each kernel is compiled as a user's call would compile it for the "
             "llava15-7b shapes; the figures are read off the cubins (see the script). "
             "Checks: no spills, forward occupancy >= 50%, 16-byte global accesses; "
             f"{len(rows)} kernels, {len(failed)} failed.", "",
             "| backend | kernel | arch | variants | registers | spills | smem (B) | occupancy |",
             "|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, list] = {}
    for v, r in rows:
        kernel = v.kernel + (" (varlen)" if v.varlen else "")
        groups.setdefault((v.backend, kernel, v.arch), []).append(r)
    for (backend, kernel, arch), rs in groups.items():
        ok = [r for r in rs if not r.error]
        regs = f"{min(r.registers for r in ok)}-{max(r.registers for r in ok)}" if ok else "-"
        spills = sum(r.local_ops + r.spill_bytes for r in ok)
        occ = f"{min(r.occupancy for r in ok):.0%}-{max(r.occupancy for r in ok):.0%}" if ok else "-"
        smem = max((r.shared for r in ok), default=0)
        lines.append(f"| {backend} | {kernel} | sm_{arch} | {len(rs)} | {regs} | {spills} | "
                     f"{smem} | {occ} |")
    lines += ["", "Every variant (tiles: Triton windows x channels x warps; CUDA channels per "
              "thread; the CUDA kernels take the pool mode at run time):", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


def collect(all_variants: bool, archs: List[int], backends=("triton", "cuda"),
            jobs: int = 1) -> List[tuple]:
    """[(Variant, Resources)] of the backends' kernels, compiled in ``jobs`` processes."""
    variants = triton_variants(all_variants, archs) if "triton" in backends else []
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        cuda = [pool.submit(compile_cuda, d, a) for a in archs for d in CUDA_SOURCES
                if "cuda" in backends]
        triton_rows = list(zip(variants, pool.map(triton_resources, variants)))
        cuda_rows = [row for f in cuda for row in f.result()]
    return triton_rows + sorted(cuda_rows, key=lambda vr: dataclasses.astuple(vr[0]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every reachable variant (slow)")
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="SM architectures")
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"],
                   choices=["triton", "cuda"])
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--markdown", type=Path, help="write the table as markdown here")
    p.add_argument("--json", type=Path, help="write the rows and the failures as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles real kernels")
    rows = collect(args.all, args.arch, args.backends, args.jobs)
    failed = checks(rows)
    widths = [max(len(c), *(len(r[i]) for r in table_rows(rows))) for i, c in enumerate(COLUMNS)]
    for cells in [COLUMNS] + table_rows(rows):
        print("  ".join(x.ljust(w) for x, w in zip(cells, widths)))
    print(f"\n{len(rows)} kernels, {len(failed)} failed checks")
    for f in failed:
        print("FAIL", f)
    if args.markdown:
        args.markdown.write_text(markdown(rows, failed))
    if args.json:
        args.json.write_text(json.dumps({
            "rows": [dict(dataclasses.asdict(v), **dataclasses.asdict(r)) for v, r in rows],
            "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
