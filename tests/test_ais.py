"""AIS, reverse AIS and BDMC against a linear-Gaussian model, where log p(x) and p(z|x) are exact."""

from __future__ import annotations

import math
import tracemalloc

import pytest
import torch
from torch.distributions import Independent, Normal

from linear_gaussian import data, exact_log_px, make
from vae_cli.ais import ais, bdmc, reverse_ais, sigmoid_beta, sigmoid_schedule
from vae_cli.estimators import elbo, log_mean_exp, mean_and_stderr
from vae_cli.likelihoods import Bernoulli
from vae_cli.model import VAE
from vae_cli.networks import MLPDecoder, MLPEncoder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread


def test_schedule_runs_from_zero_to_one_sigmoidally():
    b = sigmoid_schedule(10)
    assert b.shape == (11,) and b.dtype == torch.float64
    assert b[0] == 0 and b[-1] == 1 and (b.diff() > 0).all()
    assert b.diff()[0] < b.diff()[5] and b.diff()[-1] < b.diff()[5]   # finer at both ends
    assert torch.equal(sigmoid_schedule(1), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_the_schedule_is_computed_a_beta_at_a_time_and_matches_the_sigmoid_schedule():
    for steps in (1, 7, 200):
        s = torch.sigmoid(torch.linspace(-4, 4, steps + 1, dtype=torch.float64))
        torch.testing.assert_close(sigmoid_schedule(steps), (s - s[0]) / (s[-1] - s[0]), rtol=0, atol=1e-15)
        assert sigmoid_beta(0, steps) == 0.0 and sigmoid_beta(steps, steps) == 1.0   # the ends, exactly
    with pytest.raises(ValueError, match="steps=0"):
        sigmoid_beta(0, 0)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("run", [ais, reverse_ais])
def test_a_long_schedule_takes_no_memory_before_the_chain_starts(run):
    """ais.steps=10^9 filled 24 GB with its schedule before the first transition (the kernel killed
    `vae evaluate`): the betas are now made one at a time, so a long run costs time, not memory."""
    model, *_ = make()
    x = data(model, 2)
    calls = []

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 3:
            raise _Stop                                # a few transitions in: enough
        return model.log_joint(x, z)

    q = model.proposal(x)
    args = (log_joint, q) if run is ais else (log_joint, q, q.sample())
    tracemalloc.start()
    try:
        with pytest.raises(_Stop):
            run(*args, steps=10**7, leapfrog=1, chains=2, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10**6                                # a schedule of 10^7 floats held whole: ~320 MB


def test_ais_from_a_poor_q_finds_the_exact_log_px():
    torch.manual_seed(0)                               # the one-sample ELBO below draws from the global RNG
    model, W, b, s = make(shrink=0.6, inflate=3.0)     # biased mean, too wide: ELBO ~4 nats short
    x = data(model, 100)
    truth = exact_log_px(x, W, b, s)
    log_w = ais(lambda z: model.log_joint(x, z), model.proposal(x), steps=200, leapfrog=5, chains=16, seed=0)
    m, se = mean_and_stderr(log_mean_exp(log_w) - truth)
    elbo_gap = (truth - elbo(model, x)["elbo"]).mean().item()
    assert elbo_gap > 3.0
    assert abs(m) < 3 * se + 0.01, (m, se)
    assert abs(m) < 0.02 * elbo_gap, (m, elbo_gap)


def test_with_the_exact_posterior_every_weight_is_exact():
    """q = p(z|x) makes every f_t the posterior, so each increment is dbeta log p(x) wherever z is."""
    model, W, b, s = make()
    x = data(model, 20)
    truth = exact_log_px(x, W, b, s)
    q = model.proposal(x)
    fwd = ais(lambda z: model.log_joint(x, z), q, steps=30, leapfrog=3, chains=8, seed=0, step_size=0.3)
    assert (fwd - truth).abs().max() < 1e-6
    rev = reverse_ais(lambda z: model.log_joint(x, z), q, q.sample(), steps=30, leapfrog=3, chains=8, seed=0)
    assert (rev + truth).abs().max() < 1e-6           # reverse weights estimate 1 / p(x)


def test_one_step_is_plain_importance_sampling():
    model, *_ = make(shrink=0.6, inflate=3.0)
    x = data(model, 10)
    q = model.proposal(x)
    log_w = ais(lambda z: model.log_joint(x, z), q, steps=1, leapfrog=2, chains=5, seed=3)
    torch.manual_seed(3)                               # ais draws z_0 ~ q first thing after seeding
    z = q.sample((5,))
    assert torch.allclose(log_w, model.log_joint(x, z) - q.log_prob(z), atol=1e-12)


def test_bdmc_sandwiches_the_exact_log_px_and_tightens_with_steps():
    model, W, b, s = make(shrink=0.6, inflate=3.0)
    gaps = []
    for steps in (5, 100):
        r = bdmc(model, 100, steps=steps, leapfrog=5, chains=4, batch_size=60, seed=0)
        truth = exact_log_px(r["x"], W, b, s)
        lo, lo_se = mean_and_stderr(r["lower"] - truth)
        up, up_se = mean_and_stderr(r["upper"] - truth)
        assert lo < 3 * lo_se and up > -3 * up_se, (steps, lo, up)
        assert torch.allclose(r["gap"], r["upper"] - r["lower"])
        gaps.append(r["gap"].mean().item())
    assert gaps[0] > 0.5                               # 5 steps: a wide sandwich ...
    assert 0 < gaps[1] < 0.15 * gaps[0], gaps          # ... 100 steps: a tight one (~0.03 nats)


def test_step_size_adapts_to_the_target_acceptance():
    model, *_ = make(shrink=0.6, inflate=3.0)
    x = data(model, 10)
    late = {}
    for target, start in ((0.65, 0.01), (0.65, 1.0), (0.9, 0.05), (0.4, 0.05)):
        stats: dict = {}
        ais(lambda z: model.log_joint(x, z), model.proposal(x), steps=300, leapfrog=3, chains=8, seed=0,
            step_size=start, target_accept=target, stats=stats)
        assert stats["accept"].shape == (300,) and stats["step_size"].shape == (8, 10)
        assert stats["z"].shape == (8, 10, 3)
        late[target, start] = stats["accept"][-100:].mean().item()
    assert abs(late[0.65, 0.01] - 0.65) < 0.1 and abs(late[0.65, 1.0] - 0.65) < 0.1, late
    assert late[0.9, 0.05] > late[0.65, 0.01] > late[0.4, 0.05], late


def test_shapes_dtype_determinism_and_any_log_joint():
    """A float32 target given as a plain callable: weights are (chains, B) float64, reproducible by seed."""
    loc = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]])        # (B=3, D=2)
    init = Independent(Normal(torch.zeros(3, 2), torch.ones(3, 2)), 1)

    def log_joint(z):                                  # (S, B, D) -> (S, B): 7 * N(z; loc, 0.5^2 I)
        return Independent(Normal(loc, 0.5), 1).log_prob(z) + math.log(7.0)

    state = torch.get_rng_state()
    with torch.no_grad():                              # AIS needs gradients in z: it turns them on itself
        a = ais(log_joint, init, steps=100, leapfrog=3, chains=32, seed=1, step_size=0.3)
    assert torch.equal(torch.get_rng_state(), state)   # a seeded run leaves the global RNG alone
    assert a.shape == (32, 3) and a.dtype == torch.float64 and a.isfinite().all()
    assert torch.equal(a, ais(log_joint, init, steps=100, leapfrog=3, chains=32, seed=1, step_size=0.3))
    assert not torch.equal(a, ais(log_joint, init, steps=100, leapfrog=3, chains=32, seed=2, step_size=0.3))
    assert (log_mean_exp(a) - math.log(7.0)).abs().max() < 0.3   # ~0.1 of Monte Carlo error here
    z_exact = loc + 0.5 * torch.randn(3, 2)            # exact samples of the normalised target
    r = reverse_ais(log_joint, init, z_exact, steps=100, leapfrog=3, chains=32, seed=1, step_size=0.3)
    assert r.shape == (32, 3) and r.dtype == torch.float64 and r.isfinite().all()
    assert (-log_mean_exp(r) - math.log(7.0)).abs().max() < 0.3


