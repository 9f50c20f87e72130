"""Window containers and the windowing / standardisation shared by every data source."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WindowSet:
    """Windows x (N, C, L) float32, optional labels y (N,) int64 (-1 = unlabelled) and subjects (N,)."""
    x: np.ndarray
    y: np.ndarray | None = None
    subject: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx) -> "WindowSet":
        pick = (lambda a: None if a is None else a[idx])
        return WindowSet(self.x[idx], pick(self.y), pick(self.subject))


@dataclass
class Standardizer:
    """Per-channel ``(x - mean) / std``, fitted on the training split only."""
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, samples: np.ndarray) -> "Standardizer":
        """``samples`` is (C, N) or windows (N, C, L)."""
        flat = samples if samples.ndim == 2 else samples.transpose(1, 0, 2).reshape(samples.shape[1], -1)
        mean = flat.mean(axis=1, dtype=np.float64)
        std = flat.std(axis=1, dtype=np.float64)
        return cls(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean[None, :, None]) / self.std[None, :, None]).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        return (x * self.std[None, :, None] + self.mean[None, :, None]).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def sliding_windows(signal: np.ndarray, length: int, hop: int) -> np.ndarray:
    """(C, N) -> (W, C, length) windows starting every ``hop`` samples (copies)."""
    n = signal.shape[1]
    if n < length:
        return np.empty((0, signal.shape[0], length), signal.dtype)
    starts = np.arange(0, n - length + 1, hop)
    return np.stack([signal[:, s:s + length] for s in starts])


def majority_labels(labels: np.ndarray, length: int, hop: int, valid: np.ndarray, min_cover: float):
    """For each window: the label covering >= ``min_cover`` of it among ``valid`` labels, else -1."""
    n = labels.shape[0]
    if n < length:
        return np.empty((0,), np.int64)
    out = []
    for s in range(0, n - length + 1, hop):
        seg = labels[s:s + length]
        vals, counts = np.unique(seg, return_counts=True)
        best = int(np.argmax(counts))
        ok = vals[best] in valid and counts[best] >= min_cover * length
        out.append(int(vals[best]) if ok else -1)
    return np.asarray(out, np.int64)
