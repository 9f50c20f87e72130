"""The CUDA-graph sampling path: graph == eager, cache reuse, re-capture on a new shape or moved
parameters, the output contract (fresh tensors, never the graph's static buffers). Needs CUDA."""
from __future__ import annotations

import gc

import pytest
import torch

from flowfm_fast.integrate import METHODS, clear_graph_cache, graph_cache_info, sample, solvers
from flowfm_fast.models import FlowFM, get_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_graph_cache()
    yield
    clear_graph_cache()


def _model(velocity="dit") -> FlowFM:
    torch.manual_seed(0)
    model = FlowFM(get_config("tiny", length=60, velocity=velocity)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(model, batch, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    return (torch.randn(batch, 3, 60, device="cuda", generator=g),
            torch.randn(batch, model.cfg.encoder.z_dim, device="cuda", generator=g))


@pytest.mark.parametrize("velocity", ["dit", "resnet"])
@pytest.mark.parametrize("method", METHODS)
def test_graph_equals_eager(method, velocity):
    model = _model(velocity)
    x0, z = _inputs(model, 4)
    eager = model.sample(z, steps=4, method=method, x0=x0, graph=False)
    graphed = model.sample(z, steps=4, method=method, x0=x0, graph=True)
    again = model.sample(z, steps=4, method=method, x0=x0, graph=True)
    assert graph_cache_info()["captures"] == 1 and graph_cache_info()["replays"] == 2
    assert float((graphed - eager).abs().max()) <= 1e-6
    assert torch.equal(graphed, again)
    assert not torch.allclose(graphed, x0, atol=1e-3)


def test_graph_is_the_default_on_cuda():
    model = _model()
    x0, z = _inputs(model, 2)
    model.sample(z, steps=2, x0=x0)
    assert graph_cache_info()["captures"] == 1


def test_cache_reuse_and_recapture_on_new_shape():
    model = _model()
    for seed in range(3):
        x0, z = _inputs(model, 8, seed)
        eager = model.sample(z, steps=8, x0=x0, graph=False)
        torch.testing.assert_close(model.sample(z, steps=8, x0=x0, graph=True), eager, atol=1e-6, rtol=0)
    assert graph_cache_info() == {"captures": 1, "replays": 3, "cached": 1}
    x0, z = _inputs(model, 5)
    got = model.sample(z, steps=8, x0=x0, graph=True)
    torch.testing.assert_close(got, model.sample(z, steps=8, x0=x0, graph=False), atol=1e-6, rtol=0)
    assert graph_cache_info()["captures"] == 2
    model.sample(z, steps=4, x0=x0, graph=True)                     # new step count
    model.sample(z, steps=4, method="heun", x0=x0, graph=True)      # new method
    model.sample(z, grid=[0.0, 0.3, 1.0], x0=x0, graph=True)        # new grid
    assert graph_cache_info()["captures"] == 5
    x0, z = _inputs(model, 8, 9)
    model.sample(z, steps=8, x0=x0, graph=True)                     # the first shape again: cached
    assert graph_cache_info()["captures"] == 5 and graph_cache_info()["cached"] == 5


def test_output_is_fresh_and_not_overwritten():
    model = _model()
    x0a, za = _inputs(model, 3, 1)
    x0b, zb = _inputs(model, 3, 2)
    a = model.sample(za, steps=3, x0=x0a, graph=True)
    a_keep = a.clone()
    b, traj_b = model.sample(zb, steps=3, x0=x0b, graph=True, return_trajectory=True)
    c = model.sample(zb, steps=3, x0=x0b, graph=True)
    assert torch.equal(a, a_keep), "a later replay overwrote an earlier result"
    assert a.data_ptr() != c.data_ptr()
    (solves,) = list(solvers._GRAPHS.values())
    statics = {e.plan.x.data_ptr() for e in solves.values()} | {e.plan.traj.data_ptr() for e in solves.values()
                                                                 if e.plan.traj is not None}
    assert statics.isdisjoint({a.data_ptr(), b.data_ptr(), c.data_ptr(), traj_b.data_ptr()})
    assert torch.equal(traj_b[-1], b) and torch.equal(traj_b[0], x0b)
    assert not torch.equal(a, c)


def test_in_place_weight_update_seen_and_moved_weights_recaptured():
    model = _model()
    x0, z = _inputs(model, 2)
    before = model.sample(z, steps=2, x0=x0, graph=True)
    with torch.no_grad():
        for p in model.velocity.parameters():
            p.mul_(1.1)
    after = model.sample(z, steps=2, x0=x0, graph=True)
    assert graph_cache_info()["captures"] == 1
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, model.sample(z, steps=2, x0=x0, graph=False), atol=1e-6, rtol=0)
    p = next(model.velocity.parameters())
    p.data = p.data.clone() * 0.9                                    # new storage: the graph would read freed memory
    moved = model.sample(z, steps=2, x0=x0, graph=True)
    assert graph_cache_info()["captures"] == 2
    torch.testing.assert_close(moved, model.sample(z, steps=2, x0=x0, graph=False), atol=1e-6, rtol=0)


def test_plain_velocity_fn_with_tensor_cond():
    w = torch.randn(4, 16, device="cuda")

    def field(x, t, z, scale):
        return torch.tanh(x) * torch.cos(t)[:, None] + scale * z @ w

    x0 = torch.randn(6, 16, device="cuda")
    z = torch.randn(6, 4, device="cuda")
    scale = torch.tensor(0.5, device="cuda")
    for method in METHODS:
        eager = sample(field, x0, 5, method, z=z, graph=False, scale=scale)
        graphed = sample(field, x0, 5, method, z=z, graph=True, scale=scale)
        assert float((graphed - eager).abs().max()) <= 1e-6
    scale2 = torch.tensor(-1.0, device="cuda")                       # new values, same shape: replayed
    torch.testing.assert_close(sample(field, x0, 5, "rk4", z=z, graph=True, scale=scale2),
                               sample(field, x0, 5, "rk4", z=z, graph=False, scale=scale2), atol=1e-6, rtol=0)
    assert graph_cache_info()["captures"] == len(METHODS)


def test_gradients_needed():
    model = _model()
    x0, z = _inputs(model, 2)
    net = model.velocity
    with pytest.raises(ValueError, match="graph=True"):
        sample(net, x0, 2, z=z, graph=True)                          # parameters require grad
    out = sample(net, x0, 2, z=z)                                    # auto: eager, differentiable
    assert out.requires_grad and graph_cache_info()["captures"] == 0


def test_graphs_freed_with_the_model():
    model = _model()
    x0, z = _inputs(model, 2)
    model.sample(z, steps=2, x0=x0)
    assert graph_cache_info()["cached"] == 1
    del model
    gc.collect()
    assert graph_cache_info()["cached"] == 0
