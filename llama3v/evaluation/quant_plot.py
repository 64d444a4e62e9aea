"""The quant-report's pictures, drawn with matplotlib (the optional extra `llama3v[report]`).

Two plots: total size against mean KL (one point per combination; a second panel of accuracy
against size when the rows carry an accuracy), and mmproj size against encode time (one point
per mmproj type). KL spans decades (q8_0 ~1e-3, q2_k ~5), so its axis is logarithmic; a KL of
exactly 0 (the f32 pair against itself) has no logarithm, so when one is present the axis is
symmetric-log with its linear part below the smallest positive KL, and 0 sits on the bottom edge.
Figures are made without pyplot, so drawing never touches a caller's matplotlib backend or state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from llama3v.errors import Llama3vError


@dataclass
class Point:
    """One combination: total size in MiB, mean KL, its label (mmproj type), the group that picks its colour
    (model type) and, where the report measured one, the fraction of answers correct."""

    size_mib: float
    kl: float
    label: str
    group: str
    accuracy: float | None = None


def require_matplotlib() -> None:
    """Raise a clean error naming the extra to install when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise Llama3vError("quant-report draws its plots with matplotlib: pip install 'llama3v[report]'") from e


def _figure(n_panels: int):  # -> matplotlib.figure.Figure
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 4.8 * n_panels), dpi=100, layout="constrained")
    fig.subplots(n_panels, 1, sharex=True, squeeze=False)
    return fig


def draw_size_vs_kl(points: list[Point], path: Path, title: str):  # -> matplotlib.figure.Figure
    """Write size (x) against mean KL (y, log) to the PNG `path`, plus an accuracy panel when points have one."""
    with_accuracy = [p for p in points if p.accuracy is not None]
    fig = _figure(2 if with_accuracy else 1)
    ax, *rest = fig.axes
    groups = list(dict.fromkeys(p.group for p in points))
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for g in groups:
        mine = [p for p in points if p.group == g]
        ax.scatter([p.size_mib for p in mine], [p.kl for p in mine], label=g, edgecolors=colors[g],
                   c=[colors[g] if p.kl > 0 else "white" for p in mine], zorder=3)
    positive = [p.kl for p in points if p.kl > 0]
    floor = 10.0 ** math.floor(math.log10(min(positive))) if positive else 1e-6
    if len(positive) < len(points):
        ax.set_yscale("symlog", linthresh=floor)
        ax.set_ylim(bottom=0)
    else:
        ax.set_yscale("log")
    for p in points:
        ax.annotate(p.label, (p.size_mib, p.kl), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_ylabel("mean KL to the f32 pair (nats)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(title="model type", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if rest:
        acc = rest[0]
        for g in groups:
            mine = [p for p in with_accuracy if p.group == g]
            acc.scatter([p.size_mib for p in mine], [100 * p.accuracy for p in mine], color=colors[g], zorder=3)
        for p in with_accuracy:
            acc.annotate(p.label, (p.size_mib, 100 * p.accuracy), xytext=(5, 4), textcoords="offset points",
                         fontsize=8)
        acc.set_ylim(0, 100)
        acc.set_ylabel("accuracy (%)")
        acc.grid(True, alpha=0.3)
    fig.axes[-1].set_xlabel("mmproj + model size (MiB)")
    fig.savefig(path)
    return fig


def draw_encode_vs_size(per_mmproj: dict[str, tuple[float, float]], path: Path, title: str):  # -> Figure
    """Write mmproj size (x, MiB) against encode time per image (y, ms), one labelled point per type, to `path`."""
    fig = _figure(1)
    ax = fig.axes[0]
    sizes, times = zip(*per_mmproj.values(), strict=True)
    ax.scatter(sizes, times, zorder=3)
    for label, (size, ms) in per_mmproj.items():
        ax.annotate(label, (size, ms), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_xlim(0, max(sizes) * 1.1)  # room for the labels
    ax.set_ylim(0, max(times) * 1.1)
    ax.set_xlabel("mmproj size (MiB)")
    ax.set_ylabel("encode time per image (ms, median)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.savefig(path)
    return fig
