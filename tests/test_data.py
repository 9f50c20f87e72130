"""Data: HAPT preparation and cache, the whitelisting unpickler, user arrays, synthetic windows,
standardisation."""
from __future__ import annotations

import contextlib
import copyreg
import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flowfm_fast.data import (DataError, Standardizer, TEST_SUBJECTS, WindowSet, load_hapt, load_windows,
                              make_synthetic)
from flowfm_fast.data import hapt as hapt_mod
from flowfm_fast.data import safe_pickle
from flowfm_fast.data.safe_pickle import UnsafePickleError, WhitelistUnpickler, safe_loads

EXPECTED_TEST_SUBJECTS = (2, 4, 9, 10, 12, 13, 18, 20, 24)


# --------------------------------------------------------------------------------------------------
# HAPT fixtures: one cache directory per session, one preparation.
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _cache_env(path):
    old = os.environ.get("FLOWFM_CACHE")
    os.environ["FLOWFM_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLOWFM_CACHE", None)
        else:
            os.environ["FLOWFM_CACHE"] = old


@pytest.fixture(scope="session")
def hapt_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flowfm_cache")


@pytest.fixture(scope="session")
def hapt(hapt_cache_dir):
    with _cache_env(hapt_cache_dir):
        return load_hapt()


@pytest.fixture(scope="session")
def hapt_gyro(hapt, hapt_cache_dir):
    with _cache_env(hapt_cache_dir):
        return load_hapt(gyro=True)


