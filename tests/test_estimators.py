"""log p(x), the ELBO and the gap against a linear-Gaussian model, where all three are exact."""

from __future__ import annotations

import math

import torch

from linear_gaussian import exact_log_px, exact_recon, data, make
from vae_cli.estimators import bits_per_dim, elbo, estimate, iwae, mean_and_stderr


def test_exact_posterior_gives_exact_log_px_for_every_k():
    torch.manual_seed(0)
    model, W, b, s = make()
    x = data(model, 50)
    truth = exact_log_px(x, W, b, s)
    for k in (1, 7, 100):
        got = iwae(model, x, k)
        assert torch.allclose(got, truth, atol=1e-9, rtol=0), (k, (got - truth).abs().max())
    # and the gap, KL(q || p(z|x)), is zero up to the Monte Carlo error of the recon term
    r = estimate(model, x, 2000)
    assert r["gap"].abs().mean() < 0.05


def test_iwae_rises_with_k_towards_log_px_and_never_above():
    torch.manual_seed(0)
    model, W, b, s = make(shrink=0.6, inflate=3.0)   # a poorer q: biased mean, too wide
    x = data(model, 400)
    truth = exact_log_px(x, W, b, s).mean().item()
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        m, se = mean_and_stderr(iwae(model, x, k, rows=4096))
        means.append(m)
        ses.append(se)
        assert m <= truth + 3 * se + 1e-9, (k, m, truth)
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert truth - means[0] > 0.3                      # the ELBO's gap is real for this q ...
    assert truth - means[-1] < 0.25 * (truth - means[0])  # ... and k=1000 closes most of it


def test_k1_is_a_single_sample_elbo():
    torch.manual_seed(0)
    model, W, b, s = make(shrink=0.8, inflate=2.0)
    x = data(model, 4000)
    one = iwae(model, x, 1)
    analytic = elbo(model, x)["elbo"]
    diff = one - analytic
    m, se = mean_and_stderr(diff)
    assert abs(m) < 4 * se + 1e-6, (m, se)


def test_elbo_terms_match_a_hand_computation():
    torch.manual_seed(0)
    model, W, b, s = make(shrink=0.8, inflate=2.0)
    x = data(model, 20)
    q = model.posterior(x)
    mu, var = q.mean, q.variance                       # (B, DZ)
    hand_recon = exact_recon(x, mu, var, W, b, s)
    hand_kl = 0.5 * (var + mu**2 - 1 - var.log()).sum(1)   # KL(N(mu, var) || N(0, I)), closed form
    r = estimate(model, x, 20000, rows=200000)
    assert torch.allclose(r["kl"], hand_kl, atol=1e-10)
    # Monte Carlo with 20000 draws: about 0.02 nats of standard error per example
    assert torch.allclose(r["recon"], hand_recon, atol=0.15)
    assert (r["recon"] - hand_recon).mean().abs() < 0.03
    assert torch.allclose(r["elbo"], hand_recon - hand_kl, atol=0.15)
    # ELBO <= log p(x) for every example
    assert (hand_recon - hand_kl <= exact_log_px(x, W, b, s) + 1e-9).all()


def test_closed_form_kl_agrees_with_monte_carlo():
    torch.manual_seed(0)
    model, *_ = make(shrink=0.7, inflate=0.3)
    x = data(model, 3)
    q, p = model.posterior(x), model.prior
    z = q.sample((200_000,))                            # (S, B, DZ)
    log_ratio = q.log_prob(z) - p.log_prob(z)           # (S, B)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    closed = torch.distributions.kl_divergence(q, p)
    assert ((mc - closed).abs() < 4 * se).all(), (mc, closed, se)


def test_chunking_does_not_change_the_estimate():
    model, *_ = make(shrink=0.6, inflate=3.0)
    x = data(model, 30)
    torch.manual_seed(5)
    a = estimate(model, x, 64, rows=30 * 64)            # one chunk
    torch.manual_seed(5)
    b = estimate(model, x, 64, rows=30 * 64)
    assert torch.equal(a["log_px"], b["log_px"])
    torch.manual_seed(5)
    c = estimate(model, x, 64, rows=30 * 7)             # 7 samples at a time, last chunk partial
    # different chunking draws the same distribution: the estimates agree to Monte Carlo error
    assert (a["log_px"] - c["log_px"]).abs().mean() < 0.5


def test_bits_per_dim_conventions():
    assert bits_per_dim(-784 * math.log(2), 784, "dynamic") == 1.0
    assert bits_per_dim(0.0, 10, "dequantize") == 8.0     # a uniform density on [0,1]^D: 8 bits per byte
    assert bits_per_dim(-100.0, 784, "none") is None


# --------------------------------------------------------------------------- refined proposal, curve


