"""A linear-Gaussian VAE, the case with known answers (Tipping and Bishop 1999, probabilistic PCA).

p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I)  =>  p(x) = N(b, W W^T + s^2 I) exactly, and the
posterior is p(z|x) = N(S W^T (x - b) / s^2, S) with S = (I + W^T W / s^2)^-1. With orthogonal
columns in W, S is diagonal, so a diagonal-Gaussian q can equal the true posterior.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from vae_cli.model import VAE

SHAPE = (1, 2, 3)  # x is a tiny "image" of 6 pixels
DX, DZ = 6, 3


class LinearEncoder(nn.Module):
    """q(z|x) = the exact posterior, or a poorer one: mean shrunk by `shrink`, variance times `inflate`."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, s: float, shrink: float = 1.0, inflate: float = 1.0):
        super().__init__()
        self.W, self.b, self.s, self.shrink, self.inflate = W, b, s, shrink, inflate
        self.S = torch.linalg.inv(torch.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s**2)  # diagonal here

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x.flatten(1) - self.b) @ self.W @ self.S / self.s**2          # (B, DZ)
        logvar = torch.log(torch.diagonal(self.S) * self.inflate).expand_as(mu)
        return self.shrink * mu, logvar


class LinearDecoder(nn.Module):
    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.W, self.b = W, b

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W.T + self.b).unflatten(-1, SHAPE)                   # (..., 1, 2, 3)


class FixedGaussian(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, mean: torch.Tensor):
        return Independent(Normal(mean, self.s), 3)


def make(seed: int = 0, s: float = 0.5, shrink: float = 1.0, inflate: float = 1.0, dz: int = DZ):
    """(model, W, b, s) in float64, with orthogonal columns in W; ``dz`` (1 to 3) latent dimensions."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(DX, dz, generator=g, dtype=torch.float64))
    W = Q * torch.tensor([2.0, 1.0, 0.5][:dz], dtype=torch.float64)          # W^T W diagonal
    b = torch.randn(DX, generator=g, dtype=torch.float64)
    model = VAE(dz, LinearEncoder(W, b, s, shrink, inflate), LinearDecoder(W, b), FixedGaussian(s)).double()
    return model, W, b, s


def exact_log_px(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    cov = W @ W.T + s**2 * torch.eye(DX, dtype=W.dtype)
    return MultivariateNormal(b, covariance_matrix=cov).log_prob(x.flatten(1))


def exact_recon(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, W, b, s) -> torch.Tensor:
    """E_q[log N(x; W z + b, s^2 I)] for q = N(mu, diag var), by hand."""
    resid = x.flatten(1) - mu @ W.T - b
    trace = (W**2 @ var.T).sum(0) if var.ndim == 2 else None                  # tr(W diag(var) W^T) per example
    return -0.5 * DX * math.log(2 * math.pi * s**2) - (resid**2).sum(1) / (2 * s**2) - trace / (2 * s**2)


def data(model, n: int, seed: int = 1) -> torch.Tensor:
    """n draws of x from the model itself: (n, 1, 2, 3)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=g, dtype=torch.float64)
    x = model.decoder(z) + model.likelihood.s * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return x
