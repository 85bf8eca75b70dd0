"""Measurement: timers (CPU and GPU), device copy bandwidth, peak memory, run metadata, and
the result rows written as JSON and CSV.

Method.
* GPU: ``triton.testing.do_bench`` (CUDA events; it flushes the L2 cache before each run by
  writing a 256 MB buffer), warm-up then repetitions; median and the 20th/80th percentiles.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with the thread count stated in the
  metadata; median and interquartile range over the measured blocks, after a warm-up call.
* Bandwidth: bytes the op must move (docs/op.md section 4) / median time, and its fraction of a
  device copy (``dst.copy_(src)``) of the same bytes, timed in the same interleaved rounds as
  the implementations (``COPY``), so that a slow spell of a shared machine's memory falls on
  the copy and the kernels alike.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Row:
    """One measurement. ``kind`` is "op" (the fused op) or "projector" (a whole projector)."""

    name: str
    kind: str
    backend: str
    config: str
    batch: int
    dtype: str
    device: str
    torch: str
    triton: str
    fwd_ms: Optional[float] = None
    fwd_p20_ms: Optional[float] = None
    fwd_p80_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    fwd_bwd_p20_ms: Optional[float] = None
    fwd_bwd_p80_ms: Optional[float] = None
    frozen_fwd_bwd_ms: Optional[float] = None  # op: no input gradients (a frozen vision tower)
    peak_mem_mb: Optional[float] = None
    params: Optional[int] = None
    out_tokens: Optional[int] = None
    gbps: Optional[float] = None
    copy_gbps: Optional[float] = None  # the device copy timed in the same rounds (COPY)
    bw_fraction: Optional[float] = None
    fwd_bwd_gbps: Optional[float] = None
    fwd_bwd_bw_fraction: Optional[float] = None
    llm_ms: Optional[float] = None  # LLM decoder layers over out_tokens + text tokens
    in_tokens: Optional[int] = None
    note: str = ""


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _git_commit() -> str:
    """The checkout's commit (with "+dirty" when tracked files differ from it), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty.strip() else "")) if commit else "unknown"


