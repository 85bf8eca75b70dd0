"""Instruction counts of the CPU kernels, repeatable whatever else the machine does.

Runs build/cmake/cpu_kernel_bench (``cmake -S . -B build/cmake && cmake --build build/cmake
--target cpu_kernel_bench``) under ``valgrind --tool=callgrind``, counting only the kernel
entry point of each direction, one thread, one image, with the sizes of
``saep_kernels.configs.REFERENCE_CONFIGS``, and prints instructions per output element (per
input element for the backward directions). Valgrind does not run AVX-512, so the counts are
the AVX2+FMA entry points' (the kernel picks them under valgrind by itself).

    python scripts/cpu_kernel_profile.py [--configs llava15-7b siglip-so400m] [--markdown F]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saep_kernels.configs import REFERENCE_CONFIGS  # noqa: E402

# case of cpu_kernel_bench -> (kernel entry point counted, per what)
CASES = {"forward": ("fused_aggregate_fwd", "output"),
         "input_grad": ("fused_aggregate_bwd", "input"),
         "weight_grad": ("fused_aggregate_bwd", "input")}


def count(binary: Path, cfg, dtype: str, pool: str, case: str) -> float:
    """Instructions per element of one call of the case's kernel."""
    entry, per = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               f"--toggle-collect=saep::cpu::{entry}*", str(binary),
               "--height", str(cfg.height), "--width", str(cfg.width),
               "--channels", str(cfg.channels), "--prefix", str(cfg.prefix),
               "--layers", str(cfg.layers), "--batch", "1", "--dtype", dtype, "--pool", pool,
               "--threads", "1", "--rounds", "1", "--reps", "1", "--only", case]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r"Collected : ([\d,]+)", log)
    if not m:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{log}")
    ir = int(m.group(1).replace(",", ""))
    # calls: the warm-up and one measured call, plus the max forward that makes the argmax
    calls = 2 + (1 if case == "forward" and pool == "max" else 0)
    outputs = cfg.out_tokens * cfg.layers * cfg.channels
    inputs = cfg.height * cfg.width * cfg.layers * cfg.channels
    return ir / calls / (outputs if per == "output" else inputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["llava15-7b", "siglip-so400m"],
                   choices=list(REFERENCE_CONFIGS))
    p.add_argument("--binary", type=Path, default=ROOT / "build/cmake/cpu_kernel_bench")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    if not shutil.which("valgrind"):
        print("valgrind not found", file=sys.stderr)
        return 2
    if not args.binary.exists():
        print(f"{args.binary} not found: cmake --build build/cmake --target cpu_kernel_bench",
              file=sys.stderr)
        return 2
    lines = ["| config | dtype | pool | forward (per output) | input grad (per input) | "
             "weight grad (per input) |", "|---|---|---|---|---|---|"]
    for name in args.configs:
        cfg = REFERENCE_CONFIGS[name]
        for dtype in ("bf16", "fp32"):
            for pool in ("avg", "max"):
                cells = [f"{count(args.binary, cfg, dtype, pool, c):.2f}" for c in CASES]
                lines.append(f"| {name} | {dtype} | {pool} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
