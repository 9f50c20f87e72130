"""Generation quality: sensor-FID, RBF-kernel MMD^2 and reconstruction error.

sensor-FID is the Frechet distance between Gaussian fits of the features of real and generated
windows, the features coming from an activity classifier trained separately (supervised, on the
real training split) and saved: never from the encoder being judged, which would grade itself.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score
from torch import nn

from ..data.augment import AugmentConfig, augment
from ..models.configs import EncoderConfig
from ..models.encoder import ResNet1DEncoder


# ---- Frechet distance ---------------------------------------------------------------------------

def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with ddof = 1) of features (N, D), in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The matrix square root comes from scipy.linalg.sqrtm; when it is not finite (a singular
    product) eps * I is added to both covariances, and imaginary parts below 1e-3 (numerical
    noise) are dropped; larger ones raise."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # A singular product (dead ReLU features, fewer samples than dimensions) is expected here.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance of the Gaussian fits of two feature sets."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ---- MMD ----------------------------------------------------------------------------------------

def median_bandwidth(x: np.ndarray, y: np.ndarray) -> float:
    """Median heuristic: the median of the pairwise Euclidean distances in the pooled set."""
    z = np.concatenate([_flat(x), _flat(y)])
    d2 = _sqdist(z, z)
    d = np.sqrt(d2[np.triu_indices(len(z), k=1)])
    med = float(np.median(d))
    return med if med > 0 else 1.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with k(a, b) = exp(-|a - b|^2 / (2 h^2)), h by the median heuristic:
    mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j).
    Samples are flattened to vectors; can be slightly negative when the sets match."""
    x, y = _flat(x), _flat(y)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("mmd_rbf needs at least 2 samples per set")
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be > 0, got {h}")
    g = -1.0 / (2 * h * h)
    kxx, kyy, kxy = np.exp(g * _sqdist(x, x)), np.exp(g * _sqdist(y, y)), np.exp(g * _sqdist(x, y))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def _flat(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


# ---- the feature classifier ---------------------------------------------------------------------

@dataclass
class FeatureClassifierConfig:
    channels: int = 3
    classes: int = 6
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 32          # FID features: small enough for a covariance from a few hundred windows


class FeatureClassifier(nn.Module):
    """A small ResNet-1D (the encoder architecture, its own weights) + linear head; ``features``
    are the penultimate activations (B, feature_dim) used by sensor-FID."""

    def __init__(self, cfg: FeatureClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.body = ResNet1DEncoder(cfg.channels, EncoderConfig(widths=tuple(cfg.widths), z_dim=cfg.feature_dim))
        self.head = nn.Linear(cfg.feature_dim, cfg.classes)

    def features(self, x):
        return torch.relu(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: np.ndarray | torch.Tensor, batch: int = 512) -> np.ndarray:
        """Features of standardised windows (N, C, L), eval mode, as float64 numpy."""
        self.eval()
        dev = next(self.parameters()).device
        x = torch.as_tensor(x)
        out = [self.features(x[i:i + batch].to(dev, torch.float32)).double().cpu() for i in range(0, len(x), batch)]
        return torch.cat(out).numpy()


def train_feature_classifier(x: np.ndarray, y: np.ndarray, classes: int, out_dir=None, steps: int = 600,
                             batch_size: int = 64, lr: float = 2e-3, seed: int = 0, mean=None, std=None,
                             cfg: FeatureClassifierConfig | None = None, device="cpu") -> FeatureClassifier:
    """Supervised training on labelled real windows (AdamW, cosine LR; with ``mean``/``std`` the
    encoder-side augmentation of pretraining); saved to ``out_dir`` (model.safetensors + config.json)."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
    keep = y >= 0
    x, y = x[keep], y[keep]
    if len(x) == 0:
        raise ValueError("the feature classifier needs labelled windows")
    cfg = cfg or FeatureClassifierConfig(channels=x.shape[1], classes=classes)
    torch.manual_seed(seed)
    model = FeatureClassifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    aug = mean is not None and std is not None
    if aug:
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(X), (min(batch_size, len(X)),), generator=gen)
        xb = X[idx]
        if aug:
            xb = augment(xb, mean_t, std_t, AugmentConfig(), gen)
        loss = nn.functional.cross_entropy(model(xb.to(device)), Y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.train_seconds = time.perf_counter() - t0
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "steps": steps, "seed": seed}, indent=1))
    return model


def load_feature_classifier(path, device="cpu") -> FeatureClassifier:
    """The classifier saved by :func:`train_feature_classifier` in directory ``path``."""
    p = Path(path)
    try:
        meta = json.loads((p / "config.json").read_text())
        tensors = load_file(str(p / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{p}: not a saved feature classifier ({exc})") from None
    fields = FeatureClassifierConfig.__dataclass_fields__
    cfg = FeatureClassifierConfig(**{k: v for k, v in meta.items() if k in fields})
    cfg.widths = tuple(cfg.widths)
    model = FeatureClassifier(cfg)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def classifier_f1(clf: FeatureClassifier, x: np.ndarray, y: np.ndarray) -> float:
    """Macro-F1 of the feature classifier itself (a sanity check that its features mean something)."""
    with torch.no_grad():
        clf.eval()
        pred = clf(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()
    return float(f1_score(y, pred, average="macro"))


# ---- metrics of a generator ---------------------------------------------------------------------

def sensor_fid(clf: FeatureClassifier, real: np.ndarray, generated: np.ndarray) -> float:
    """Frechet distance between the classifier features of real and generated windows."""
    return frechet_distance_from_features(clf.embed(real), clf.embed(generated))


def reconstruction_error(model, x: np.ndarray | torch.Tensor, steps: int | None, method: str | None = None,
                         seed: int = 0, batch: int = 256, temperature: float = 1.0) -> float:
    """MSE of x -> z = E(x) -> K-step sample, in the windows' (standardised) units; ``temperature``
    scales the starting noise (0: the deterministic reconstruction, see ``FlowFM.reconstruct``)."""
    dev = next(model.parameters()).device
    x = torch.as_tensor(x, dtype=torch.float32)
    gen = torch.Generator(device=dev).manual_seed(seed)
    err, n = 0.0, 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(dev)
        r = model.reconstruct(xb, steps, method, generator=gen, temperature=temperature)
        err += float(((r - xb) ** 2).sum())
        n += xb.numel()
    return err / n