@pytest.fixture(scope="session")
def hapt_cache_file(hapt, hapt_cache_dir):
    files = sorted(Path(hapt_cache_dir).glob("hapt-*.npz"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="session")
def recordings_30hz():
    """[(subject, signals (6, N) at 30 Hz, labels (N,))] rebuilt from the package's source file."""
    recs = hapt_mod.read_recordings(hapt_mod.find_source())
    return [(s, *hapt_mod.resample(sig, lab)) for s, sig, lab in recs]


# --------------------------------------------------------------------------------------------------
# HAPT views
# --------------------------------------------------------------------------------------------------

def test_hapt_eval_window_counts(hapt):
    assert len(hapt.train) == 1420
    assert len(hapt.test) == 571


def test_hapt_labels_are_the_six_basic_activities(hapt):
    assert len(hapt.classes) == 6
    for split in (hapt.train, hapt.test):
        assert split.y.dtype == np.int64
        assert set(np.unique(split.y).tolist()) == set(range(6))


def test_hapt_subject_split(hapt):
    assert tuple(TEST_SUBJECTS) == EXPECTED_TEST_SUBJECTS
    train_s, test_s = set(hapt.train.subject.tolist()), set(hapt.test.subject.tolist())
    assert train_s.isdisjoint(test_s)
    assert tuple(sorted(test_s)) == EXPECTED_TEST_SUBJECTS
    assert len(train_s) == 21
    assert train_s.isdisjoint(EXPECTED_TEST_SUBJECTS)
    assert train_s | test_s == set(range(1, 31))


def test_hapt_window_shapes_and_dtypes(hapt, hapt_gyro):
    for split in (hapt.pretrain, hapt.train, hapt.test):
        assert split.x.ndim == 3 and split.x.shape[1:] == (3, 300)
        assert split.x.dtype == np.float32
        assert np.isfinite(split.x).all()
        assert split.y.shape == split.subject.shape == (len(split),)
    assert hapt.channels == ("acc-x", "acc-y", "acc-z")
    for split, acc in ((hapt_gyro.pretrain, hapt.pretrain), (hapt_gyro.train, hapt.train),
                       (hapt_gyro.test, hapt.test)):
        assert split.x.shape == (len(acc), 6, 300)
        assert split.x.dtype == np.float32
        np.testing.assert_array_equal(split.x[:, :3], acc.x)   # per-channel standardisation
        np.testing.assert_array_equal(split.y, acc.y)
    assert len(hapt_gyro.channels) == 6
    assert hapt_gyro.standardizer.mean.shape == (6,)


def test_hapt_pretrain_view(hapt):
    pre = hapt.pretrain
    pre_s = set(pre.subject.tolist())
    assert pre_s == set(hapt.train.subject.tolist())
    assert pre_s.isdisjoint(EXPECTED_TEST_SUBJECTS)
    # 1 s hop instead of 5 s, and windows without a dominant basic activity are kept.
    assert len(pre) > 5 * len(hapt.train)
    assert set(np.unique(pre.y).tolist()) <= set(range(-1, 6))
    unlabelled = float(np.mean(pre.y == -1))
    assert 0.1 < unlabelled < 0.9, unlabelled
    assert set(np.unique(pre.y[pre.y >= 0]).tolist()) == set(range(6))
    # Eval windows start every 150 samples, pretraining windows every 30: the first train window
    # of a subject is also a pretraining window with the same label.
    s = int(hapt.train.subject[0])
    cand = pre.x[pre.subject == s]
    d = np.abs(cand - hapt.train.x[0]).reshape(len(cand), -1).max(axis=1)
    j = int(np.argmin(d))
    assert d[j] == 0.0
    assert pre.y[pre.subject == s][j] == hapt.train.y[0]


def test_hapt_standardisation_is_fitted_on_training_subjects_only(hapt, recordings_30hz):
    train_sig = np.concatenate([sig[:3] for s, sig, _ in recordings_30hz if s not in EXPECTED_TEST_SUBJECTS],
                               axis=1).astype(np.float64)
    all_sig = np.concatenate([sig[:3] for _, sig, _ in recordings_30hz], axis=1).astype(np.float64)
    mean, std = train_sig.mean(axis=1), train_sig.std(axis=1)
    np.testing.assert_allclose(hapt.standardizer.mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hapt.standardizer.std, std, rtol=1e-4, atol=1e-5)
    # ... and not on all subjects (the two differ enough to tell apart).
    assert np.max(np.abs(all_sig.mean(axis=1) - mean)) > 1e-3
    assert not np.allclose(hapt.standardizer.mean, all_sig.mean(axis=1), rtol=1e-4, atol=1e-5)
    assert hapt.standardizer.mean.dtype == np.float32


def test_hapt_standardised_windows_statistics(hapt):
    for split in (hapt.pretrain, hapt.train):
        m = split.x.mean(axis=(0, 2))
        s = split.x.std(axis=(0, 2))
        assert np.all(np.abs(m) < 0.2), m
        assert np.all(np.abs(s - 1) < 0.15), s
    # The pretraining windows cover the training recordings almost uniformly: tighter.
    m = hapt.pretrain.x.mean(axis=(0, 2))
    assert np.all(np.abs(m) < 0.1), m


def _first_basic_window(sig30, lab30, length=300, hop=150, cover=0.8):
    for start in range(0, lab30.shape[0] - length + 1, hop):
        vals, counts = np.unique(lab30[start:start + length], return_counts=True)
        k = int(np.argmax(counts))
        if 1 <= vals[k] <= 6 and counts[k] >= cover * length:
            return sig30[:3, start:start + length], int(vals[k]) - 1
    return None, None


def test_hapt_test_windows_use_training_statistics(hapt, recordings_30hz):
    std = hapt.standardizer
    checked = 0
    for subject in (2, 24):
        rec = next((sig, lab) for s, sig, lab in recordings_30hz if s == subject)
        raw, label = _first_basic_window(*rec)
        assert raw is not None
        expected = (raw.astype(np.float64) - std.mean[:, None].astype(np.float64)) / std.std[:, None].astype(np.float64)
        mine = hapt.test.x[hapt.test.subject == subject]
        d = np.abs(mine - expected[None]).reshape(len(mine), -1).max(axis=1)
        j = int(np.argmin(d))
        assert d[j] < 1e-4, d[j]
        assert hapt.test.y[hapt.test.subject == subject][j] == label
        checked += 1
    assert checked == 2


def test_resample_50_to_30_hz():
    t = np.arange(1000) / 50.0
    sig = np.stack([np.sin(2 * np.pi * 1.0 * t)] * 6)
    lab = np.repeat(np.arange(1, 11), 100)
    sig30, lab30 = hapt_mod.resample(sig, lab)
    assert sig30.shape == (6, 600) and sig30.dtype == np.float32
    assert lab30.shape == (600,)
    t30 = np.arange(600) / 30.0
    np.testing.assert_allclose(sig30[0, 50:-50], np.sin(2 * np.pi * t30[50:-50]), atol=0.02)
    # Labels follow time: label 2 covers 50 Hz samples 100..199, i.e. 2 s .. 4 s = 30 Hz samples 60..119.
    assert np.all(lab30[60:120] == 2) and lab30[59] == 1 and lab30[120] == 3


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------

def _no_prepare(*a, **k):
    raise AssertionError("_prepare was called although a valid cache exists")


def test_hapt_second_load_reads_cache(hapt, hapt_cache_dir, monkeypatch):
    monkeypatch.setenv("FLOWFM_CACHE", str(hapt_cache_dir))
    monkeypatch.setattr(hapt_mod, "_prepare", _no_prepare)
    again = load_hapt()
    for a, b in ((again.pretrain, hapt.pretrain), (again.train, hapt.train), (again.test, hapt.test)):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.subject, b.subject)
    np.testing.assert_array_equal(again.standardizer.mean, hapt.standardizer.mean)
    np.testing.assert_array_equal(again.standardizer.std, hapt.standardizer.std)


