"""Generation metrics on cases with known answers: Frechet distance against its closed form,
FID ~ 0 and MMD ~ 0 for identical sets, MMD ordering, the feature classifier round trip, and
reconstruction error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowfm_fast.data import Standardizer, make_synthetic
from flowfm_fast.eval.generation import (FeatureClassifierConfig, classifier_f1, feature_stats, frechet_distance,
                                         frechet_distance_from_features, load_feature_classifier,
                                         median_bandwidth, mmd_rbf, reconstruction_error, sensor_fid,
                                         train_feature_classifier)
from flowfm_fast.models import FlowFM, get_config


def closed_form_diag(mu1, v1, mu2, v2):
    """Frechet distance of N(mu1, diag v1) and N(mu2, diag v2): |dmu|^2 + sum (sqrt v1 - sqrt v2)^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(closed_form_diag(mu1, v1, mu2, v2), rel=1e-8)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_full_covariance_shift_only():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    s = a @ a.T + np.eye(4)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(np.zeros(4), s, shift, s) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_singular_covariances_are_finite():
    s = np.diag([1.0, 0.0, 0.0])
    d = frechet_distance(np.zeros(3), s, np.ones(3), s)
    assert np.isfinite(d) and d == pytest.approx(3.0, abs=1e-3)


def test_frechet_distance_shape_mismatch_raises():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_frechet_from_samples_matches_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -1.0, 0.5])
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    n = 20000
    x = mu1 + np.sqrt(v1) * rng.standard_normal((n, 4))
    y = mu2 + np.sqrt(v2) * rng.standard_normal((n, 4))
    want = closed_form_diag(mu1, v1, mu2, v2)
    assert frechet_distance_from_features(x, y) == pytest.approx(want, rel=0.05)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-6)
    mu, cov = feature_stats(x)
    np.testing.assert_allclose(mu, mu1, atol=0.05)
    np.testing.assert_allclose(np.diag(cov), v1, rtol=0.05)


def test_mmd_identical_zero_and_ordering():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 6))
    y_same = rng.standard_normal((200, 6))
    y_shift = rng.standard_normal((200, 6)) + 1.0
    assert abs(mmd_rbf(x, x)) < 1e-2       # unbiased: the diagonal is left out, so ~0 not exactly 0
    same, shifted = mmd_rbf(x, y_same), mmd_rbf(x, y_shift)
    assert abs(same) < 0.01
    assert shifted > 0.1 and shifted > 10 * abs(same)
    assert mmd_rbf(x, rng.standard_normal((200, 6)) + 2.0) > shifted


def test_mmd_known_value_one_point_sets():
    # Two-point sets with a fixed bandwidth: compute by hand.
    x = np.array([[0.0], [1.0]])
    y = np.array([[3.0], [4.0]])
    k = lambda d: np.exp(-d * d / 2.0)
    want = k(1) + k(1) - 2 * np.mean([k(3), k(4), k(2), k(3)])
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(want, rel=1e-12)
    assert median_bandwidth(x, y) == pytest.approx(np.median([1, 3, 4, 2, 3, 1]))


@pytest.fixture(scope="module")
def synthetic():
    pre = make_synthetic(n=256, length=60, seed=1)
    test = make_synthetic(n=128, length=60, seed=2)
    std = Standardizer.fit(pre.x)
    return std.apply(pre.x), pre.y, std.apply(test.x), test.y, std


def test_feature_classifier_trains_saves_and_loads(synthetic, tmp_path):
    x, y, xt, yt, std = synthetic
    cfg = FeatureClassifierConfig(channels=3, classes=4, widths=(8, 16), feature_dim=8)
    clf = train_feature_classifier(x, y, 4, tmp_path / "clf", steps=80, cfg=cfg, mean=std.mean, std=std.std)
    assert classifier_f1(clf, xt, yt) > 0.8
    again = load_feature_classifier(tmp_path / "clf")
    np.testing.assert_allclose(again.embed(xt), clf.embed(xt), rtol=1e-6, atol=1e-6)
    assert sensor_fid(again, xt, xt) == pytest.approx(0.0, abs=1e-6)
    # Real windows of one split against another are close; noise is far.
    near = sensor_fid(again, x, xt)
    far = sensor_fid(again, xt, np.random.default_rng(0).standard_normal(xt.shape).astype(np.float32))
    assert far > 5 * near
    with pytest.raises(ValueError):
        load_feature_classifier(tmp_path / "missing")


class Identity(torch.nn.Module):
    """A 'model' whose reconstruction is x + temperature * delta: the error must be (temperature * delta)^2."""

    def __init__(self, delta):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.delta = delta

    def reconstruct(self, x, steps, method=None, generator=None, temperature=1.0):
        return x + temperature * self.delta


def test_reconstruction_error_known_value():
    x = np.random.default_rng(0).standard_normal((10, 3, 20)).astype(np.float32)
    assert reconstruction_error(Identity(0.5), x, 4, batch=3) == pytest.approx(0.25, rel=1e-6)
    assert reconstruction_error(Identity(0.5), x, 4, batch=3, temperature=0.5) == pytest.approx(0.0625, rel=1e-6)


def test_reconstruction_error_of_models_is_finite():
    x = torch.randn(4, 3, 60)
    for objective, method in (("fm", "euler"), ("ddpm", "ddim")):
        m = FlowFM(get_config("tiny", length=60, objective=objective)).eval()
        e = reconstruction_error(m, x, 3, method)
        assert np.isfinite(e) and e > 0
