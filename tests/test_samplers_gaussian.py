"""Every sampler against a known answer: Gaussian data N(mu, S) with a full covariance.

For Gaussian data the ideal networks are closed-form. Noise prediction at timestep k
(x_k = sqrt(abar) x + sqrt(1 - abar) eps):

    eps*(x_k) = sqrt(1 - abar) (abar S + (1 - abar) I)^-1 (x_k - sqrt(abar) mu),

and the flow-matching velocity of x_t = a x0 + t x1, a = 1 - (1 - s) t, u = x1 - (1 - s) x0:

    v*(x, t) = mu + (t S - (1 - s) a I) (a^2 I + t^2 S)^-1 (x - t mu).

With these, DDIM and every ODE integrator are affine maps of the starting noise, x -> A x + b, so
the distribution they produce from N(0, I) is exactly N(b, A A^T): the tests read A and b off
the sampler (D + 1 calls) and compare them with (mu, S) without Monte Carlo error. Ancestral DDPM
adds noise inside, so it is checked by sampling.

Stated tolerances (relative Frobenius error of the covariance, max error of the mean):
DDIM's covariance error is first order in 1 / K (monotone), within 3e-2 at K = 100 and 5e-3 at
K = 1000; each ODE integrator monotone in K, Euler (first order; one step collapses onto the
mean) within 5e-2 at 64 steps, the higher-order ones within 1e-2 at 8 steps; ancestral DDPM-1000 within 0.05
of every covariance entry with 40,000 samples (~4 standard errors), respaced to 100 steps within
a relative 0.08 (its own O(1 / K) bias, ~0.045 here, plus sampling error).
"""
from __future__ import annotations

import math

import pytest
import torch

from flowfm_fast.integrate import METHODS, sample as ode_sample
from flowfm_fast.models.diffusion import PREDICTIONS, SPACINGS, CosineSchedule, ddim_sample, ddpm_sample

C, L = 2, 3
D = C * L
SIGMA_MIN = 1e-4


def _gaussian(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=g))
    lam = torch.linspace(0.15, 2.0, D, dtype=torch.float64)
    S = q @ torch.diag(lam) @ q.T
    mu = torch.randn(D, dtype=torch.float64, generator=g)
    return mu, S


class OptimalEps:
    """eps*(x_k, k) of N(mu, S); the network's time input t = 1 - k / T is mapped back to k.
    ``prediction="v"``: v* = sqrt(abar) eps* - sqrt(1 - abar) x0*, x0* = E[x | x_k] =
    mu + sqrt(abar) S (abar S + (1 - abar) I)^-1 (x_k - sqrt(abar) mu), computed directly (not
    through 1 / sqrt(abar), which is ~2e4 at k = T)."""

    def __init__(self, sch: CosineSchedule, mu, S, prediction: str = "eps"):
        self.sch, self.mu, self.prediction = sch, mu, prediction
        ab = sch.alpha_bar
        eye = torch.eye(D, dtype=torch.float64)
        # W_k = sqrt(1 - abar) (abar S + (1 - abar) I)^-1, one per k (k = 0 is never evaluated)
        inv = [torch.linalg.inv(float(a) * S + (1 - float(a)) * eye) for a in ab]
        self.W = torch.stack([math.sqrt(1 - float(a)) * m for a, m in zip(ab, inv)])
        self.X = torch.stack([math.sqrt(float(a)) * S @ m for a, m in zip(ab, inv)])   # x0* = mu + X y
        self.sqrt_ab = ab.sqrt()

    def __call__(self, x, t, z):
        k = int(round((1.0 - float(t[0])) * self.sch.T))
        a = float(self.sqrt_ab[k])
        y = x.reshape(x.shape[0], D) - a * self.mu
        eps = y @ self.W[k].T
        if self.prediction == "v":
            x0 = self.mu + y @ self.X[k].T
            eps = a * eps - math.sqrt(1 - a * a) * x0
        return eps.reshape(x.shape)


def optimal_velocity(mu, S, s: float = SIGMA_MIN):
    eye = torch.eye(D, dtype=torch.float64)

    def v(x, t):
        tt = float(t[0])
        a = 1.0 - (1.0 - s) * tt
        G = (tt * S - (1.0 - s) * a * eye) @ torch.linalg.inv(a * a * eye + tt * tt * S)
        y = x.reshape(x.shape[0], D) - tt * mu
        return (mu + y @ G.T).reshape(x.shape)
    return v


def affine_law(sampler):
    """(mean, covariance) of sampler(x), x ~ N(0, I), for an affine deterministic sampler."""
    basis = torch.cat([torch.zeros(1, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)])
    out = sampler(basis.reshape(D + 1, C, L)).reshape(D + 1, D)
    b = out[0]
    A = (out[1:] - b).T                      # column i = image of e_i
    return b, A @ A.T


