"""What the CLI and the demo train and evaluate on: HAPT, synthetic windows, or user files."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import ACTIVITIES, DataError, Standardizer, WindowSet, load_hapt, load_windows, make_synthetic


@dataclass
class Bundle:
    """Standardised windows: ``pretrain`` (unlabelled ok), labelled ``train`` / ``test`` (may be None)."""
    pretrain: WindowSet
    train: WindowSet | None
    test: WindowSet | None
    standardizer: Standardizer
    channels: tuple[str, ...]
    classes: tuple[str, ...]


def load_bundle(data: str = "hapt", test_data: str | None = None, gyro: bool = False,
                standardizer: Standardizer | None = None, length: int | None = 300) -> Bundle:
    """``data`` is ``hapt``, ``synthetic`` or a .npy/.npz path (then ``test_data`` may give the
    held-out labelled windows). A given ``standardizer`` (from a checkpoint) is used as is.
    ``length=None`` takes a user file's own window length (HAPT and synthetic then use 300)."""
    if data in ("hapt", "synthetic") and length is None:
        length = 300
    if data == "hapt":
        h = load_hapt(length=length, gyro=gyro)
        if standardizer is not None and not (np.allclose(standardizer.mean, h.standardizer.mean)
                                             and np.allclose(standardizer.std, h.standardizer.std)):
            raise DataError("the checkpoint's standardisation does not match HAPT's training split "
                            "(was it trained on other data or channels?)")
        return Bundle(h.pretrain, h.train, h.test, h.standardizer, h.channels, h.classes)
    if data == "synthetic":
        pre = make_synthetic(n=512, length=length, seed=0)
        train = make_synthetic(n=256, length=length, seed=1)
        test = make_synthetic(n=128, length=length, seed=2)
        std = standardizer or Standardizer.fit(pre.x)
        sets = [WindowSet(std.apply(w.x), w.y, w.subject) for w in (pre, train, test)]
        return Bundle(*sets, std, ("x", "y", "z"), tuple(f"class{i}" for i in range(4)))
    raw = load_windows(data, length=length)
    std = standardizer or Standardizer.fit(raw.x)
    if len(std.mean) != raw.x.shape[1]:
        raise DataError(f"{data}: has {raw.x.shape[1]} channels, the standardisation has {len(std.mean)}")
    pre = WindowSet(std.apply(raw.x), raw.y, raw.subject)
    labelled = pre.subset(pre.y >= 0) if pre.y is not None else None
    test = None
    if test_data is not None:
        t = load_windows(test_data, channels=raw.x.shape[1], length=raw.x.shape[2])
        if t.y is None:
            raise DataError(f"{test_data}: the test windows need labels 'y'")
        test = WindowSet(std.apply(t.x), t.y, t.subject)
    channels = tuple(f"ch{i}" for i in range(raw.x.shape[1]))
    n_classes = int(max(labelled.y.max() if labelled is not None and len(labelled) else -1,
                        test.y.max() if test is not None else -1)) + 1
    classes = ACTIVITIES if n_classes == 6 else tuple(f"class{i}" for i in range(n_classes))
    return Bundle(pre, labelled, test, std, channels, classes)