def test_refined_proposal_reaches_the_exact_posterior_and_log_px():
    """The true posterior of this model is a diagonal Gaussian, so q* can equal it: ELBO(q*) and
    importance sampling with q* both give the exact log p(x), whatever the poor encoder started from."""
    from vae_cli.estimators import log_mean_exp, log_weights, refine

    torch.manual_seed(0)
    model, W, b, s = make(shrink=0.6, inflate=3.0)
    x = data(model, 100)
    truth = exact_log_px(x, W, b, s)
    lj = lambda z: model.log_joint(x, z)  # noqa: E731
    q_star, elbo_star = refine(lj, model.proposal(x), model.prior, steps=300)
    log_px = log_mean_exp(log_weights(lj, q_star, 500))
    assert (log_px - truth).abs().max() < 0.02
    m, se = mean_and_stderr(elbo_star - truth)
    assert abs(m) < 0.01 and (elbo_star <= truth + 0.02).all()               # ELBO(q*) <= log p(x)
    encoder_elbo = elbo(model, x)["elbo"]
    assert (truth - encoder_elbo).mean() > 1.0                               # a real amortization gap, closed


class _TwoModes:
    """An unnormalised 2-d target with two narrow modes and a known normaliser Z: what a poor
    encoder of a 2-d VAE meets. 30% of the mass sits where q looks, 70% far away."""

    def __init__(self, log_z: float = 5.0):
        from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

        loc = torch.tensor([[0.5, 0.5], [-2.0, 1.5]], dtype=torch.float64)
        self.p = MixtureSameFamily(Categorical(torch.tensor([0.3, 0.7], dtype=torch.float64)),
                                   Independent(Normal(loc, 0.05), 1))
        self.log_z = log_z

    def __call__(self, z: torch.Tensor) -> torch.Tensor:                      # (..., B, 2) -> (..., B)
        return self.p.log_prob(z) + self.log_z


def test_refined_restarts_find_a_mode_the_encoder_misses():
    from torch.distributions import Independent, Normal

    from vae_cli.estimators import log_mean_exp, log_weights, refine

    torch.manual_seed(0)
    target, batch = _TwoModes(), 4
    q = Independent(Normal(torch.full((batch, 2), 0.45, dtype=torch.float64), torch.full((batch, 2), 0.1,
                                                                                            dtype=torch.float64)), 1)
    prior = Independent(Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)), 1)
    one, _ = refine(target, q, prior, steps=200, restarts=0)
    missed = log_mean_exp(log_weights(target, one, 2000))
    assert torch.allclose(missed, torch.full((batch,), target.log_z + math.log(0.3), dtype=torch.float64), atol=0.05)
    many, elbo_star = refine(target, q, prior, steps=200, restarts=4, search=2048)
    found = log_mean_exp(log_weights(target, many, 2000))
    assert torch.allclose(found, torch.full((batch,), target.log_z, dtype=torch.float64), atol=0.05)
    assert (elbo_star < target.log_z).all()    # one Gaussian cannot hold both modes: ELBO(q*) < log Z


def test_curve_over_k_is_flat_for_the_exact_posterior_and_rises_for_a_poor_one():
    from vae_cli.estimators import curve_ks, log_px_curve

    assert curve_ks(5000) == [1, 10, 100, 1000, 5000] and curve_ks(100) == [1, 10, 100] and curve_ks(1) == [1]
    torch.manual_seed(0)
    model, W, b, s = make()
    x = data(model, 20)
    r = estimate(model, x, 1000)
    curve = log_px_curve(r["log_w"], curve_ks(1000))                           # (5, B)
    assert torch.allclose(curve, exact_log_px(x, W, b, s).expand_as(curve), atol=1e-9)
    model, W, b, s = make(shrink=0.6, inflate=3.0)
    x = data(model, 400)
    means = log_px_curve(estimate(model, x, 1000)["log_w"], curve_ks(1000)).mean(1)
    assert all(a < b for a, b in zip(means, means[1:])) and means[-1] <= exact_log_px(x, W, b, s).mean() + 0.05
    assert torch.allclose(means[-1], iwae(model, x, 1000).mean(), atol=0.2)


def test_refined_proposal_stays_a_proper_gaussian_when_its_optimisation_diverges():
    """refined.lr=100 (also 1e4, 1e12) drove Adam's loc to NaN and `vae evaluate` ended in a traceback
    (Normal: found invalid values). Each Gaussian now falls back to the best finite one it passed
    through (at worst its start, q(z|x)), and the examples where that happened are reported."""
    from vae_cli.estimators import log_mean_exp, log_weights, refine

    torch.manual_seed(0)
    model, W, b, s = make(shrink=0.6, inflate=3.0)
    x = data(model, 8)
    truth = exact_log_px(x, W, b, s)
    lj = lambda z: model.log_joint(x, z)  # noqa: E731
    for lr in (1e12, 1e300):
        stats = {}
        q_star, elbo_star = refine(lj, model.proposal(x), model.prior, steps=20, lr=lr, restarts=2, search=64,
                                   stats=stats)
        comp = q_star.component_distribution.base_dist
        assert torch.isfinite(comp.loc).all() and torch.isfinite(comp.scale).all() and (comp.scale > 0).all()
        assert stats["diverged"].shape == (8,) and stats["diverged"].all()
        assert torch.isfinite(elbo_star).all() and (elbo_star <= truth + 0.05).all()
        log_px = log_mean_exp(log_weights(lj, q_star, 500))          # still importance sampling: finite, near
        assert torch.isfinite(log_px).all() and (log_px - truth).abs().max() < 1.0
        assert (log_px - truth).mean() < 0.05
    stats = {}
    refine(lj, model.proposal(x), model.prior, steps=20, stats=stats)           # the default lr: nothing to report
    assert not stats["diverged"].any()
