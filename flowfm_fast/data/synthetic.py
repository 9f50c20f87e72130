"""Synthetic wearable-like windows for fast tests: each class is a mix of sinusoids with its
own frequencies and axis gains plus a gravity offset; subjects differ by small gain changes."""
from __future__ import annotations

import numpy as np

from .windows import WindowSet


def make_synthetic(n: int = 256, channels: int = 3, length: int = 300, classes: int = 4, subjects: int = 6,
                   noise: float = 0.1, seed: int = 0) -> WindowSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    subject = rng.integers(0, subjects, n)
    t = np.arange(length, dtype=np.float64) / 30.0
    class_rng = np.random.default_rng(1234)
    freqs = class_rng.uniform(0.3, 3.0, (classes, 2))
    gains = class_rng.uniform(0.2, 1.0, (classes, channels))
    gravity = class_rng.normal(0, 0.5, (classes, channels))
    subj_gain = 1.0 + 0.1 * rng.standard_normal((subjects, channels))
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    wave = (np.sin(2 * np.pi * freqs[y, 0, None] * t + phase[:, :1])
            + 0.5 * np.sin(2 * np.pi * freqs[y, 1, None] * t + phase[:, 1:]))         # (n, L)
    x = gravity[y][:, :, None] + gains[y][:, :, None] * subj_gain[subject][:, :, None] * wave[:, None, :]
    x += noise * rng.standard_normal(x.shape)
    return WindowSet(x.astype(np.float32), y.astype(np.int64), subject.astype(np.int64))
