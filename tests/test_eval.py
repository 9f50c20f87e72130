"""Evaluation: label subsets, linear probe, frozen encoding, fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowfm_fast.data import Standardizer, make_synthetic
from flowfm_fast.eval import (encode_windows, finetune, finetune_per_class, label_subset, linear_probe, per_class_subset, predict,
                              probe_per_class)
from flowfm_fast.models import ResNet1DEncoder, get_config


def _tiny_encoder(channels=3, seed=0):
    torch.manual_seed(seed)
    return ResNet1DEncoder(channels, get_config("tiny").encoder)


# --------------------------------------------------------------------------------------------------
# label_subset
# --------------------------------------------------------------------------------------------------

def _labels():
    return np.random.default_rng(0).permutation(np.repeat(np.arange(4), [100, 50, 30, 3]))


def test_label_subset_full_fraction_returns_everything():
    y = _labels()
    np.testing.assert_array_equal(label_subset(y, 1.0, 0), np.arange(len(y)))
    np.testing.assert_array_equal(label_subset(y, 1.0, 5), np.arange(len(y)))


def test_label_subset_tenth_is_stratified():
    y = _labels()
    idx = label_subset(y, 0.1, 0)
    assert idx.dtype.kind in "iu"
    assert np.all(np.diff(idx) > 0), "indices must be sorted and unique"
    assert idx.min() >= 0 and idx.max() < len(y)
    counts = np.bincount(y[idx], minlength=4)
    full = np.bincount(y, minlength=4)
    for c in range(4):
        assert counts[c] >= 1
        assert counts[c] == max(1, int(round(0.1 * full[c])))
    assert counts.tolist() == [10, 5, 3, 1]


def test_label_subset_tiny_fraction_keeps_one_per_class():
    y = _labels()
    idx = label_subset(y, 0.001, 3)
    assert np.bincount(y[idx], minlength=4).tolist() == [1, 1, 1, 1]


def test_label_subset_seeding():
    y = _labels()
    a, b = label_subset(y, 0.1, 0), label_subset(y, 0.1, 0)
    np.testing.assert_array_equal(a, b)
    others = [label_subset(y, 0.1, s) for s in (1, 2, 3)]
    assert all(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, 1.0000001, float("nan")])
def test_label_subset_invalid_fraction(fraction):
    with pytest.raises(ValueError):
        label_subset(_labels(), fraction, 0)


# --------------------------------------------------------------------------------------------------
# linear_probe
# --------------------------------------------------------------------------------------------------

def _blobs(n, seed, centers):
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(len(centers)), n // len(centers))
    return (centers[y] + rng.standard_normal((len(y), centers.shape[1]))).astype(np.float32), y


def test_per_class_subset_takes_k_of_every_class():
    y = _labels()  # classes of 100, 50, 30 and 3 windows
    for k in (1, 2, 5):
        idx = per_class_subset(y, k, seed=0)
        counts = np.bincount(y[idx], minlength=4)
        assert counts.tolist() == [k, k, k, min(k, 3)]
        assert len(np.unique(idx)) == len(idx)
    assert np.bincount(y[per_class_subset(y, 10, 0)]).tolist() == [10, 10, 10, 3]  # a small class gives all
    assert not np.array_equal(per_class_subset(y, 5, 0), per_class_subset(y, 5, 1))
    assert np.array_equal(per_class_subset(y, 5, 3), per_class_subset(y, 5, 3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="per_class"):
            per_class_subset(y, bad, 0)


def test_probe_per_class_learns_with_more_labels():
    """Overlapping Gaussian classes seen through an identity "encoder": a probe with 10 windows per
    class beats one with 1, and each level has one score per draw."""
    from flowfm_fast.data.windows import WindowSet
    centers = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)

    def windows(n, seed):
        rng = np.random.default_rng(seed)
        y = np.repeat(np.arange(4), n // 4)
        return WindowSet((centers[y] + 1.5 * rng.standard_normal((len(y), 8))).astype(np.float32)[:, None], y)

    tr, te = windows(400, 0), windows(400, 1)
    res = probe_per_class(torch.nn.Flatten(), tr, te, per_class=(1, 10), draws=8)
    assert set(res) == {1, 10} and all(len(v) == 8 for v in res.values())
    assert np.mean(res[10]) > np.mean(res[1]) + 0.05
    with pytest.raises(ValueError, match="draws"):
        probe_per_class(torch.nn.Flatten(), tr, te, per_class=(1,), draws=0)


def test_linear_probe_separable_features():
    centers = np.random.default_rng(42).standard_normal((4, 16)) * 6
    ftr, ytr = _blobs(200, 0, centers)
    fte, yte = _blobs(200, 1, centers)
    res = linear_probe(ftr, ytr, fte, yte)
    assert set(res) >= {"macro_f1", "accuracy"}
    assert res["macro_f1"] > 0.95
    assert res["accuracy"] > 0.95
    assert isinstance(res["macro_f1"], float)


def test_linear_probe_random_labels_near_chance():
    rng = np.random.default_rng(7)
    ftr, fte = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    ytr, yte = np.tile(np.arange(4), 100), np.tile(np.arange(4), 100)
    rng.shuffle(ytr)
    res = linear_probe(ftr, ytr, fte, yte)
    assert 0.0 <= res["macro_f1"] < 0.5
    assert res["accuracy"] < 0.5


# --------------------------------------------------------------------------------------------------
# encode_windows
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("start_training", [True, False])
def test_encode_windows(start_training):
    enc = _tiny_encoder()
    # Give BatchNorm non-trivial running stats, so eval vs train mode actually differ.
    with torch.no_grad():
        enc.train()
        enc(torch.randn(16, 3, 60) * 3 + 1)
    enc.train(start_training)
    x = np.random.default_rng(0).standard_normal((23, 3, 60)).astype(np.float32)
    buffers = {k: v.clone() for k, v in enc.state_dict().items()}
    z = encode_windows(enc, x, batch=7)
    assert z.shape == (23, enc.z_dim) and z.dtype == np.float32
    assert enc.training is start_training
    for k, v in enc.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed while encoding"
    enc.eval()
    with torch.no_grad():
        ref = enc(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
    # Train-mode forward differs (batch statistics): encode_windows really used eval mode.
    enc.train()
    with torch.no_grad():
        train_out = enc(torch.from_numpy(x)).numpy()
    assert not np.allclose(z, train_out, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------------

def test_finetune_learns_synthetic_classes():
    tr = make_synthetic(256, length=60, seed=1)
    te = make_synthetic(128, length=60, seed=2)
    std = Standardizer.fit(tr.x)
    enc = _tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = finetune(enc, std.apply(tr.x), tr.y, std.apply(te.x), te.y, num_classes=4, mean=std.mean, std=std.std,
                   steps=50, batch_size=32, lr=3e-3, seed=0)
    assert set(res) >= {"macro_f1", "accuracy"}
    assert 0.0 <= res["macro_f1"] <= 1.0
    assert res["macro_f1"] > 0.6, res      # chance is ~0.25 for 4 balanced classes
    # The caller's encoder is not modified (finetune trains a copy).
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_finetune_encoder_lr_zero_freezes_encoder_weights():
    tr = make_synthetic(64, length=60, seed=1)
    std = Standardizer.fit(tr.x)
    enc = _tiny_encoder()
    kw = dict(num_classes=4, mean=std.mean, std=std.std, steps=5, batch_size=16, seed=0)
    frozen = finetune(enc, std.apply(tr.x), tr.y, std.apply(tr.x), tr.y, encoder_lr=0.0, **kw)
    moved = finetune(enc, std.apply(tr.x), tr.y, std.apply(tr.x), tr.y, **kw)
    for (name, p0), p_frozen, p_moved in zip(enc.named_parameters(), frozen["encoder"].parameters(),
                                             moved["encoder"].parameters()):
        assert torch.equal(p0, p_frozen), name
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(enc.parameters(), moved["encoder"].parameters()))
    head0 = torch.nn.Linear(enc.z_dim, 4)
    assert frozen["head"].weight.shape == head0.weight.shape


def test_finetune_trains_an_encoder_whose_weights_were_frozen():
    """EMA copies have requires_grad=False; fine-tuning must still train the encoder."""
    tr = make_synthetic(64, length=60, seed=1)
    std = Standardizer.fit(tr.x)
    enc = _tiny_encoder().requires_grad_(False)
    res = finetune(enc, std.apply(tr.x), tr.y, std.apply(tr.x), tr.y, num_classes=4, mean=std.mean, std=std.std,
                   steps=5, batch_size=16, seed=0)
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(enc.parameters(), res["encoder"].parameters()))


def _probe_pipeline_predictions(enc, x_train, y_train, x_test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    clf.fit(encode_windows(enc, x_train), y_train)
    return clf.predict(encode_windows(enc, x_test)), clf.decision_function(encode_windows(enc, x_test))


@pytest.mark.parametrize("classes", [(0, 1, 2, 3), (0, 2)])
def test_probe_head_is_the_linear_probe(classes):
    """The LP-FT head holds the logistic-regression probe (scaler folded in): same predictions, and
    classes absent from the training labels are never predicted."""
    from flowfm_fast.eval.finetune import probe_head
    tr = make_synthetic(256, length=60, seed=1)
    te = make_synthetic(128, length=60, seed=2)
    std = Standardizer.fit(tr.x)
    keep = np.isin(tr.y, classes)
    xtr, ytr, xte = std.apply(tr.x)[keep], tr.y[keep], std.apply(te.x)
    enc = _tiny_encoder()
    head = probe_head(enc, xtr, ytr, num_classes=4)
    assert head.weight.shape == (4, enc.z_dim)
    ref_pred, ref_dec = _probe_pipeline_predictions(enc, xtr, ytr, xte)
    pred = predict(enc, head, xte)
    np.testing.assert_array_equal(pred, ref_pred)
    assert set(np.unique(pred)) <= set(classes)
    with torch.no_grad():
        enc.eval()
        logits = head(enc(torch.from_numpy(xte))).double().numpy()
    if len(classes) == 2:   # binary: sklearn's decision is logit[c1] - logit[c0]
        np.testing.assert_allclose(logits[:, classes[1]] - logits[:, classes[0]], ref_dec, rtol=1e-3, atol=1e-3)
    else:
        np.testing.assert_allclose(logits - logits.mean(1, keepdims=True), ref_dec - ref_dec.mean(1, keepdims=True),
                                   rtol=1e-3, atol=1e-3)


def test_finetune_lpft_linear_probe_phase():
    """head_init="probe", steps=0: the frozen phase alone. The encoder (weights and BatchNorm
    statistics) is unchanged and the head already predicts far above chance, unlike a random head."""
    tr = make_synthetic(256, length=60, seed=1)
    te = make_synthetic(128, length=60, seed=2)
    std = Standardizer.fit(tr.x)
    enc = _tiny_encoder()
    kw = dict(num_classes=4, mean=std.mean, std=std.std, steps=0, seed=0)
    lp = finetune(enc, std.apply(tr.x), tr.y, std.apply(te.x), te.y, head_init="probe", **kw)
    rand = finetune(enc, std.apply(tr.x), tr.y, std.apply(te.x), te.y, **kw)
    for (k, v), v_lp in zip(enc.state_dict().items(), lp["encoder"].state_dict().values()):
        assert torch.equal(v, v_lp), k
    ref = linear_probe(encode_windows(enc, std.apply(tr.x)), tr.y, encode_windows(enc, std.apply(te.x)), te.y)
    assert lp["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert lp["macro_f1"] > 0.6, lp          # chance is ~0.25 for 4 balanced classes
    assert rand["macro_f1"] < lp["macro_f1"] - 0.2, (rand["macro_f1"], lp["macro_f1"])


def test_finetune_lpft_then_trains_everything():
    tr = make_synthetic(256, length=60, seed=1)
    te = make_synthetic(128, length=60, seed=2)
    std = Standardizer.fit(tr.x)
    enc = _tiny_encoder()
    res = finetune(enc, std.apply(tr.x), tr.y, std.apply(te.x), te.y, num_classes=4, mean=std.mean, std=std.std,
                   steps=20, batch_size=32, lr=3e-3, encoder_lr=3e-4, seed=0, head_init="probe")
    assert res["macro_f1"] > 0.6, res
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(enc.parameters(), res["encoder"].parameters()))


@pytest.mark.parametrize("bad", [dict(head_init="lp"), dict(steps=-1)])
def test_finetune_rejects_bad_options(bad):
    tr = make_synthetic(16, length=60, seed=1)
    with pytest.raises(ValueError):
        finetune(_tiny_encoder(), tr.x, tr.y, tr.x, tr.y, num_classes=4, mean=np.zeros(3), std=np.ones(3), **bad)


def test_predict_shape():
    enc = _tiny_encoder()
    head = torch.nn.Linear(enc.z_dim, 5)
    x = np.random.default_rng(0).standard_normal((9, 3, 60)).astype(np.float32)
    p = predict(enc, head, x, batch=4)
    assert p.shape == (9,) and p.min() >= 0 and p.max() < 5


def test_finetune_per_class_draws_match_single_finetunes():
    """Draw d of level k is finetune() on per_class_subset(y, k, d) with seed d; an encoder factory
    gets a new encoder per draw, a module is copied and never changed."""
    from flowfm_fast.data.windows import WindowSet as Windows
    rng_tr, rng_te = make_synthetic(120, length=60, seed=1), make_synthetic(64, length=60, seed=2)
    std = Standardizer.fit(rng_tr.x)
    tr, te = Windows(std.apply(rng_tr.x), rng_tr.y), Windows(std.apply(rng_te.x), rng_te.y)
    enc = _tiny_encoder()
    before = [p.clone() for p in enc.parameters()]
    kw = dict(num_classes=4, mean=std.mean, std=std.std)
    res = finetune_per_class(enc, tr, te, per_class=(1, 3), draws=2, steps=4, **kw)
    assert set(res) == {1, 3} and all(len(v) == 2 for v in res.values())
    idx = per_class_subset(tr.y, 3, 1)
    one = finetune(enc, tr.x[idx], tr.y[idx], te.x, te.y, steps=4, batch_size=64, seed=1, **kw)["macro_f1"]
    assert res[3][1] == one
    assert all(torch.equal(p, q) for p, q in zip(enc.parameters(), before))
    made = []
    scratch = finetune_per_class(lambda d: made.append(d) or _tiny_encoder(seed=100 + d), tr, te, per_class=(2,),
                                 draws=3, steps=2, **kw)
    assert made == [0, 1, 2] and len(scratch[2]) == 3
    with pytest.raises(ValueError, match="draws"):
        finetune_per_class(enc, tr, te, per_class=(1,), draws=0, **kw)
