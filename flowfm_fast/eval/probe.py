"""Representation quality: frozen-feature linear probe and label subsets."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@torch.no_grad()
def encode_windows(encoder: torch.nn.Module, x: np.ndarray, batch: int = 512, device="cpu") -> np.ndarray:
    """Frozen features (N, z_dim) of standardised windows, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = [encoder(torch.from_numpy(x[i:i + batch]).to(device)).float().cpu() for i in range(0, len(x), batch)]
    encoder.train(was_training)
    return torch.cat(out).numpy()


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified ``fraction`` of the labelled windows (at least one per class)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(idx))))
        picks.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picks))


def per_class_subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` labelled windows of every class, drawn at random (all of a class's
    windows where it has fewer): the few-label regime where pretraining has to pay."""
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picks.append(rng.choice(idx, size=min(int(per_class), len(idx)), replace=False))
    return np.sort(np.concatenate(picks))


def linear_probe(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray,
                 C: float = 1.0, max_iter: int = 3000) -> dict:
    """Logistic regression on standardised frozen features; macro-F1 and accuracy on the test set."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(f_train, y_train)
    pred = clf.predict(f_test)
    return {"macro_f1": float(f1_score(y_test, pred, average="macro")), "accuracy": float(accuracy_score(y_test, pred))}


def probe_scores(encoder: torch.nn.Module, train, test, fraction: float = 1.0, seeds=(0,), device="cpu") -> list[float]:
    """Linear-probe macro-F1 of ``encoder`` for each seed's ``fraction`` of the labelled ``train``
    windows (one score at fraction 1.0); features are encoded once."""
    f_train = encode_windows(encoder, train.x, device=device)
    f_test = encode_windows(encoder, test.x, device=device)
    scores = []
    for seed in (seeds if fraction < 1.0 else tuple(seeds)[:1]):
        idx = label_subset(train.y, fraction, seed)
        scores.append(linear_probe(f_train[idx], train.y[idx], f_test, test.y)["macro_f1"])
    return scores


def probe_per_class(encoder: torch.nn.Module, train, test, per_class=(1, 2, 5, 10), draws: int = 10,
                    device="cpu") -> dict[int, list[float]]:
    """Linear-probe macro-F1 with ``k`` labelled windows per class, for each ``k`` in ``per_class``
    and each of ``draws`` random draws of those windows (draw ``d`` uses seed ``d``, the same
    windows for every encoder probed with the same ``k``); features are encoded once."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    f_train = encode_windows(encoder, train.x, device=device)
    f_test = encode_windows(encoder, test.x, device=device)
    out = {}
    for k in per_class:
        out[int(k)] = [linear_probe(f_train[idx], train.y[idx], f_test, test.y)["macro_f1"]
                       for idx in (per_class_subset(train.y, k, d) for d in range(draws))]
    return out
