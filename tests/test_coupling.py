"""Noise-data couplings: exact OT against brute force, C2OT's condition weight search, WCFM's
Gibbs weights in closed form, the config/CLI switch and the refusals."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from flowfm_fast.cli import main
from flowfm_fast.models import FlowFM, get_config
from flowfm_fast.models.coupling import (COUPLINGS, assign, cheaper_fraction, condition_costs, couple,
                                         gibbs_weights, pair_costs, search_condition_weight)
from flowfm_fast.train.graph import CaptureError, check_capturable

L = 60


def _total(x0, x1):
    return float(((x0 - x1) ** 2).sum())


def test_pair_costs_match_definition():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, 7, generator=g), torch.randn(5, 3, 7, generator=g)
    M = pair_costs(x0, x1)
    want = torch.stack([torch.stack([((a - b) ** 2).sum() for b in x1]) for a in x0])
    torch.testing.assert_close(M, want, rtol=1e-5, atol=1e-4)


def test_ot_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(6, 2, 3, generator=g), torch.randn(6, 2, 3, generator=g)
    y0, w = couple("ot", x0, x1)
    assert w is None
    best = min(_total(x0[list(p)], x1) for p in itertools.permutations(range(6)))
    assert _total(y0, x1) == pytest.approx(best, rel=1e-6)
    # a permutation of the noise, nothing drawn anew
    assert sorted(map(tuple, y0.flatten(1).tolist())) == sorted(map(tuple, x0.flatten(1).tolist()))


def test_ot_recovers_a_hidden_shuffle():
    g = torch.Generator().manual_seed(2)
    x0 = 5 * torch.randn(64, 3, 10, generator=g)
    perm = torch.randperm(64, generator=g)
    x1 = x0[perm] + 0.01 * torch.randn(64, 3, 10, generator=g)
    y0, _ = couple("ot", x0, x1)
    torch.testing.assert_close(y0, x0[perm])


def test_assign_rejects_non_finite_costs():
    cost = torch.zeros(3, 3)
    cost[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        assign(cost)


def test_condition_weight_search_meets_target():
    g = torch.Generator().manual_seed(3)
    x0, x1, z = torch.randn(32, 3, 20, generator=g), torch.randn(32, 3, 20, generator=g), torch.randn(32, 8, generator=g)
    M, C = pair_costs(x0, x1), condition_costs(z)
    r0 = cheaper_fraction(M, C, 0.0)
    assert 0.3 < r0 < 0.7                        # independent pairs of Gaussians: about half cheaper
    w = search_condition_weight(M, C, 0.2)
    assert cheaper_fraction(M, C, w) <= 0.2 < cheaper_fraction(M, C, 0.98 * w)
    assert search_condition_weight(M, C, 0.9) == 0.0   # already below target: plain OT


def test_c2ot_keeps_pairs_within_a_condition_cluster():
    """Two orthogonal condition clusters and a small target: no noise drawn beside one cluster is
    paired with a window of the other (plain OT mixes them)."""
    g = torch.Generator().manual_seed(4)
    B = 32
    side = torch.arange(B) % 2
    z = torch.stack([torch.tensor([1.0, 0.0]) if s == 0 else torch.tensor([0.0, 1.0]) for s in side])
    z = z + 0.01 * torch.randn(B, 2, generator=g)
    x0 = torch.randn(B, 3, 20, generator=g)
    x1 = torch.randn(B, 3, 20, generator=g) + 3.0 * side.view(-1, 1, 1)
    y0, _ = couple("c2ot", x0, x1, z, target_r=0.05)
    idx = [int((x0 == y).flatten(1).all(1).nonzero()) for y in y0]   # which noise each window got
    assert all(side[i] == side[j] for j, i in enumerate(idx))
    ot, _ = couple("ot", x0, x1)
    idx_ot = [int((x0 == y).flatten(1).all(1).nonzero()) for y in ot]
    assert any(side[i] != side[j] for j, i in enumerate(idx_ot))


def test_c2ot_with_identical_conditions_and_reachable_target_is_plain_ot():
    """Identical z: the condition term is 0 everywhere; plain OT meets a loose target at w = 0."""
    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(16, 3, 10, generator=g), torch.randn(16, 3, 10, generator=g)
    z = torch.ones(16, 4)
    torch.testing.assert_close(couple("c2ot", x0, x1, z, target_r=0.9)[0], couple("ot", x0, x1)[0])


def test_c2ot_without_a_reachable_target_keeps_independent_pairs():
    """Fewer windows than 1 / target_r, or conditions equal up to fp32 rounding: no finite w meets
    the target, and the pairs stay as drawn (not an assignment on rounding noise)."""
    g = torch.Generator().manual_seed(8)
    x0, x1 = torch.randn(4, 3, 10, generator=g), torch.randn(4, 3, 10, generator=g)
    y0, _ = couple("c2ot", x0, x1, torch.randn(4, 5, generator=g), target_r=0.2)
    assert y0 is x0
    x0, x1 = torch.randn(16, 3, 10, generator=g), torch.randn(16, 3, 10, generator=g)
    z = torch.ones(16, 4) + 1e-8 * torch.randn(16, 4, generator=g)
    C = condition_costs(z)
    assert float(C.abs().max()) == 0.0
    assert math.isinf(search_condition_weight(pair_costs(x0, x1), C, 0.01))
    assert couple("c2ot", x0, x1, z, target_r=0.01)[0] is x0


def test_c2ot_needs_z():
    with pytest.raises(ValueError, match="needs the conditions z"):
        couple("c2ot", torch.randn(4, 2, 3), torch.randn(4, 2, 3))


def test_wcfm_weights_closed_form():
    g = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(8, 3, 10, generator=g), torch.randn(8, 3, 10, generator=g)
    y0, w = couple("wcfm", x0, x1, eps=0.05)
    assert y0 is x0                                        # pairs kept
    c = [float(((a - b) ** 2).sum()) for a, b in zip(x0, x1)]
    mean = sum(c) / len(c)
    e = [math.exp(-ci / (0.05 * mean)) for ci in c]
    want = torch.tensor([8 * ei / sum(e) for ei in e])
    torch.testing.assert_close(w, want, rtol=1e-4, atol=1e-6)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    order = sorted(range(8), key=lambda i: c[i])
    assert all(w[a] >= w[b] for a, b in zip(order, order[1:]))   # cheaper pair, larger weight
    torch.testing.assert_close(gibbs_weights(x0, x1, 1e9), torch.ones(8))


def test_unknown_coupling():
    with pytest.raises(ValueError, match="coupling must be one of"):
        couple("sinkhorn", torch.randn(2, 1, 1), torch.randn(2, 1, 1))


@pytest.mark.parametrize("bad, match", [
    (dict(coupling="sinkhorn"), "coupling must be one of"),
    (dict(coupling="ot", objective="ddpm"), "needs coupling='independent'"),
    (dict(coupling_eps=0.0), "coupling_eps"),
    (dict(coupling_target_r=1.0), "coupling_target_r"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        get_config("tiny", length=L, **bad)


@pytest.mark.parametrize("kind", COUPLINGS)
def test_loss_with_every_coupling_trains_both_networks(kind):
    torch.manual_seed(0)
    m = FlowFM(get_config("tiny", length=L, coupling=kind))
    for p in m.velocity.parameters():          # adaLN-Zero starts blind to z: perturb it
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(16, 3, L)
    loss = m.loss(x, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.encoder.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in m.velocity.parameters())


def test_wcfm_loss_is_the_weighted_independent_loss():
    """Same draws: the wcfm loss equals the independent loss with the Gibbs weights passed in."""
    torch.manual_seed(0)
    ind = FlowFM(get_config("tiny", length=L))
    w = FlowFM(get_config("tiny", length=L, coupling="wcfm"))
    w.load_state_dict(ind.state_dict())
    x = torch.randn(8, 3, L)
    x0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    weights = gibbs_weights(x0, x, 0.1)
    user = torch.linspace(0.5, 1.5, 8)
    a = w.loss(x, generator=torch.Generator().manual_seed(7), weight=user)
    b = ind.loss(x, generator=torch.Generator().manual_seed(7), weight=user * weights)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["ot", "c2ot"])
def test_cuda_graph_refuses_host_assignment(kind):
    with pytest.raises(CaptureError, match="solved on the host"):
        check_capturable(torch.device("cuda"), False, kind)
    check_capturable(torch.device("cuda"), False, "wcfm")


def test_cli_pretrain_coupling_is_saved(tmp_path):
    out = tmp_path / "run"
    rc = main(["pretrain", "--data", "synthetic", "--config", "tiny", "--steps", "3", "--batch-size", "8",
               "--coupling", "c2ot", "--ckpt-every", "3", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    state = json.loads(next(out.rglob("state.json")).read_text())
    assert state["model_config"]["coupling"] == "c2ot"


@pytest.mark.parametrize("kind", ["independent", "wcfm"])
def test_tensor_couplings_compile_fullgraph(kind):
    """The couplings without a host assignment stay inside a fullgraph compile of the loss."""
    torch.manual_seed(0)
    m = FlowFM(get_config("tiny", length=L, coupling=kind))
    x = torch.randn(8, 3, L)
    torch._dynamo.reset()
    try:
        torch.manual_seed(1)
        loss = torch.compile(m.loss, fullgraph=True, backend="eager")(x)
        torch.manual_seed(1)
        torch.testing.assert_close(loss, m.loss(x))
    finally:
        torch._dynamo.reset()
