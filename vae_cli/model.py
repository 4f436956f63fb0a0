"""The VAE as a plain torch module: encoder q(z|x), prior p(z), decoder and likelihood p(x|z).

The ELBO (Kingma and Welling 2014, eq. 7), in nats per example, summed over pixels:

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))
            =        recon         -        kl

recon is a one-sample reparameterised estimate; kl is in closed form (two diagonal Gaussians).
No Lightning here: sampling, pictures and estimators import this module alone; training wraps it
in ``vae_cli.module.VAEModule``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vae_cli.typed import PosInt


class VAE(nn.Module):
    """A VAE with a standard-normal prior and a diagonal-Gaussian posterior q(z|x)."""

    def __init__(self, latent_dim: PosInt, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.register_buffer("prior_loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(latent_dim), persistent=False)

    @property
    def prior(self) -> Distribution:
        """p(z) = N(0, I)."""
        return Independent(Normal(self.prior_loc, self.prior_scale, validate_args=False), 1, validate_args=False)

    def posterior(self, x: torch.Tensor) -> Distribution:
        """q(z|x) = N(mu(x), diag sigma(x)^2), batch shape (B,), event shape (D,)."""
        mu, logvar = self.encoder(x)  # (B, D) each
        return Independent(Normal(mu, (0.5 * logvar).exp(), validate_args=False), 1, validate_args=False)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z) for z of shape (..., D); event shape (C, H, W)."""
        return self.likelihood(self.decoder(z))

    def proposal(self, x: torch.Tensor) -> Distribution:
        """The importance-sampling proposal for log p(x): q(z|x), batch (B,), event (D,).

        The estimators see a model only through ``proposal`` and ``log_joint``, so any model that
        gives a distribution over z with ``sample``/``rsample`` and ``log_prob`` works with them.
        """
        return self.posterior(x)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(x|z) + log p(z), in nats: z (..., B, D), x (B, C, H, W) -> (..., B)."""
        return self.decode(z).log_prob(x) + self.prior.log_prob(z)

    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (recon, kl), each (B,), in nats: ELBO = recon - kl."""
        q = self.posterior(x)
        z = q.rsample()                        # (B, D), the reparameterisation trick
        recon = self.decode(z).log_prob(x)     # (B,)  one-sample E_q[log p(x|z)]
        kl = kl_divergence(q, self.prior)      # (B,)  closed form
        return recon, kl
