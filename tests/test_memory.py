"""Resident memory stays flat over 1,000 sampling calls and 1,000 training steps (tiny model, CPU).

Memory is read every ``EVERY`` iterations after a warm-up (first-touch pages, allocator pools, lazy
inits); a leak shows as growth across the run. RSS gets a small absolute slack over its
post-warm-up level (allocator noise) and a bound on its growth rate over the second half. RSS alone
misses a leak that fits in heap memory freed earlier (still resident, so reuse does not show), so
where glibc can say (mallinfo2) the bytes malloc has handed out and not had back are bounded too:
they are flat to a few KiB in a healthy run, and a leaked (4, 3, 60) float32 window per call adds
~3 KiB an iteration.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import numpy as np
import pytest
import torch

from flowfm_fast.models import get_config
from flowfm_fast.models.flowfm import FlowFM

ITERS = 1000
WARMUP = 50
EVERY = 25
RSS_SLACK_MB = 24.0
RSS_KB_PER_ITER = 4.0
HEAP_SLACK_MB = 2.0
HEAP_KB_PER_ITER = 1.0

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):   # not glibc, or glibc < 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use_mb() -> float | None:
    """Bytes malloc has handed out and not had back (heap chunks + mmapped blocks), or None."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return (m.uordblks + m.hblkhd) / 2 ** 20


def _assert_flat_series(its: np.ndarray, mb: np.ndarray, slack_mb: float, kb_per_iter: float, what: str) -> None:
    report = (f"{what}: {mb[0]:.2f} -> {mb[-1]:.2f} MB (max {mb.max():.2f}) over iterations "
              f"{int(its[0])}..{int(its[-1])}")
    assert mb.max() - mb[0] < slack_mb, report
    half = its >= its[0] + (its[-1] - its[0]) / 2
    slope_kb = np.polyfit(its[half], mb[half], 1)[0] * 1024
    assert slope_kb < kb_per_iter, f"{report}; the second half grows {slope_kb:.2f} KiB/iteration"


def _assert_flat(samples: list[tuple[int, float, float | None]], what: str) -> None:
    """samples: (iteration, RSS MB, heap in use MB or None), from the end of the warm-up on."""
    its = np.array([s[0] for s in samples], float)
    _assert_flat_series(its, np.array([s[1] for s in samples]), RSS_SLACK_MB, RSS_KB_PER_ITER, f"{what} RSS")
    if samples[0][2] is not None:
        _assert_flat_series(its, np.array([s[2] for s in samples]), HEAP_SLACK_MB, HEAP_KB_PER_ITER,
                            f"{what} heap in use")


def _sample(i: int) -> tuple[int, float, float | None]:
    gc.collect()   # cycles the collector would free anyway are not a leak
    return i, rss_mb(), heap_in_use_mb()


def _due(i: int) -> bool:
    """Whether to measure after iteration i (1-based)."""
    return i >= WARMUP and (i - WARMUP) % EVERY == 0


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return FlowFM(get_config("tiny", length=60))


def test_sampling_does_not_grow_resident_memory(tiny_model):
    """1,000 FlowFM.sample calls (batch 4, one step), cycling the solvers: Euler's in-place step and
    the multi-stage combine both run."""
    model = tiny_model.eval()
    z = torch.randn(4, model.cfg.encoder.z_dim)
    methods = ("euler", "midpoint", "heun", "rk4")
    gen = torch.Generator().manual_seed(0)

    samples = []
    for i in range(1, ITERS + 1):
        x = model.sample(z, steps=1, method=methods[i % len(methods)], generator=gen)
        if _due(i):
            samples.append(_sample(i))
    assert x.shape == (4, model.cfg.channels, 60)
    _assert_flat(samples, "sampling")


def test_training_does_not_grow_resident_memory(tmp_path):
    """1,000 steps of the real training loop (augmentation, AdamW, EMA, grad clipping, metrics log),
    measured from its per-step callback."""
    from flowfm_fast.data import Standardizer, make_synthetic
    from flowfm_fast.train import TrainConfig, train_flowfm

    w = make_synthetic(n=64, length=60, seed=0)
    std = Standardizer.fit(w.x)
    samples = []

    def callback(step, _seconds, _model):
        if _due(step):
            samples.append(_sample(step))

    cfg = TrainConfig(steps=ITERS, batch_size=4, seed=0, warmup_steps=10, ckpt_every=ITERS)
    res = train_flowfm(get_config("tiny", length=60), std.apply(w.x), cfg, tmp_path / "run", std,
                       progress=False, callback=callback)
    assert res.step == ITERS and np.isfinite(res.last_loss)
    _assert_flat(samples, "training")
