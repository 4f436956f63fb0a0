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
