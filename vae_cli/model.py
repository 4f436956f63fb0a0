"""The VAE as a plain torch module: encoder q(z|x), prior p(z), decoder and likelihood p(x|z).

The ELBO (Kingma and Welling 2014, eq. 7), in nats per example, summed over pixels:

    ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z))
            =        recon         -        kl

recon is a one-sample reparameterised estimate; kl is in closed form where torch has one (the
diagonal Gaussian posterior against the standard normal prior), else the Monte Carlo estimate
log q(z|x) - log p(z) at the same draw z (a flow posterior, the VampPrior).

The prior and the posterior family are modules of their own (vae_cli.priors, vae_cli.posteriors;
conf/prior/, conf/posterior/), by default N(0, I) and the diagonal Gaussian: a model built without
them (and a 0.1.0 checkpoint, which has no such keys or weights) is exactly the model of 0.1.0.
No Lightning here: sampling, pictures and estimators import this module alone; training wraps it
in ``vae_cli.module.VAEModule``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from vae_cli.posteriors import GaussianPosterior, Posterior
from vae_cli.priors import Prior, StandardNormal
from vae_cli.typed import PosInt


def closed_form_kl(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """KL(q || p) where torch has a closed form (diagonal Gaussians), else None (a flow, the VampPrior)."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


class LatentModel(nn.Module):
    """What a config's ``model`` builds: a latent-variable model with the interface of VAE below
    (``posterior``, ``prior``, ``proposal``, ``log_joint``, ``decode``, ``elbo_terms``, ``encode``,
    ``latent_dim``, ``device``, ``standard_prior``); ``VAE`` and ``vae_cli.ladder.LadderVAE``."""


class VAE(LatentModel):
    """A VAE: an encoder and a posterior family q(z|x), a prior p(z), a decoder and a likelihood p(x|z)."""

    def __init__(self, latent_dim: PosInt, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module,
                 prior: Prior | None = None, posterior: Posterior | None = None) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        # weights saved as prior_module.* / posterior_module.* (none for the defaults)
        self.prior_module = prior if prior is not None else StandardNormal()
        self.posterior_module = posterior if posterior is not None else GaussianPosterior()
        # N(0, I)'s parameters (not saved); they also tell which device the model is on
        self.register_buffer("prior_loc", torch.zeros(latent_dim), persistent=False)
        self.register_buffer("prior_scale", torch.ones(latent_dim), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.prior_loc.device

    @property
    def standard_prior(self) -> bool:
        """Whether p(z) = N(0, I)."""
        return isinstance(self.prior_module, StandardNormal)

    @property
    def prior(self) -> Distribution:
        """p(z), batch shape (), event shape (D,): N(0, I) by default, or the configured prior."""
        return self.prior_module.distribution(self)

    def posterior(self, x: torch.Tensor) -> Distribution:
        """q(z|x), batch shape (B,), event shape (D,): N(mu(x), diag sigma(x)^2) by default."""
        mu, logvar = self.encoder(x)  # (B, D) each
        return self.posterior_module(x, mu, logvar)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """One code per input, (B, D): the mean of q(z|x) for the Gaussian, f(mu) for a flow."""
        return self.posterior_module.point(self.posterior(x))

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
        """Per-example (recon, kl), each (B,), in nats: ELBO = recon - kl.

        kl is in closed form where torch has one, else log q(z|x) - log p(z) at the same draw z."""
        q, p = self.posterior(x), self.prior
        kl = closed_form_kl(q, p)              # (B,), or None: no closed form
        if kl is None and hasattr(q, "rsample_and_log_prob"):
            z, log_q = q.rsample_and_log_prob()  # a flow: log q(z|x) of its own draw, no inversion
        else:
            z = q.rsample()                    # (B, D), the reparameterisation trick
            log_q = q.log_prob(z) if kl is None else None
        recon = self.decode(z).log_prob(x)     # (B,)  one-sample E_q[log p(x|z)]
        if kl is None:
            kl = log_q - p.log_prob(z)         # (B,)  one-sample Monte Carlo KL
        return recon, kl