def errors(law, mu, S):
    b, cov = law
    return float((b - mu).abs().max()), float(torch.linalg.norm(cov - S) / torch.linalg.norm(S))


def test_affine_law_reads_a_known_map():
    """The harness itself: a hand-made affine map x -> M x + c has law N(c, M M^T)."""
    g = torch.Generator().manual_seed(3)
    M, c = torch.randn(D, D, dtype=torch.float64, generator=g), torch.randn(D, dtype=torch.float64, generator=g)
    b, cov = affine_law(lambda x: (x.reshape(-1, D) @ M.T + c).reshape(x.shape))
    torch.testing.assert_close(b, c)
    torch.testing.assert_close(cov, M @ M.T)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_reproduces_gaussian_and_converges_with_K(spacing, prediction):
    mu, S = _gaussian()
    sch = CosineSchedule(1000)
    eps = OptimalEps(sch, mu, S, prediction)
    z = torch.zeros(D + 1, 1, dtype=torch.float64)
    errs = {}
    for K in (2, 5, 10, 50, 100, 1000):
        errs[K] = errors(affine_law(lambda x: ddim_sample(eps, z, x, sch, K, spacing=spacing,
                                                          prediction=prediction)), mu, S)
    covs = [errs[K][1] for K in sorted(errs)]
    assert all(b < a for a, b in zip(covs, covs[1:])), errs          # first order in 1 / K
    assert errs[100][1] < 3e-2 and errs[1000][1] < 5e-3, errs
    assert errs[100][0] < 5e-2 and errs[1000][0] < 1e-3, errs


def test_trailing_ddim_keeps_the_mean_at_few_steps():
    """Leading spacing starts at k < T from N(0, I), whose mean is not the marginal's
    sqrt(abar_k) mu: at 10 steps the output mean is off by ~0.4; trailing starts at k = T where
    N(0, I) is the marginal (up to abar_T ~ 2e-9) and keeps the mean at any K."""
    mu, S = _gaussian()
    sch = CosineSchedule(1000)
    eps = OptimalEps(sch, mu, S)
    z = torch.zeros(D + 1, 1, dtype=torch.float64)
    lead = errors(affine_law(lambda x: ddim_sample(eps, z, x, sch, 10, spacing="leading")), mu, S)
    trail = errors(affine_law(lambda x: ddim_sample(eps, z, x, sch, 10, spacing="trailing")), mu, S)
    assert lead[0] > 0.1
    assert trail[0] < 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_every_integrator_reproduces_gaussian_and_converges_with_K(method):
    mu, S = _gaussian()
    v = optimal_velocity(mu, S)
    errs = {K: errors(affine_law(lambda x: ode_sample(v, x, K, method)), mu, S) for K in (2, 4, 8, 16, 64)}
    covs = [errs[K][1] for K in sorted(errs)]
    assert all(b < a for a, b in zip(covs, covs[1:])), errs
    K_ok, tol = (64, 5e-2) if method == "euler" else (8, 1e-2)
    assert errs[K_ok][0] < tol and errs[K_ok][1] < tol, (method, errs)