def test_hapt_cache_false_does_not_read_cache(hapt, hapt_cache_dir, monkeypatch):
    class Called(Exception):
        pass

    def spy(*a, **k):
        raise Called

    monkeypatch.setenv("FLOWFM_CACHE", str(hapt_cache_dir))
    monkeypatch.setattr(hapt_mod, "_prepare", spy)
    with pytest.raises(Called):
        load_hapt(cache=False)


def _truncate(b):
    return b[: len(b) // 2]


def _flip_middle(b):
    b = bytearray(b)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)




@pytest.mark.parametrize("kind", [
    "random-bytes",
    "empty",
    "truncated",
    "bit-flip",
    "missing-arrays",
])
def test_hapt_corrupted_cache_is_rebuilt(kind, hapt, hapt_cache_file, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    target = cache_dir / hapt_cache_file.name
    good = hapt_cache_file.read_bytes()
    if kind == "random-bytes":
        target.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(_truncate(good))
    elif kind == "bit-flip":
        target.write_bytes(_flip_middle(good))
    elif kind == "missing-arrays":
        np.savez(target, pre_x=np.zeros((1, 3, 300), np.float32))
    with np.load(hapt_cache_file) as z:
        arrays = {k: z[k] for k in z.files}
    calls = []

    def spy(*a, **k):   # stands in for the 8 s preparation; returns what it would
        calls.append(a)
        return arrays

    monkeypatch.setenv("FLOWFM_CACHE", str(cache_dir))
    monkeypatch.setattr(hapt_mod, "_prepare", spy)
    rebuilt = load_hapt()
    assert len(calls) == 1, "a damaged cache must be rebuilt"
    np.testing.assert_array_equal(rebuilt.train.x, hapt.train.x)
    np.testing.assert_array_equal(rebuilt.test.y, hapt.test.y)
    # The rebuilt cache is valid again and is what the next call reads.
    with np.load(target, allow_pickle=False) as z:
        assert set(z.files) == set(arrays)
        np.testing.assert_array_equal(z["mean"], arrays["mean"])
    monkeypatch.setattr(hapt_mod, "_prepare", _no_prepare)
    np.testing.assert_array_equal(load_hapt().test.x, hapt.test.x)
    assert not list(cache_dir.glob("*.tmp*")), "temporary cache file left behind"


# --------------------------------------------------------------------------------------------------
# Whitelisting unpickler
# --------------------------------------------------------------------------------------------------

class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Plain:
    def __init__(self):
        self.a = 1


def _global_call_p0(module: str, name: str, arg: str) -> bytes:
    """Protocol 0: GLOBAL module name; MARK; UNICODE arg; TUPLE; REDUCE."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


def _global_call_p2(module: str, name: str, arg: str) -> bytes:
    a = arg.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(a).to_bytes(4, "little") + a
            + b"\x85R.")


def _short_str(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _global_call_p45(module: str, name: str, arg: str, proto: int) -> bytes:
    """Protocol 4/5: SHORT_BINUNICODE module, name; STACK_GLOBAL; arg; TUPLE1; REDUCE."""
    return bytes([0x80, proto]) + _short_str(module) + _short_str(name) + b"\x93" + _short_str(arg) + b"\x85R."


def _inst_p0(module: str, name: str, arg: str) -> bytes:
    """Protocol 0 INST opcode: instantiates module.name(arg)."""
    return f"(V{arg}\ni{module}\n{name}\n.".encode()


def _all_variants(module, name, arg):
    return [_global_call_p0(module, name, arg), _global_call_p2(module, name, arg),
            _global_call_p45(module, name, arg, 4), _global_call_p45(module, name, arg, 5),
            _inst_p0(module, name, arg)]


def test_crafted_pickles_actually_work_with_plain_pickle(tmp_path):
    """Sanity: the hand-made pickles do what they claim when loaded without a whitelist."""
    for i, data in enumerate(_all_variants("os.path", "join", "abc")):
        assert pickle.loads(data) == "abc", i


@pytest.mark.parametrize("proto", [0, 1, 2, 3, 4, 5])
def test_os_system_pickle_refused_and_not_run(proto, tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=proto)
    with pytest.raises(UnsafePickleError):
        safe_loads(data)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("__builtin__", "eval"), ("builtins", "getattr"), ("builtins", "__import__"),
    ("subprocess", "Popen"), ("subprocess", "check_output"), ("numpy", "load"),
    ("numpy.lib.npyio", "load"), ("pandas", "read_csv"), ("pandas.io.parsers.readers", "read_csv"),
    ("pandas.core.frame", "read_csv"), ("copyreg", "_reconstructor_x"), ("copyreg", "__newobj__"),
    ("numpy", "frombuffer"), ("numpy._core.multiarray", "scalar"), ("_codecs", "decode"),
    ("pickle", "loads"), ("flowfm_fast.data.safe_pickle", "safe_loads"),
])
def test_non_whitelisted_globals_refused_in_every_protocol(module, name, tmp_path):
    marker = tmp_path / "pwned"
    for data in _all_variants(module, name, f"touch {marker}"):
        with pytest.raises(UnsafePickleError, match=name):
            safe_loads(data)
    assert not marker.exists()


@pytest.mark.parametrize("proto", [0, 2, 4, 5])
def test_real_dangerous_callables_pickled_by_pickle_are_refused(proto, tmp_path):
    marker = tmp_path / "pwned"
    for obj in (_Reduce(eval, (f"open({str(marker)!r}, 'w')",)),
                _Reduce(subprocess.Popen, (["touch", str(marker)],)),
                _Reduce(np.load, (str(marker),)),
                _Reduce(shutil.rmtree, (str(tmp_path),))):
        with pytest.raises(UnsafePickleError):
            safe_loads(pickle.dumps(obj, protocol=proto))
    assert not marker.exists()
    assert tmp_path.is_dir()


@pytest.mark.parametrize("proto", [0, 1, 2, 4, 5])
def test_plain_custom_class_refused(proto):
    # Protocols 0/1 use copyreg._reconstructor(cls, object, None), 2+ NEWOBJ: the class global is
    # not whitelisted either way.
    data = pickle.dumps(_Plain(), protocol=proto)
    with pytest.raises(UnsafePickleError):
        safe_loads(data)


@pytest.mark.parametrize("cls_module,cls_name,base", [
    ("numpy", "ndarray", "c__builtin__\nobject\n"),            # whitelisted global, not a stand-in
    ("__builtin__", "object", "c__builtin__\nobject\n"),
    ("__builtin__", "slice", "c__builtin__\nobject\n"),
    ("pandas.core.frame", "DataFrame", "c__builtin__\nslice\n"),  # stand-in with a foreign base
])
def test_reconstructor_limited_to_standins(cls_module, cls_name, base):
    data = (f"\x80\x02ccopy_reg\n_reconstructor\nc{cls_module}\n{cls_name}\n{base}N\x87R.").encode("latin1")
    with pytest.raises(UnsafePickleError):
        safe_loads(data)


def test_reconstructor_refuses_state_argument():
    data = b"\x80\x02ccopy_reg\n_reconstructor\ncpandas.core.frame\nDataFrame\nc__builtin__\nobject\nK\x01\x87R."
    with pytest.raises(UnsafePickleError):
        safe_loads(data)


def test_reconstructor_old_and_new_spellings_load_standins():
    old = b"\x80\x02ccopy_reg\n_reconstructor\ncpandas.core.frame\nDataFrame\nc__builtin__\nobject\nN\x87R}b."
    new = b"ccopyreg\n_reconstructor\n(cpandas.core.frame\nDataFrame\ncbuiltins\nobject\nNtR(dVk\nI1\nsb."
    for data in (old, new):
        df = safe_loads(data)
        assert isinstance(df, safe_pickle.DataFrameStandIn)
    assert safe_loads(new).state == {"k": 1}
    # find_class itself admits both spellings (not only through pickle's fix_imports mapping).
    for data in (old, new):
        obj = WhitelistUnpickler(io.BytesIO(data), fix_imports=False).load()
        assert isinstance(obj, safe_pickle.DataFrameStandIn)
    # ... and the old spelling of a forbidden name stays forbidden.
    with pytest.raises(UnsafePickleError):
        WhitelistUnpickler(io.BytesIO(_global_call_p2("__builtin__", "eval", "1")), fix_imports=False).load()


def test_slice_and_object_old_spelling():
    data = b"\x80\x02c__builtin__\nslice\nK\x01K\x05K\x02\x87R."
    assert safe_loads(data) == slice(1, 5, 2)
    assert type(safe_loads(b"\x80\x02c__builtin__\nobject\n)R.")) is object


def test_other_whitelisted_helpers_check_their_arguments():
    with pytest.raises(UnsafePickleError):  # _codecs.encode only for latin-1
        safe_loads(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    assert safe_loads(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R.") == b"abc"
    with pytest.raises(UnsafePickleError):  # _new_Index only for index stand-ins
        safe_loads(b"\x80\x02cpandas.core.indexes.base\n_new_Index\nc__builtin__\nobject\n}\x86R.")
    idx = safe_loads(b"\x80\x02cpandas.core.indexes.base\n_new_Index\ncpandas.core.indexes.base\nIndex\n"
                     b"}X\x04\x00\x00\x00dataK\x07s\x86R.")
    assert isinstance(idx, safe_pickle.IndexStandIn) and idx.state == {"data": 7}
    with pytest.raises(UnsafePickleError):  # _reconstruct only for plain ndarrays
        safe_loads(b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncpandas.core.frame\nDataFrame\n"
                   b"K\x00\x85C\x01b\x87R.")


@pytest.mark.parametrize("proto", [0, 1, 2, 3, 4])
def test_numpy_arrays_round_trip(proto):
    rng = np.random.default_rng(1)
    for a in (rng.standard_normal((3, 4)), rng.standard_normal(7).astype(np.float32),
              np.arange(12, dtype=np.int64).reshape(3, 4), np.asfortranarray(rng.standard_normal((2, 5)))):
        out = safe_loads(pickle.dumps(a, protocol=proto))
        assert type(out) is np.ndarray and out.dtype == a.dtype
        np.testing.assert_array_equal(out, a)


def test_numpy_array_old_module_path_round_trips():
    a = np.linspace(0, 1, 10)
    data = pickle.dumps(a, protocol=2)
    assert b"numpy._core.multiarray" in data
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(safe_loads(old), a)


def test_dict_of_arrays_like_hapt_layout():
    obj = {1: [np.zeros(3)], 2: [np.ones((2, 2), np.float32)]}
    out = safe_loads(pickle.dumps(obj, protocol=2))
    assert set(out) == {1, 2}
    np.testing.assert_array_equal(out[2][0], obj[2][0])


def test_object_array_with_evil_element_refused(tmp_path):
    marker = tmp_path / "pwned"
    a = np.empty(1, dtype=object)
    a[0] = _Reduce(os.system, (f"touch {marker}",))
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(a, protocol=2))
    assert not marker.exists()


def test_persistent_ids_refused():
    for data in (b"Pabc\n.", b"\x80\x02X\x03\x00\x00\x00abcQ.", b"\x80\x04\x8c\x03abcQ."):
        with pytest.raises(UnsafePickleError):
            safe_loads(data)


def test_extension_registry_goes_through_the_whitelist(tmp_path):
    marker = tmp_path / "pwned"
    code = 0x7FFF0 % 2 ** 31
    copyreg.add_extension("posix", "system", code)
    try:
        arg = f"touch {marker}".encode()
        data = b"\x80\x02\x84" + code.to_bytes(4, "little") + b"X" + len(arg).to_bytes(4, "little") + arg + b"\x85R."
        with pytest.raises(UnsafePickleError):
            safe_loads(data)
    finally:
        copyreg.remove_extension("posix", "system", code)
    assert not marker.exists()


def test_unsafe_pickle_error_is_an_unpickling_error():
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)


# --------------------------------------------------------------------------------------------------
# User arrays
# --------------------------------------------------------------------------------------------------

def _windows(n=5, c=3, l=40, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, l)).astype(np.float32)


def test_load_npy(tmp_path):
    x = _windows()
    np.save(tmp_path / "w.npy", x)
    ws = load_windows(tmp_path / "w.npy")
    assert isinstance(ws, WindowSet)
    np.testing.assert_array_equal(ws.x, x)
    assert ws.x.dtype == np.float32 and ws.y is None and ws.subject is None
    assert len(load_windows(str(tmp_path / "w.npy"), channels=3, length=40)) == 5


def test_load_npy_integer_and_float64_converted(tmp_path):
    np.save(tmp_path / "i.npy", np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    ws = load_windows(tmp_path / "i.npy")
    assert ws.x.dtype == np.float32 and ws.x[1, 2, 3] == 23
    np.save(tmp_path / "d.npy", _windows().astype(np.float64))
    assert load_windows(tmp_path / "d.npy").x.dtype == np.float32


def test_load_npz(tmp_path):
    x = _windows(6)
    y = np.array([0, 1, 2, -1, 1, 0], np.int32)
    s = np.array([1, 1, 2, 2, 3, 3], np.uint8)
    np.savez(tmp_path / "w.npz", x=x, y=y, subject=s)
    ws = load_windows(tmp_path / "w.npz")
    np.testing.assert_array_equal(ws.x, x)
    assert ws.y.dtype == np.int64 and ws.subject.dtype == np.int64
    np.testing.assert_array_equal(ws.y, y)
    np.testing.assert_array_equal(ws.subject, s)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    ws = load_windows(tmp_path / "c.npz")
    assert ws.y is None and ws.subject is None


def _assert_data_error(path, **kw):
    with pytest.raises(DataError) as ei:
        load_windows(path, **kw)
    assert str(path) in str(ei.value)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


@pytest.mark.parametrize("shape", [(5, 40), (2, 5, 3, 40), (40,), ()])
def test_wrong_rank_refused(shape, tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, np.zeros(shape, np.float32))
    _assert_data_error(p)


@pytest.mark.parametrize("arr", [np.array([[["a", "b"]]]), np.array([[[b"a"]]]), np.ones((1, 1, 2), bool),
                                 np.ones((1, 1, 2), np.complex64)])
def test_non_numeric_dtype_refused(arr, tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, arr)
    _assert_data_error(p)


def test_object_array_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.empty((1, 1, 1), dtype=object)
    evil[0, 0, 0] = _Reduce(os.system, (f"touch {marker}",))
    p = tmp_path / "evil.npy"
    np.save(p, evil, allow_pickle=True)
    _assert_data_error(p)
    np.savez(tmp_path / "evil.npz", x=evil)
    _assert_data_error(tmp_path / "evil.npz")
    np.savez(tmp_path / "evil_y.npz", x=_windows(1), y=evil.reshape(1))
    _assert_data_error(tmp_path / "evil_y.npz")
    # A bare pickle named .npy.
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(_Reduce(os.system, (f"touch {marker}",))))
    _assert_data_error(tmp_path / "pickle.npy")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_refused(bad, tmp_path):
    x = _windows().astype(np.float64)
    x[2, 1, 7] = bad
    p = tmp_path / "w.npy"
    np.save(p, x)
    msg = _assert_data_error(p)
    assert "NaN" in msg or "Inf" in msg


@pytest.mark.parametrize("shape", [(0, 3, 40), (4, 0, 40), (4, 3, 0)])
def test_empty_refused(shape, tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, np.zeros(shape, np.float32))
    _assert_data_error(p)


@pytest.mark.parametrize("key,value", [
    ("y", np.zeros(4, np.int64)),          # wrong length
    ("y", np.zeros(6, np.int64)),
    ("y", np.zeros(5, np.float32)),        # float labels
    ("y", np.zeros((5, 1), np.int64)),     # wrong rank
    ("y", np.array(["a"] * 5)),
    ("subject", np.zeros(3, np.int64)),
    ("subject", np.zeros(5, np.float64)),
])
def test_bad_labels_refused(key, value, tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, x=_windows(5), **{key: value})
    _assert_data_error(p)


def test_npz_without_x_refused(tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, windows=_windows(), y=np.zeros(5, np.int64))
    msg = _assert_data_error(p)
    assert "'x'" in msg


@pytest.mark.parametrize("content", [b"", b"hello, this is not numpy\n", b"\x00" * 100, None])
def test_non_numpy_file_refused(content, tmp_path):
    p = tmp_path / "w.npy"
    p.write_bytes(np.random.default_rng(0).bytes(1000) if content is None else content)
    _assert_data_error(p)


def test_truncated_npy_refused(tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, _windows(20))
    p.write_bytes(p.read_bytes()[:300])
    _assert_data_error(p)




def test_truncated_npz_refused(tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, x=_windows(20))
    p.write_bytes(p.read_bytes()[:500])
    _assert_data_error(p)


def test_corrupted_npz_member_refused(tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, x=_windows(20))
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF   # inside x.npy's data: CRC mismatch on read
    p.write_bytes(bytes(b))
    assert zipfile.is_zipfile(p)
    _assert_data_error(p)


def test_missing_file_and_directory_refused(tmp_path):
    _assert_data_error(tmp_path / "nope.npy")
    _assert_data_error(tmp_path)


def _npy_with_header(shape, descr="<f4", data=b"\0" * 64, version=(1, 0), fortran=False) -> bytes:
    """A .npy whose header claims ``shape``, followed by ``data`` (whatever the header says)."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(buf, header)
    return buf.getvalue() + data


@pytest.mark.parametrize("container", ["npy", "npz"])
@pytest.mark.parametrize("shape", [(10 ** 6, 3, 10 ** 6), (1, 1, 2 ** 62), (2 ** 40, 2 ** 40, 2 ** 40)])
def test_huge_header_refused_without_allocating(container, shape, tmp_path):
    import tracemalloc
    p = tmp_path / f"huge.{container}"
    raw = _npy_with_header(shape)
    if container == "npy":
        p.write_bytes(raw)
    else:
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("x.npy", raw)
    tracemalloc.start()
    try:
        msg = _assert_data_error(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "too large" in msg
    assert peak < 8 * 2 ** 20, peak


@pytest.mark.parametrize("container", ["npy", "npz"])
def test_header_promising_more_data_than_there_refused(container, tmp_path):
    p = tmp_path / f"short.{container}"
    raw = _npy_with_header((4, 3, 100), data=b"\0" * 400)    # 4800 bytes promised
    if container == "npy":
        p.write_bytes(raw)
    else:
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("x.npy", raw)
    assert "truncated" in _assert_data_error(p)


@pytest.mark.parametrize("shape", [(2, -3, 4), (-1,)])
def test_negative_dimension_in_header_refused(shape, tmp_path):
    p = tmp_path / "neg.npy"
    p.write_bytes(_npy_with_header(shape))
    _assert_data_error(p)


@pytest.mark.parametrize("descr", ["|O", "<U4", "|b1", "<c8", "<M8[s]", [("a", "<f4")], "|V8"])
def test_non_numeric_header_refused_before_reading(descr, tmp_path):
    p = tmp_path / "w.npy"
    p.write_bytes(_npy_with_header((1, 1, 2), descr=descr))
    _assert_data_error(p)


def test_pickle_disguised_as_npz_member_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "w.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", pickle.dumps(_Reduce(os.system, (f"touch {marker}",))))
    _assert_data_error(p)
    assert not marker.exists()


def test_encrypted_npz_member_refused(tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, x=_windows())
    b = bytearray(p.read_bytes())
    b[6] |= 0x1   # the local header's "encrypted" flag ...
    cd = b.rfind(b"PK\x01\x02")
    b[cd + 8] |= 0x1   # ... and the central directory's
    p.write_bytes(bytes(b))
    _assert_data_error(p)


def test_npz_with_trailing_corruption_refused(tmp_path):
    """A flipped byte in the last bytes of x's data is caught by zipfile's CRC check."""
    p = tmp_path / "w.npz"
    np.savez(p, x=_windows(2))
    b = bytearray(p.read_bytes())
    member_end = b.find(b"PK\x01\x02")
    b[member_end - 1] ^= 0xFF
    p.write_bytes(bytes(b))
    _assert_data_error(p)


@pytest.mark.parametrize("labels", [[0, 1, -2, 0, 1], [0, 1, 10 ** 9, 0, 1]])
def test_out_of_range_labels_refused(labels, tmp_path):
    p = tmp_path / "w.npz"
    np.savez(p, x=_windows(5), y=np.array(labels, np.int64))
    assert "labels" in _assert_data_error(p)


def test_unusual_but_valid_layouts_load(tmp_path):
    x = _windows(4, 3, 40)
    for i, arr in enumerate([x.astype(">f4"), np.asfortranarray(x), x.astype(np.float16), x.astype(">f8"),
                             (x * 100).astype(np.int8), (x * 100).astype(np.int64)]):
        p = tmp_path / f"w{i}.npy"
        np.save(p, arr)
        ws = load_windows(p)
        assert ws.x.dtype == np.float32 and ws.x.flags.c_contiguous and ws.x.flags.writeable
        np.testing.assert_allclose(ws.x, arr.astype(np.float32))
    p = tmp_path / "v2.npy"
    p.write_bytes(_npy_with_header((1, 1, 4), data=np.arange(4, dtype="<f4").tobytes(), version=(2, 0)))
    np.testing.assert_array_equal(load_windows(p).x.ravel(), np.arange(4))
    np.savez(tmp_path / "big_endian_labels.npz", x=x, y=np.array([0, 1, -1, 3], ">i2"))
    assert load_windows(tmp_path / "big_endian_labels.npz").y.tolist() == [0, 1, -1, 3]


def test_channel_and_length_mismatch_refused(tmp_path):
    p = tmp_path / "w.npy"
    np.save(p, _windows(4, 3, 40))
    assert "channels" in _assert_data_error(p, channels=6)
    assert "length" in _assert_data_error(p, length=300)
    load_windows(p, channels=3, length=40)


# --------------------------------------------------------------------------------------------------
# Synthetic windows
# --------------------------------------------------------------------------------------------------

def test_make_synthetic_shapes_and_ranges():
    ws = make_synthetic()
    assert ws.x.shape == (256, 3, 300) and ws.x.dtype == np.float32
    assert ws.y.shape == (256,) and ws.y.dtype == np.int64
    assert ws.subject.shape == (256,) and ws.subject.dtype == np.int64
    assert set(np.unique(ws.y).tolist()) == set(range(4))
    assert ws.subject.min() >= 0 and ws.subject.max() < 6
    assert np.isfinite(ws.x).all()
    ws = make_synthetic(n=50, channels=6, length=60, classes=3, subjects=2, seed=3)
    assert ws.x.shape == (50, 6, 60)
    assert ws.y.min() >= 0 and ws.y.max() < 3
    assert ws.subject.min() >= 0 and ws.subject.max() < 2


def test_make_synthetic_deterministic_and_seeded():
    a, b, c = make_synthetic(64, seed=5), make_synthetic(64, seed=5), make_synthetic(64, seed=6)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.subject, b.subject)
    assert not np.allclose(a.x, c.x)
    assert not np.array_equal(a.y, c.y)


