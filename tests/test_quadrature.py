"""Exact log p(x) by quadrature, against closed forms: linear-Gaussian VAEs (1-d and 2-d latents)
and a two-mode target with a known normaliser."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from linear_gaussian import data, exact_log_px as closed_form, make
from vae_cli.quadrature import exact_log_px, log_px_quadrature


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread


def far_out(model, z0: list[float]) -> torch.Tensor:
    """x = W z0 + b: the posterior sits near z0, many prior widths out."""
    return model.decoder(torch.tensor([z0], dtype=torch.float64))           # (1, 1, 2, 3)


@pytest.mark.parametrize("dz", [1, 2])
@pytest.mark.parametrize("s", [0.5, 0.01])   # 0.01: posterior widths 0.005 and 0.01 (sharp)
def test_linear_gaussian_matches_closed_form(dz, s):
    model, W, b, s = make(s=s, dz=dz)
    x = torch.cat([data(model, 6), far_out(model, [7.0, -8.5][:dz])])      # (7, 1, 2, 3)
    got, info = exact_log_px(model, x)
    truth = closed_form(x, W, b, s)
    assert got.shape == (7,) and got.dtype == torch.float64
    assert info["converged"].all() and (info["change"] < 1e-3).all()
    assert torch.allclose(got, truth, atol=1e-6, rtol=0), (got - truth).abs().max()


def test_plain_and_packed_calls_agree():
    model, W, b, s = make(s=0.05, dz=2)
    x = data(model, 5)
    packed, info_p = exact_log_px(model, x)
    plain, info = exact_log_px(model, x, packed=False)
    assert torch.allclose(packed, plain, atol=1e-12, rtol=0)
    assert torch.equal(info["evals"], info_p["evals"])
    assert info["points"] >= info["evals"].sum() == info_p["points"]       # padding only when plain


def two_modes(dim: int):
    """Per example, w1 N(m1, C1) + w2 N(m2, C2) times e^c: narrow modes, one far from the origin."""
    m1 = torch.tensor([[0.37, -1.21], [2.03, 0.5], [-0.11, 0.23]], dtype=torch.float64)[:, :dim]
    m2 = torch.tensor([[-7.3, 8.1], [-8.9, -9.2], [6.66, 4.4]], dtype=torch.float64)[:, :dim]
    rot = torch.tensor([[0.8, -0.6], [0.6, 0.8]], dtype=torch.float64)[:dim, :dim]
    c1 = rot @ torch.diag(torch.tensor([0.01, 0.05], dtype=torch.float64)[:dim] ** 2) @ rot.T  # tilted
    c2 = torch.eye(dim, dtype=torch.float64) * 0.01**2
    w = torch.tensor([[0.3, 0.7], [0.999, 0.001], [0.02, 0.98]], dtype=torch.float64)
    c = torch.tensor([-250.0, 3.0, 40.0], dtype=torch.float64)

    def log_joint(z: torch.Tensor) -> torch.Tensor:                          # (N, B, D) -> (N, B)
        a = MultivariateNormal(m1, c1).log_prob(z) + w[:, 0].log()
        b = MultivariateNormal(m2, c2).log_prob(z) + w[:, 1].log()
        return torch.logaddexp(a, b) + c

    return log_joint, c                                                     # log normaliser: c


@pytest.mark.parametrize("dim", [1, 2])
def test_two_narrow_modes_give_the_known_normaliser(dim):
    log_joint, truth = two_modes(dim)
    got, info = log_px_quadrature(log_joint, 3, dim)
    assert info["converged"].all()
    # the 0.001-weight mode of example 1 alone is worth 1e-3 nats: missing it would show
    assert torch.allclose(got, truth, atol=1e-6, rtol=0), (got - truth).abs().max()


def test_float32_log_joint_and_minus_inf_regions():
    def log_joint(z: torch.Tensor) -> torch.Tensor:                          # (N, 2, 1) -> (N, 2)
        # N(1.5, 0.02^2), cut to -inf below 1 (25 widths out, so the normaliser stays 1), in float32
        v = -0.5 * ((z[..., 0] - 1.5) / 0.02) ** 2 - math.log(0.02 * math.sqrt(2 * math.pi))
        return torch.where(z[..., 0] > 1.0, v, -math.inf).float()
    got, info = log_px_quadrature(log_joint, 2, 1)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.zeros(2, dtype=torch.float64), atol=1e-5)   # float32 rounding
    assert info["converged"].all()


def test_info_shapes_and_bounds_on_calls():
    log_joint, _ = two_modes(2)
    got, info = log_px_quadrature(log_joint, 3, 2, chunk=1000)
    assert got.shape == (3,)
    for key in ("converged", "change", "evals", "levels", "width"):
        assert info[key].shape == (3,), key
    assert info["converged"].dtype == torch.bool and info["evals"].dtype == torch.int64
    assert info["calls"] >= info["points"] / 1000 and (info["levels"] >= 1).all()


def test_caps_stop_with_converged_false():
    log_joint, _ = two_modes(2)
    got, info = log_px_quadrature(log_joint, 3, 2, max_levels=2)
    assert not info["converged"].any() and (info["levels"] <= 2).all() and torch.isfinite(got).all()
    got, info = log_px_quadrature(log_joint, 3, 2, max_evals=1500)
    assert not info["converged"].any() and (info["evals"] <= 1500).all()


def test_nan_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        log_px_quadrature(lambda z: torch.full(z.shape[:2], math.nan), 2, 2)


def test_three_latent_dims_are_refused():
    model, _, _, _ = make(dz=3)
    with pytest.raises(ValueError, match=r"latent_dim <= 2.*latent_dim=3"):
        exact_log_px(model, data(model, 2))
