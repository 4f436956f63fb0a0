"""ESS and Pareto k-hat on weight sets whose answers are known."""

from __future__ import annotations

import math

import torch

from vae_cli.diagnostics import ess, pareto_khat


def test_ess_of_equal_weights_is_k_and_of_one_dominant_weight_is_one():
    assert torch.allclose(ess(torch.zeros(100, 3)), torch.full((3,), 100.0, dtype=torch.float64))
    lw = torch.full((50, 2), -math.inf)
    lw[0] = 0.0
    assert torch.allclose(ess(lw), torch.ones(2, dtype=torch.float64))
    lw[7] = 0.0                                   # two equal weights, the rest zero
    assert torch.allclose(ess(lw), torch.full((2,), 2.0, dtype=torch.float64))
    # ESS is scale-free: adding a constant to every log weight changes nothing
    lw = torch.randn(1000, 4, dtype=torch.float64)
    assert torch.allclose(ess(lw), ess(lw + 123.0))
    # log-normal weights with variance s^2 of log w: ESS/k -> exp(-s^2)
    s = 0.5
    big = s * torch.randn(200_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert abs(ess(big).item() / 200_000 - math.exp(-s * s)) < 0.01


def test_khat_recovers_the_tail_index_of_pareto_weights():
    """w = U^(-xi), U ~ Uniform(0, 1), has a generalized Pareto tail of shape xi."""
    g = torch.Generator().manual_seed(0)
    for xi in (0.2, 0.5, 0.9, 1.3):
        u = torch.rand(4000, 40, generator=g, dtype=torch.float64)
        khat = pareto_khat(-xi * u.log())
        assert abs(khat.mean().item() - xi) < 0.08, (xi, khat.mean())


def test_khat_is_small_for_light_tails_and_handles_degenerate_weights():
    g = torch.Generator().manual_seed(1)
    light = 0.1 * torch.randn(3000, 20, generator=g, dtype=torch.float64)   # nearly equal weights
    assert (pareto_khat(light) < 0.5).all()
    flat = pareto_khat(torch.zeros(100, 2))
    assert (flat == -math.inf).all()                                          # nothing to fit: perfect
    assert torch.isnan(pareto_khat(torch.randn(24, 2))).all()                 # too few draws to say
    with_inf = torch.randn(500, 2, generator=g, dtype=torch.float64)
    with_inf[:10] = -math.inf                                                 # draws with zero weight
    assert torch.isfinite(pareto_khat(with_inf)).all()
