"""Where the AVX-512 max forward's input loads hit: a cache model of its walk, repeatable.

This machine's VM exposes no hardware cache counters (``perf stat`` reports them unsupported)
and valgrind does not run AVX-512, so this replays the addresses the in-place max forward
(csrc/cpu/fused_aggregate_fwd.cpp, ``max_forward_in_place``, k = 3) loads through a model of
one core's caches: L1D 48 KiB 12-way, L2 2 MiB 16-way, 64-byte lines, LRU, no hardware
prefetcher; the kernel's own prefetches of the next window row (``Prefetch``, prefetcht1) fill
L2, and its stores are non-temporal (not modelled). The walk: window row by window row, one
Packing group of channels (64 bytes of a pixel) at a time. bf16 ("group", the kernel's walk
since dfb3ef5): a window a step, its 4 x 4 patch pixels loaded once for both vector
blocks (the even and the odd channels). fp32 ("blocks"): the group's one vector block along the
row, two windows a step (their 4 x 6 patch pixels loaded once each) where both patches are in
the grid, else one (its in-grid patch pixels); ``--walk blocks`` models bf16 so too, each of its
two blocks a walk over the same bytes (the kernel's walk before the group walk).

A load can hit L1 only where its line was loaded before in the same window row and group: the
columns a step shares with the one before, and (bf16, "blocks") the second block's walk over the
first's lines. With a pixel stride of a power of two (C = 1024: 2048 bytes in bf16, 4096 in
fp32) a group's lines fall into two L1 sets (bf16) or one (fp32), and fewer of those loads hit;
``bound`` is the hit rate with no conflict at all (every line loaded once a window row and group
from below L1).

    python scripts/cpu_cache_model.py [--configs llava15-7b siglip-so400m] [--channels 1024 1056]
                                      [--walk blocks]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saep_kernels.configs import REFERENCE_CONFIGS  # noqa: E402

LINE = 64
K1, PAD = 4, 1  # k = 3: a window's patch is (k + 1) x (k + 1) pixels, padding k // 2
WINDOWS = 2  # kMaxWindows with AVX-512 and k <= 3


class Cache:
    """A set-associative LRU cache of line numbers."""

    def __init__(self, size: int, ways: int):
        self.ways = ways
        self.sets = [OrderedDict() for _ in range(size // LINE // ways)]

    def access(self, line: int) -> bool:
        """Whether line was present; it is the set's most recent after the call."""
        s = self.sets[line % len(self.sets)]
        if line in s:
            s.move_to_end(line)
            return True
        s[line] = None
        if len(s) > self.ways:
            s.popitem(last=False)
        return False


def kernel_walk(elem_bytes: int) -> str:
    """The kernel's walk for this element size (k = 3, AVX-512)."""
    return "group" if elem_bytes == 2 else "blocks"


def max_forward_loads(height: int, width: int, channels: int, prefix: int, elem_bytes: int,
                      tasks: int = 3, walk: str | None = None) -> Counter:
    """Counts of the input loads that hit L1, L2 or neither ("mem"), and the ``bound`` loads
    that could hit L1 (loads less the distinct lines of each window row and group), over
    ``tasks`` consecutive (image, layer) tasks of one thread; ``walk`` is "group" or "blocks"
    (default: the kernel's)."""
    walk = walk or kernel_walk(elem_bytes)
    if walk not in ("group", "blocks"):
        raise ValueError(f"walk must be 'group' or 'blocks', got {walk!r}")
    l1, l2 = Cache(48 * 1024, 12), Cache(2 * 1024 * 1024, 16)
    ho, wo = (height + 1) // 2, (width + 1) // 2
    stride = channels * elem_bytes  # bytes between pixels
    groups = stride // LINE  # full Packing groups (the tail channels are not modelled)
    # walks over a group's bytes, and windows a step where both patches are in the grid
    walks = 2 if elem_bytes == 2 and walk == "blocks" else 1
    windows = WINDOWS if walk == "blocks" else 1
    image = (height * width + prefix) * stride
    n = Counter()
    for t in range(tasks):
        x = (1 << 30) + t * (image + 3 * 4096) + prefix * stride  # pixel (0, 0) of the task

        def load(line):  # an L1 hit still refreshes the line in L2 (inclusive)
            if l1.access(line):
                n["L1"] += 1
                l2.access(line)
            else:
                n["L2" if l2.access(line) else "mem"] += 1

        for oi in range(ho):
            r0 = 2 * oi - PAD
            rows = [r0 + a for a in range(K1) if 0 <= r0 + a < height]

            def inside(o):  # window o's patch is all in the grid
                return len(rows) == K1 and 2 * o - PAD >= 0 and 2 * o - PAD + K1 <= width

            # the next window row's two new rows, prefetched in one slice per group
            ahead = [line for r in (r0 + K1, r0 + K1 + 1) if r < height
                     for line in range((x + r * width * stride) // LINE,
                                       (x + (r + 1) * width * stride + LINE - 1) // LINE)]
            per = -(-len(ahead) // groups)
            for g in range(groups):
                sl = ahead[g * per:(g + 1) * per]
                seen = set()
                for _ in range(walks):
                    oj = 0
                    while oj < wo:
                        if sl:
                            l2.access(sl.pop(0))
                        step = windows if oj + windows <= wo and inside(oj) and \
                            inside(oj + windows - 1) else 1
                        j0 = 2 * oj - PAD
                        for r in rows:
                            for c in range(j0, j0 + K1 + 2 * (step - 1)):
                                if 0 <= c < width:
                                    line = (x + (r * width + c) * stride + g * LINE) // LINE
                                    seen.add(line)
                                    load(line)
                                    n["loads"] += 1
                        oj += step
                n["bound"] -= len(seen)
                for line in sl:
                    l2.access(line)
    n["bound"] += n["loads"]
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(REFERENCE_CONFIGS),
                   default=["llava15-7b", "siglip-so400m"])
    p.add_argument("--channels", nargs="+", type=int,
                   help="also each config's grid with these channel counts")
    p.add_argument("--walk", choices=["group", "blocks"],
                   help="the walk for every dtype (default: the kernel's, bf16 group, fp32 blocks)")
    args = p.parse_args(argv)
    print("config           C     dtype  walk    loads    L1      L2      mem    L1 bound")
    for name in args.configs:
        cfg = REFERENCE_CONFIGS[name]
        for channels in [cfg.channels] + [c for c in args.channels or [] if c != cfg.channels]:
            for dtype, size in (("bf16", 2), ("fp32", 4)):
                walk = args.walk or kernel_walk(size)
                n = max_forward_loads(cfg.height, cfg.width, channels, cfg.prefix, size,
                                      walk=walk)
                f = {k: n[k] / n["loads"] for k in ("L1", "L2", "mem", "bound")}
                print(f"{name:16} {channels:<5} {dtype:6} {walk:7} {n['loads']:<8} {f['L1']:6.1%}  "
                      f"{f['L2']:6.1%}  {f['mem']:5.1%}  {f['bound']:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
