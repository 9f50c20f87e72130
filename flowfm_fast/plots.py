"""PNG figures: real windows beside reconstructed and generated ones, one panel row per channel."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_windows(path, rows: dict[str, np.ndarray], channels, hz: float = 30.0, max_windows: int = 4) -> Path:
    """``rows`` maps a title ("real", "reconstructed", ...) to windows (N, C, L) in physical units."""
    import matplotlib   # lazy: only sampling and reports draw, and matplotlib costs start-up time
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = min(max_windows, min(len(v) for v in rows.values()))
    C = next(iter(rows.values())).shape[1]
    fig, axes = plt.subplots(C, n, figsize=(3.2 * n, 1.6 * C + 0.6), squeeze=False, sharex=True)
    colors = ["k", "tab:blue", "tab:orange", "tab:green"]
    for j in range(n):
        for c in range(C):
            ax = axes[c, j]
            for k, name in enumerate(names):
                w = rows[name][j, c]
                ax.plot(np.arange(w.shape[0]) / hz, w, color=colors[k % len(colors)], lw=0.8,
                        alpha=1.0 if k == 0 else 0.8, label=name)
            if j == 0:
                ax.set_ylabel(channels[c] if c < len(channels) else f"ch{c}", fontsize=8)
            if c == C - 1:
                ax.set_xlabel("s", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
