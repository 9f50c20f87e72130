"""End to end: a joint training step and 8-step Euler sampling of the ``small`` config, eager vs
torch.compile of the same model, in one run; plus the machine's copy bandwidth (the roofline).

Each benchmark's ``group`` is the case; ``extra_info["impl"]`` names the implementation, and
report.py prints every implementation as a ratio against eager in the same group.
"""
from __future__ import annotations

import pytest
import torch

from conftest import sync
from flowfm_fast.models import FlowFM, get_config

BATCH = 64


def _model(device, velocity):
    torch.manual_seed(0)
    model = FlowFM(get_config("small", velocity=velocity)).to(device)
    # Perturb the zero-initialised layers so the timed work is representative of a trained model.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("impl", ["eager", "compile"])
@pytest.mark.parametrize("velocity", ["dit", "resnet"])
def test_train_step(benchmark, device, impl, velocity):
    model = _model(device, velocity)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = model.loss if impl == "eager" else torch.compile(model.loss)
    x1 = torch.randn(BATCH, 3, 300, device=device)

    def step():
        loss = loss_fn(x1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    for _ in range(3):  # compile and warm up outside the timing
        step()
    benchmark.group = f"train_step small/{velocity} B={BATCH}"
    benchmark.extra_info.update(impl=impl, op="train_step", shape=f"B={BATCH},C=3,L=300")
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["eager", "compile"])
@pytest.mark.parametrize("batch", [1, 64])
def test_sample_8_euler(benchmark, device, impl, batch):
    model = _model(device, "dit").eval()
    z = torch.randn(batch, model.cfg.encoder.z_dim, device=device)
    if impl == "compile":
        model.velocity.forward_modulated = torch.compile(model.velocity.forward_modulated)

    def run():
        with torch.no_grad():
            model.sample(z, steps=8, method="euler", generator=torch.Generator(device).manual_seed(0))
        sync(device)

    for _ in range(2):
        run()
    benchmark.group = f"sample euler K=8 small/dit B={batch}"
    benchmark.extra_info.update(impl=impl, op="sample", shape=f"B={batch},K=8")
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)


def test_copy_bandwidth(benchmark, device):
    """Roofline reference: bytes moved by a large copy (read + write)."""
    n = 16 * 2 ** 20  # 64 MiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        sync(device)

    benchmark.group = "copy bandwidth"
    benchmark.extra_info.update(impl="copy", op="copy", bytes=2 * 4 * n)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