@pytest.mark.parametrize("spacing, prediction", [("leading", "eps"), ("trailing", "v")])
def test_ddpm_ancestral_reproduces_gaussian_covariance(spacing, prediction):
    mu, S = _gaussian()
    sch = CosineSchedule(1000)
    eps = OptimalEps(sch, mu, S, prediction)
    n = 40_000
    x_T = torch.randn(n, C, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = ddpm_sample(eps, torch.zeros(n, 1, dtype=torch.float64), x_T, sch, None,
                      torch.Generator().manual_seed(2), spacing=spacing, prediction=prediction).reshape(n, D)
    assert float((out.mean(0) - mu).abs().max()) < 0.05
    assert float((torch.cov(out.T) - S).abs().max()) < 0.05


def test_ddpm_ancestral_respaced_reproduces_gaussian_covariance():
    mu, S = _gaussian(1)
    sch = CosineSchedule(1000)
    eps = OptimalEps(sch, mu, S)
    n = 40_000
    x_T = torch.randn(n, C, L, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = ddpm_sample(eps, torch.zeros(n, 1, dtype=torch.float64), x_T, sch, 100,
                      torch.Generator().manual_seed(5), spacing="trailing").reshape(n, D)
    assert float((out.mean(0) - mu).abs().max()) < 0.05
    assert float(torch.linalg.norm(torch.cov(out.T) - S) / torch.linalg.norm(S)) < 0.08


def test_a_wrong_eps_fails_the_check():
    """The tolerance can fail: a predictor built for a different covariance misses it."""
    mu, S = _gaussian()
    sch = CosineSchedule(1000)
    wrong = OptimalEps(sch, mu, 1.5 * S)
    z = torch.zeros(D + 1, 1, dtype=torch.float64)
    assert errors(affine_law(lambda x: ddim_sample(wrong, z, x, sch, 100)), mu, S)[1] > 0.2


def test_v_prediction_does_not_amplify_an_error_at_high_noise():
    """The same small output error (1e-2 on every entry) at every step: through eps it is
    amplified by sqrt((1 - abar) / abar) ~ 2e4 at k = T and wrecks trailing DDIM; through v the
    clean estimate moves by at most the error itself."""
    mu, S = _gaussian()
    sch = CosineSchedule(1000)
    z = torch.zeros(D + 1, 1, dtype=torch.float64)
    errs = {}
    for prediction in PREDICTIONS:
        good = OptimalEps(sch, mu, S, prediction)
        bad = lambda x, t, zz, good=good: good(x, t, zz) + 1e-2
        errs[prediction] = errors(affine_law(lambda x: ddim_sample(bad, z, x, sch, 100, spacing="trailing",
                                                                   prediction=prediction)), mu, S)[0]
    assert errs["v"] < 0.05 and errs["eps"] > 1.0, errs


def test_v_target_and_loss_switch():
    from flowfm_fast.models import FlowFM, get_config
    from flowfm_fast.models.diffusion import v_target
    sch = CosineSchedule(1000)
    x, eps = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    k = torch.tensor([1, 500, 1000])
    ab = sch.alpha_bar[k].float().view(-1, 1, 1)
    torch.testing.assert_close(v_target(x, eps, sch, k), ab.sqrt() * eps - (1 - ab).sqrt() * x)
    with pytest.raises(ValueError, match="prediction"):
        get_config("tiny", length=60, prediction="v")              # fm predicts the velocity
    with pytest.raises(ValueError, match="prediction must be"):
        get_config("tiny", length=60, objective="ddpm", prediction="x0")
    torch.manual_seed(0)
    m = FlowFM(get_config("tiny", length=60, objective="ddpm", prediction="v"))
    for p in m.velocity.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x1 = torch.randn(4, 3, 60)
    loss = m.loss(x1, generator=torch.Generator().manual_seed(5))
    # the same draws by hand: noise first, then k (as FlowFM.loss draws them)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x1.shape, generator=g)
    kk = m.schedule.sample_k(4, "cpu", g)
    x_k = m.schedule.q_sample(x1, kk, noise)
    out = m.velocity(x_k, m.schedule.t_net(kk).float(), m.encoder(x1))
    ab = m.schedule.alpha_bar[kk].float().view(-1, 1, 1)
    want = ((out - (ab.sqrt() * noise - (1 - ab).sqrt() * x1)) ** 2).mean()
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="prediction must be one of"):
        ddim_sample(lambda x, t, z: x, torch.zeros(1, 1), torch.zeros(1, 2, 3), sch, 2, prediction="x0")


class _OptimalVelocityNet(torch.nn.Module):
    """The closed-form velocity of N(mu, S) behind FlowFM's velocity interface (z is ignored: the
    data does not depend on it, so E[x | z] = mu and Var(x | z) = S)."""

    def __init__(self, mu, S):
        super().__init__()
        self.v = optimal_velocity(mu, S, s=0.0)

    def forward(self, x, t, z):
        return self.v(x.double(), t.double()).to(x.dtype)


def test_reconstruct_temperature_zero_is_the_conditional_mean_and_one_a_sample():
    """With the optimal velocity, a reconstruction from x0 = 0 is E[x | z] = mu for every window
    (the flow maps 0 to the mean), so its squared error is the data's variance tr(S) / D; one
    from x0 ~ N(0, I) is an independent draw of N(mu, S), whose error is twice that."""
    from flowfm_fast.models import FlowFM, get_config
    mu, S = _gaussian()
    model = FlowFM(get_config("tiny", channels=C, length=L, velocity="resnet")).eval()
    model.velocity = _OptimalVelocityNet(mu, S)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x = (mu + torch.randn(n, D, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(S).T).float()
    x = x.reshape(n, C, L)
    r0 = model.reconstruct(x, 8, "rk4", temperature=0.0, generator=g)
    assert float((r0.reshape(n, D).double() - mu).abs().max()) < 1e-3
    var = float(torch.trace(S)) / D
    mse0 = float(((r0 - x) ** 2).mean())
    mse1 = float(((model.reconstruct(x, 8, "rk4", generator=g) - x) ** 2).mean())
    assert mse0 == pytest.approx(var, rel=0.03)
    assert mse1 == pytest.approx(2 * var, rel=0.03)
