"""PNG plots of benchmark rows (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import Row  # noqa: E402


def _groups(rows: List[Row]) -> Dict[str, List[Row]]:
    out: Dict[str, List[Row]] = {}
    for r in rows:
        pool = ", max pool" if "pool=max" in (r.note or "") else ""
        out.setdefault(f"{r.config}, B={r.batch}, {r.dtype}{pool}", []).append(r)
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _paired_bars(rows: List[Row], path: Path, title: str, left, right, ylabel: str,
                 annotate: bool, ylim_one: bool) -> Path:
    """One panel per problem, two bars (forward, forward+backward) per implementation."""
    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups), 4.2), squeeze=False)
    for ax, (label, rs) in zip(axes[0], groups.items()):
        x = range(len(rs))
        a = [left(r) or 0 for r in rs]
        b = [right(r) or 0 for r in rs]
        ax.bar([i - 0.2 for i in x], a, width=0.4, label="forward")
        ax.bar([i + 0.2 for i in x], b, width=0.4, label="forward+backward")
        if annotate:
            for i, (f, g) in enumerate(zip(a, b)):
                ax.annotate(f"{f:.3g}", (i - 0.2, f), ha="center", va="bottom", fontsize=8)
                ax.annotate(f"{g:.3g}", (i + 0.2, g), ha="center", va="bottom", fontsize=8)
        if ylim_one:
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0, max(1.05, max(a + b) * 1.1))
        ax.set_xticks(list(x), [r.backend for r in rs])
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_op_latency(rows: List[Row], path: Path, title: str) -> Path:
    """Forward and forward+backward latency of each implementation, one panel per problem."""
    return _paired_bars([r for r in rows if r.kind == "op"], path, title,
                        lambda r: r.fwd_ms, lambda r: r.fwd_bwd_ms,
                        "ms (median, lower is better)", annotate=True, ylim_one=False)


def plot_bandwidth_fraction(rows: List[Row], path: Path, title: str) -> Path:
    """Achieved bytes/s as a fraction of the same-run device copy, by implementation."""
    return _paired_bars([r for r in rows if r.kind == "op" and r.bw_fraction is not None],
                        path, title, lambda r: r.bw_fraction, lambda r: r.fwd_bwd_bw_fraction,
                        "fraction of device copy bandwidth", annotate=False, ylim_one=True)


def plot_projectors(rows: List[Row], path: Path, title: str) -> Path:
    """Per projector: forward, forward+backward, and the LLM layers' time over its tokens."""
    rs = [r for r in rows if r.kind == "projector" and r.fwd_ms is not None]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rs) + 1.8))
    y = list(range(len(rs)))
    h = 0.27
    ax.barh([i - h for i in y], [r.fwd_ms for r in rs], height=h, label="projector forward")
    ax.barh(y, [r.fwd_bwd_ms or 0 for r in rs], height=h, label="projector forward+backward")
    if any(r.llm_ms for r in rs):
        ax.barh([i + h for i in y], [r.llm_ms or 0 for r in rs], height=h,
                label="LLM layers over its tokens (forward)")
    for i, r in enumerate(rs):
        ax.annotate(f"{r.fwd_ms:.3g}", (r.fwd_ms, i - h), va="center", fontsize=7,
                    xytext=(2, 0), textcoords="offset points")
        if r.fwd_bwd_ms:
            ax.annotate(f"{r.fwd_bwd_ms:.3g}", (r.fwd_bwd_ms, i), va="center", fontsize=7,
                        xytext=(2, 0), textcoords="offset points")
    ax.set_yticks(y, [f"{r.name} ({r.out_tokens} tok, {r.params / 1e6:.1f}M)" for r in rs])
    ax.invert_yaxis()
    ax.set_xlabel("ms (median, lower is better)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_sweep(rows: List[Row], path: Path, title: str) -> Path:
    """Forward latency against the number of input patch tokens, one line per projector."""
    rs = [r for r in rows if r.kind == "sweep"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in dict.fromkeys(r.name for r in rs):
        pts = sorted((r.in_tokens, r.fwd_ms) for r in rs if r.name == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("input patch tokens (square grid)")
    ax.set_ylabel("forward ms (median)")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_varlen(rows: List[Row], path: Path, title: str) -> Path:
    """Per mix and dtype: forward and forward+backward latency (left) and peak memory (right)
    of the packed op, the per-image loop and padding to the largest grid."""
    groups: Dict[str, List[Row]] = {}
    for r in rows:
        groups.setdefault(f"{r.config} ({r.batch} images), {r.dtype}", []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    for (ax_t, ax_m), (label, rs) in zip(axes, groups.items()):
        x = list(range(len(rs)))
        fwd = [r.fwd_ms or 0 for r in rs]
        fb = [r.fwd_bwd_ms or 0 for r in rs]
        ax_t.bar([i - 0.2 for i in x], fwd, width=0.4, label="forward")
        ax_t.bar([i + 0.2 for i in x], fb, width=0.4, label="forward+backward")
        for i, (f, g) in enumerate(zip(fwd, fb)):
            ax_t.annotate(f"{f:.3g}", (i - 0.2, f), ha="center", va="bottom", fontsize=8)
            ax_t.annotate(f"{g:.3g}", (i + 0.2, g), ha="center", va="bottom", fontsize=8)
        ax_t.set_ylabel("ms (median, lower is better)")
        ax_t.legend(fontsize=8)
        mem = [r.peak_mem_mb or 0 for r in rs]
        ax_m.bar(x, mem, color="tab:green")
        for i, m in enumerate(mem):
            ax_m.annotate(f"{m:.3g}", (i, m), ha="center", va="bottom", fontsize=8)
        ax_m.set_ylabel("peak memory, MiB (fwd+bwd)")
        for ax in (ax_t, ax_m):
            ax.set_xticks(x, [r.backend for r in rs], fontsize=8)
            ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)