def metadata(device: torch.device) -> Dict[str, object]:
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        try:
            meta["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            meta["driver"] = "unknown"
    return meta


def _quantiles(times_ms: List[float]) -> Timing:
    t = torch.tensor(sorted(times_ms), dtype=torch.float64)
    q = t.quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return Timing(float(q[1]), float(q[0]), float(q[2]))


def _samples(fn: Callable[[], object], device: torch.device, reps: int,
             min_run_time: float) -> List[float]:
    """Per-call times in ms of one measurement of ``fn`` (already warmed up)."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=5, rep=reps, return_mode="all"))
    import torch.utils.benchmark as tb

    m = tb.Timer(stmt="fn()", globals={"fn": fn},
                 num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_run_time)
    return [t * 1e3 for t in m.times]


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device,
                     rounds: int = 5, reps: int = 100, min_run_time: float = 1.0,
                     progress: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """Median and 20th/80th percentile per-call time (ms) of each function.

    Each function is warmed up, then measured in ``rounds`` rounds that visit the functions
    in turn (A B C A B C ...), so a slow spell of a shared machine falls on all of them
    alike. GPU: ``triton.testing.do_bench`` (``reps`` ms per round, L2 flushed before each
    call); CPU: ``torch.utils.benchmark`` blocks of ``min_run_time / rounds`` seconds.
    """
    for name, fn in fns.items():
        if progress:
            progress(f"warm-up {name}")
        fn()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if progress:
                progress(f"{name} round {r + 1}/{rounds}")
            samples[name] += _samples(fn, device, max(reps // rounds, 10),
                                      min_run_time / rounds)
    return {name: _quantiles(ts) for name, ts in samples.items()}


# the name of the device copy in a problem's interleaved timings (device_copy)
COPY = "device copy"


def device_copy(nbytes: int, device: torch.device) -> Tuple[Callable[[], object], int]:
    """(a device copy, the bytes it moves): ``dst.copy_(src)`` of fp32 buffers that read
    about ``nbytes / 2`` bytes and write as many, to be timed next to an op that moves
    ``nbytes`` (its bandwidth is bytes moved / time)."""
    n = max(nbytes // 8, 1)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * n * 4


def time_with_copy(fns: Dict[str, Callable[[], object]], nbytes: int, device: torch.device,
                   rounds: int = 5, reps: int = 100, min_run_time: float = 1.0,
                   progress: Optional[Callable[[str], None]] = None
                   ) -> Tuple[Dict[str, Timing], float]:
    """time_interleaved of ``fns`` with a device copy of ``nbytes`` (device_copy) in the same
    rounds: (the timings of ``fns``, the copy's bytes/s)."""
    assert COPY not in fns, f"{COPY!r} names the copy"
    copy, copy_bytes = device_copy(nbytes, device)
    timings = time_interleaved({**fns, COPY: copy}, device, rounds, reps, min_run_time, progress)
    return timings, copy_bytes / (timings.pop(COPY).median_ms * 1e-3)


def _run_configured(malloc_fixed: bool, threads: int, fn: Callable, args: tuple,
                   kwargs: dict):
    """In the fresh process: the parent's malloc thresholds and thread count, then fn."""
    if malloc_fixed:
        fix_malloc_thresholds()
    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def run_in_fresh_process(fn: Callable, *args, malloc_fixed: bool = False, **kwargs):
    """``fn(*args, **kwargs)`` in a new Python process (spawned, so it shares no state with
    this one: no allocator heap, no compiled graphs, no thread pools), with this process's
    torch thread count and, with ``malloc_fixed``, fix_malloc_thresholds; returns its result
    (fn, its arguments and its result are pickled; its exceptions are raised here).

    The benchmark runs each op and varlen problem so, because a problem's CPU figures depended
    on what ran before it in the process: siglip-so400m's bf16 avg cpu forward took 3.15-3.42
    ms when its problem ran first and 3.84-4.79 ms after llava15-7b's (four pairs of runs; README,
    where the first runs of this way, in a slow spell, are within the machine's spread). Each
    process imports torch afresh (a few seconds a problem)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_configured, malloc_fixed, torch.get_num_threads(), fn, args,
                           kwargs).result()


def _glibc_function(name: str):
    """glibc's function `name` through ctypes, None where the C library is not glibc."""
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


# glibc malloc's thresholds for a CPU run (fix_malloc_thresholds): the largest mmap threshold
# glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), and a trim threshold no run reaches
MALLOC_MMAP_THRESHOLD = 32 * 2**20
MALLOC_TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def fix_malloc_thresholds() -> Optional[Dict[str, int]]:
    """Fix glibc malloc's mmap and trim thresholds for the rest of the process.

    By default glibc moves its mmap threshold up as large blocks are freed, so whether a step's
    large tensors are mapped afresh (page-faulted on first touch, every step) or reused from the
    heap depends on what the process freed before, and flips from run to run. Measured here
    (llava15-7b, B=8, bf16, max pooling, forward+backward of the cpu backend): 17.5-31.5 ms a
    step with about 3,700 minor faults by default, 15.6-17.1 ms with 76-154 once fixed. Fixed
    thresholds, as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set them, apply to every
    implementation a run times alike. Returns the thresholds set, None where malloc is not
    glibc's.
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return None
    if mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) != 1 or \
            mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) != 1:
        return None
    return {"mmap_threshold": MALLOC_MMAP_THRESHOLD, "trim_threshold": MALLOC_TRIM_THRESHOLD}


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so it does not hide new allocations."""
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory one call of ``fn`` needs above what is in use before it, in MiB.

    GPU: the CUDA caching allocator's max_memory_allocated. CPU (Linux): the process's peak
    resident set size (VmHWM), reset just before the call through /proc/self/clear_refs, minus
    the resident size then; freed heap is returned to the OS first. None where neither works.
    """
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS
    except OSError:
        return None
    base = _proc_status_kb("VmRSS")
    out = fn()
    peak = _proc_status_kb("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


def write_results(rows: List[Row], meta: Dict[str, object], out_dir: Path, stem: str) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    csv_path = out_dir / f"{stem}.csv"
    with open(json_path, "w") as f:
        json.dump({"metadata": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    return {"json": json_path, "csv": csv_path}


def format_table(rows: List[Row], columns: List[str]) -> str:
    """A fixed-width text table of the given Row fields (numbers to 3 significant figures)."""

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        if isinstance(v, int) and v >= 10**6:
            return f"{v / 1e6:.1f}M"
        return str(v)

    cells = [[fmt(getattr(r, c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
