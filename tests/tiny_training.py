"""The small synthetic training setup the training tests share: 64 windows of length L, tiny model."""
from __future__ import annotations

from flowfm_fast.data import Standardizer, make_synthetic
from flowfm_fast.models import get_config

L = 60


def synthetic_windows():
    """(standardised windows, their Standardizer)."""
    ws = make_synthetic(n=64, channels=3, length=L, classes=4, seed=0)
    std = Standardizer.fit(ws.x)
    return std.apply(ws.x), std


def model_cfg(**kw):
    return get_config("tiny", length=L, **kw)