def test_non_finite_energies_are_rejected():
    """The target is NaN for z_0 > 1 and -inf for z_1 > 1: no chain may move there."""
    init = Independent(Normal(torch.zeros(4, 2, dtype=torch.float64), 0.2), 1)

    def log_joint(z):
        lp = Independent(Normal(torch.zeros_like(z), 1.0), 1).log_prob(z)
        lp = torch.where(z[..., 0] > 1, torch.nan, lp)
        return torch.where(z[..., 1] > 1, -torch.inf, lp)

    stats: dict = {}
    w = ais(log_joint, init, steps=100, leapfrog=5, chains=16, seed=0, step_size=0.5, stats=stats)
    assert w.isfinite().all()
    assert (stats["z"] <= 1).all()
    assert 0 < stats["accept"].mean() < 1


def test_bdmc_on_a_network_vae_under_no_grad_leaves_the_parameters_alone():
    torch.manual_seed(0)
    model = VAE(4, MLPEncoder([1, 4, 4], 4, [16]), MLPDecoder([1, 4, 4], 4, [16]), Bernoulli())
    with torch.no_grad():
        r = bdmc(model, 7, steps=20, leapfrog=2, chains=3, batch_size=5, seed=0)   # a partial last batch
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    for key in ("lower", "upper", "gap"):
        assert r[key].shape == (7,) and r[key].dtype == torch.float64 and r[key].isfinite().all()
    assert r["x"].shape == (7, 1, 4, 4)
    assert r["lower"].mean() < r["upper"].mean()
    again = bdmc(model, 7, steps=20, leapfrog=2, chains=3, batch_size=5, seed=0)
    assert torch.equal(again["lower"], r["lower"]) and torch.equal(again["upper"], r["upper"])