def test_make_synthetic_classes_differ():
    ws = make_synthetic(400, noise=0.0, seed=0)
    means = np.stack([ws.x[ws.y == k].mean(axis=(0, 2)) for k in range(4)])
    # Class gravity offsets differ between classes.
    assert np.min([np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)]) > 0.05


# --------------------------------------------------------------------------------------------------
# Standardizer
# --------------------------------------------------------------------------------------------------

def test_standardizer_fit_apply_invert():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 3, 100)) * np.array([1.0, 5.0, 0.1])[None, :, None]
         + np.array([10.0, -2.0, 0.5])[None, :, None]).astype(np.float32)
    std = Standardizer.fit(x)
    assert std.mean.dtype == np.float32 and std.std.dtype == np.float32 and std.mean.shape == (3,)
    np.testing.assert_allclose(std.mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.std, x.astype(np.float64).std(axis=(0, 2)), rtol=1e-5)
    z = std.apply(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2)), 1.0, atol=1e-4)
    np.testing.assert_allclose(std.invert(z), x, rtol=1e-5, atol=1e-4)
    # (C, N) samples give the same statistics as the windows they came from.
    flat = x.transpose(1, 0, 2).reshape(3, -1)
    s2 = Standardizer.fit(flat)
    np.testing.assert_allclose(s2.mean, std.mean, rtol=1e-6)
    np.testing.assert_allclose(s2.std, std.std, rtol=1e-6)


def test_standardizer_constant_channel_stays_finite():
    x = np.ones((4, 2, 10), np.float32)
    std = Standardizer.fit(x)
    assert np.all(std.std > 0)
    assert np.isfinite(std.apply(x)).all()


def test_standardizer_dict_round_trip():
    std = Standardizer(np.array([0.1, -0.2, 0.3], np.float32), np.array([1.5, 0.25, 2.0], np.float32))
    d = json.loads(json.dumps(std.to_dict()))
    back = Standardizer.from_dict(d)
    assert back.mean.dtype == np.float32 and back.std.dtype == np.float32
    np.testing.assert_array_equal(back.mean, std.mean)
    np.testing.assert_array_equal(back.std, std.std)
    x = _windows(3, 3, 20)
    np.testing.assert_array_equal(back.apply(x), std.apply(x))
