"""Supervised training of encoder + linear head: full fine-tuning of a pretrained encoder, or the
same recipe from random init (the supervised-from-scratch baseline)."""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from sklearn.metrics import f1_score

from ..data.augment import AugmentConfig, augment


@torch.no_grad()
def predict(encoder, head, x: np.ndarray, batch: int = 512, device="cpu") -> np.ndarray:
    encoder.eval()
    head.eval()
    logits = [head(encoder(torch.from_numpy(x[i:i + batch]).to(device))).argmax(1).cpu()
              for i in range(0, len(x), batch)]
    return torch.cat(logits).numpy()


def finetune(encoder: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
             y_test: np.ndarray, num_classes: int, mean: np.ndarray, std: np.ndarray, steps: int = 400,
             batch_size: int = 64, lr: float = 1e-3, encoder_lr: float | None = None,
             weight_decay: float = 0.01, seed: int = 0,
             augment_cfg: AugmentConfig | None = None, device="cpu") -> dict:
    """Train a copy of ``encoder`` with a linear head; returns macro-F1 and accuracy on the test
    windows, and the trained ``encoder`` and ``head``.

    ``encoder_lr`` (default ``lr``) lets a pretrained encoder move more slowly than the new head.
    """
    torch.manual_seed(seed)
    # requires_grad_: the encoder may come from a frozen copy (EMA weights, a probe) and must train here.
    enc = copy.deepcopy(encoder).to(device).train().requires_grad_(True)
    head = torch.nn.Linear(enc.z_dim, num_classes).to(device)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW([{"params": list(enc.parameters()), "lr": lr if encoder_lr is None else encoder_lr},
                             {"params": list(head.parameters()), "lr": lr}], weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
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
