"""Supervised training of encoder + linear head: full fine-tuning of a pretrained encoder, or the
same recipe from random init (the supervised-from-scratch baseline)."""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from ..data.augment import AugmentConfig, augment
from .probe import encode_windows, per_class_subset

HEAD_INITS = ("random", "probe")


@torch.no_grad()
def predict(encoder, head, x: np.ndarray, batch: int = 512, device="cpu") -> np.ndarray:
    encoder.eval()
    head.eval()
    logits = [head(encoder(torch.from_numpy(x[i:i + batch]).to(device))).argmax(1).cpu()
              for i in range(0, len(x), batch)]
    return torch.cat(logits).numpy()


def probe_head(encoder: torch.nn.Module, x: np.ndarray, y: np.ndarray, num_classes: int, C: float = 1.0,
               device="cpu") -> torch.nn.Linear:
    """A linear head holding the logistic-regression solution on ``encoder``'s frozen (eval-mode)
    features of ``x``: the probe's StandardScaler is folded into the weights, so
    ``head(encoder(x))`` gives the probe's logits."""
    f = encode_windows(encoder, x, device=device).astype(np.float64)
    sc = StandardScaler().fit(f)
    clf = LogisticRegression(C=C, max_iter=3000).fit(sc.transform(f), y)
    w = np.zeros((num_classes, f.shape[1]))
    b = np.full(num_classes, -1e4)            # classes absent from y: never predicted
    scale = np.where(sc.scale_ > 0, sc.scale_, 1.0)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:                     # binary: sklearn keeps one row for classes_[1]
        coef, icpt = np.concatenate([-coef, coef]) / 2, np.concatenate([-icpt, icpt]) / 2
    for row, c in enumerate(clf.classes_):
        w[c] = coef[row] / scale
        b[c] = icpt[row] - w[c] @ sc.mean_
    head = torch.nn.Linear(f.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    return head


def finetune(encoder: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
             y_test: np.ndarray, num_classes: int, mean: np.ndarray, std: np.ndarray, steps: int = 400,
             batch_size: int = 64, lr: float = 1e-3, encoder_lr: float | None = None,
             weight_decay: float = 0.01, seed: int = 0,
             augment_cfg: AugmentConfig | None = None, device="cpu", head_init: str = "random") -> dict:
    """Train a copy of ``encoder`` with a linear head; returns macro-F1 and accuracy on the test
    windows, and the trained ``encoder`` and ``head``.

    ``encoder_lr`` (default ``lr``) lets a pretrained encoder move more slowly than the new head.

    ``head_init="probe"`` is LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained
    Features"): the head starts at the linear probe's logistic-regression solution on the frozen
    encoder's features of ``x_train`` (``probe_head``) instead of at random, so the first full
    steps do not push a random head's gradients into the pretrained features; ``steps=0`` returns
    the probe itself. It only makes sense for a pretrained encoder (on a random-init encoder it
    fits a probe of random features). On HAPT with the demo's FlowFM encoder it did not help
    (10 % labels, 300 steps, 3 seeds, held-out subjects: 0.906 ± 0.016 with ``encoder_lr = lr``,
    0.892 ± 0.007 with ``encoder_lr = lr / 10``, vs 0.906 ± 0.020 with a random head; scratch
    0.907 ± 0.018): fine-tuning there does not destroy the features, it needs to move them. The
    default therefore stays ``"random"``, the same recipe for pretrained and scratch encoders.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    torch.manual_seed(seed)
    # requires_grad_: the encoder may come from a frozen copy (EMA weights, a probe) and must train here.
    enc = copy.deepcopy(encoder).to(device).train().requires_grad_(True)
    head = torch.nn.Linear(enc.z_dim, num_classes).to(device)
    if head_init == "probe":
        head = probe_head(enc, x_train, y_train, num_classes, device=device).to(device)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW([{"params": list(enc.parameters()), "lr": lr if encoder_lr is None else encoder_lr},
                             {"params": list(head.parameters()), "lr": lr}], weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    gen = torch.Generator(device=device).manual_seed(seed)
    X, Y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    m, s = torch.as_tensor(mean, device=device), torch.as_tensor(std, device=device)
    aug = augment_cfg or AugmentConfig()
    n = len(X)
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=torch.Generator().manual_seed(seed * 7 + step))
        xb = augment(X[idx].to(device), m, s, aug, gen)
        loss = torch.nn.functional.cross_entropy(head(enc(xb)), Y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    pred = predict(enc, head, x_test, device=device)
    return {"macro_f1": float(f1_score(y_test, pred, average="macro")), "accuracy": float((pred == y_test).mean()),
            "encoder": enc, "head": head}


def finetune_per_class(encoder, train, test, num_classes: int, mean: np.ndarray, std: np.ndarray,
                       per_class=(1, 2, 5, 10), draws: int = 10, steps: int = 100, device="cpu",
                       head_init: str = "random") -> dict[int, list[float]]:
    """Fine-tuning macro-F1 on ``test`` with ``k`` labelled windows per class, for each ``k`` in
    ``per_class`` and each of ``draws`` draws of those windows: draw ``d`` takes the windows
    ``per_class_subset(train.y, k, d)`` (the linear probe's draws, so the two are paired) and trains
    with seed ``d``.

    ``encoder`` is a module (a fresh copy is trained for every draw: fine-tuning a pretrained
    encoder) or a callable ``d -> module`` (a new encoder per draw: supervised training from
    scratch, whose spread then covers the initialisation as well as the labelled windows)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    make = encoder if callable(encoder) and not isinstance(encoder, torch.nn.Module) else (lambda d: encoder)
    out = {}
    for k in per_class:
        scores = []
        for d in range(draws):
            idx = per_class_subset(train.y, k, d)
            scores.append(finetune(make(d), train.x[idx], train.y[idx], test.x, test.y, num_classes, mean, std,
                                   steps=steps, batch_size=64, seed=d, device=device,
                                   head_init=head_init)["macro_f1"])
        out[int(k)] = scores
    return out
