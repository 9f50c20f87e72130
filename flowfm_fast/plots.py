"""PNG figures: real windows beside reconstructed and generated ones, one panel row per channel."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# The unit of a channel, by its name's prefix: the HAPT smartphone's accelerometer reads in g, its
# gyroscope in rad/s. Channels of user data (ch0, ...) are in whatever units the user's arrays are.
UNITS = {"acc": "g", "gyro": "rad/s"}


def channel_label(name: str) -> str:
    """``acc-x [g]``; a name without a known unit stays as it is."""
    unit = next((u for prefix, u in UNITS.items() if name.startswith(prefix)), None)
    return f"{name} [{unit}]" if unit else name


def plot_windows(path, rows: dict[str, np.ndarray], channels, hz: float = 30.0, max_windows: int = 4,
                 titles: Sequence[str] | None = None, note: str | None = None) -> Path:
    """``rows`` maps a name ("real", "reconstructed", ...) to windows (N, C, L) in physical units;
    ``titles``: one per window column (the activity of each real window); ``note``: a line drawn
    above the panels (say there what the reader could misread, such as unpaired rows)."""
    import matplotlib   # lazy: only sampling and reports draw, and matplotlib costs start-up time
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = min(max_windows, min(len(v) for v in rows.values()))
    C = next(iter(rows.values())).shape[1]
    fig, axes = plt.subplots(C, n, figsize=(3.2 * n, 1.6 * C + (1.0 if note else 0.6)), squeeze=False, sharex=True)
    colors = ["k", "tab:blue", "tab:orange", "tab:green"]
    for j in range(n):
        for c in range(C):
            ax = axes[c, j]
            for k, name in enumerate(names):
                w = rows[name][j, c]
                ax.plot(np.arange(w.shape[0]) / hz, w, color=colors[k % len(colors)], lw=0.8,
                        alpha=1.0 if k == 0 else 0.8, label=name)
            if j == 0:
                ax.set_ylabel(channel_label(channels[c]) if c < len(channels) else f"ch{c}", fontsize=8)
            if c == C - 1:
                ax.set_xlabel("time [s]", fontsize=8)
            if c == 0 and titles is not None and j < len(titles):
                ax.set_title(titles[j], fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    if note:
        fig.suptitle(note, fontsize=8)
    return save_figure(fig, path)


def plot_label_efficiency(path, curves: dict[str, dict[float, Sequence[float]]],
                          title: str = "linear probe, held-out subjects") -> Path:
    """Macro-F1 (mean and sd over draws) against labelled windows per class, log x: one line per
    encoder in ``curves`` (name -> {labelled windows per class: [score per draw]})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, points in curves.items():
        xs = sorted(points)
        means = [float(np.mean(points[x])) for x in xs]
        sds = [float(np.std(points[x], ddof=1)) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=sds, marker="o", ms=3, capsize=2, lw=1, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labelled windows per class (log scale)", fontsize=8)
    ax.set_ylabel("macro-F1", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out, write as PNG (110 dpi, parent folders made) and close ``fig``; its path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
