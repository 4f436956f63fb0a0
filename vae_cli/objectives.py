"""Training objectives: what `vae train` maximises (conf/objective/*.yaml).

An objective sees a model only through ``posterior(x)`` (a distribution over z with ``rsample``
and ``log_prob``), ``prior`` and ``decode(z)``, so it works for any posterior and prior the model
offers. Every objective also returns the true ELBO's terms (KL weight 1) from its own draws, which
training logs as ``split/elbo``; its own value is logged beside it as ``split/objective``.

* ``ELBO()``: recon - w * KL (Kingma and Welling 2014), w = beta times the warm-up. KL in closed
  form where the posterior and prior have one, else the one-sample estimate log q(z|x) - log p(z).
* ``IWAE(k, dreg)``: L_k = log (1/k) sum_i p(x|z_i) [p(z_i)/q(z_i|x)]^w, z_i ~ q(z|x) (Burda, Grosse
  and Salakhutdinov 2016, eq. 8; w = 1 is their bound, w < 1 a tempered one for beta and the
  warm-up; k = 1 is the one-sample ELBO). ``dreg``: the doubly-reparameterised gradient for the
  encoder (Tucker, Lawson, Gu and Maddison 2019), whose variance does not grow with k.
  ``start``: the fraction of the run trained on the ELBO before the bound takes over (Burda et al.
  2016, section 5.2: a VAE trained on further with the IWAE bound gains log-likelihood and active units);
  the k-sample step costs about k decodes, so the cheap ELBO steps do most of the learning first.

``free_bits`` (Kingma et al. 2016, the IAF paper): the KL term becomes sum_d max(free_bits, KL_d),
KL_d averaged over the batch, so the encoder is not pushed to use less than ``free_bits`` nats per
latent dimension. Per dimension where the posterior and prior are diagonal Gaussians; otherwise the
whole KL is one group with the threshold free_bits * latent_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vae_cli.model import closed_form_kl
from vae_cli.typed import PosInt

# A point of the run, as the fraction done (VAEModule.progress: steps, or trainer.max_time's clock).
RunFraction = Annotated[float, Field(ge=0, lt=1)]


@dataclass
class Terms:
    """One batch through an objective."""

    loss: torch.Tensor              # scalar to minimise (the negated objective, averaged over the batch)
    objective: torch.Tensor         # scalar, detached: the objective's value, nats per example
    recon: torch.Tensor             # (B,) detached: E_q log p(x|z), the true ELBO's first term
    kl: torch.Tensor                # (B,) detached: KL(q(z|x) || p(z)), its second
    kl_dims: torch.Tensor | None    # (B, D) detached: KL per latent dimension (diagonal Gaussians only)
    mean: torch.Tensor              # (B, D) detached: E_q[z] (or the draws' mean), for the active units


def diagonal_normal(d: Distribution) -> Normal | None:
    """The Normal under Independent(Normal, 1): a diagonal Gaussian over z; None for anything else."""
    if isinstance(d, Independent) and isinstance(d.base_dist, Normal) and d.reinterpreted_batch_ndims == 1:
        return d.base_dist
    return None


def kl_per_dim(q: Distribution, prior: Distribution) -> torch.Tensor | None:
    """KL(q_d || p_d) per dimension, (B, D), where both are diagonal Gaussians; else None."""
    qn, pn = diagonal_normal(q), diagonal_normal(prior)
    if qn is None or pn is None:
        return None
    return kl_divergence(qn, pn)


def posterior_mean(q: Distribution, z: torch.Tensor) -> torch.Tensor:
    """E_q[z] per example, (B, D): the mean where the distribution has one, else the mean of the draws z (..., B, D)."""
    try:
        mean = q.mean
    except NotImplementedError:
        return z.reshape(-1, *z.shape[-2:]).mean(0)
    return mean if mean.shape == z.shape[-2:] else mean.expand(z.shape[-2:])


def kl_penalty(kl: torch.Tensor, kl_dims: torch.Tensor | None, free_bits: float, latent_dim: int) -> torch.Tensor:
    """The KL term of the training loss, a scalar: the batch mean of kl, or with free bits
    sum_d max(free_bits, mean_batch KL_d) (one group, threshold free_bits * D, without kl_dims)."""
    if free_bits <= 0:
        return kl.mean()
    if kl_dims is not None:
        return kl_dims.mean(0).clamp(min=free_bits).sum()
    return kl.mean().clamp(min=free_bits * latent_dim)


class Objective(nn.Module):
    """The interface: ``terms(model, x, kl_weight, free_bits)`` -> Terms. No parameters of its own.
    ``start`` > 0: training uses the ELBO until that fraction of the run is done (VAEModule)."""

    name = "objective"
    start = 0.0

    def terms(self, model, x: torch.Tensor, kl_weight: float = 1.0, free_bits: float = 0.0) -> Terms:
        raise NotImplementedError

    def check(self, beta: float, kl_warmup_steps: int, free_bits: float) -> None:
        """Refuse settings this objective cannot honour: ValueError with a one-line message."""


class ELBO(Objective):
    """The ELBO, recon - w * KL, one reparameterised draw per example (the default)."""

    name = "elbo"

    def __init__(self) -> None:
        super().__init__()

    def terms(self, model, x: torch.Tensor, kl_weight: float = 1.0, free_bits: float = 0.0) -> Terms:
        q, prior = model.posterior(x), model.prior
        z = q.rsample()                                   # (B, D)
        recon = model.decode(z).log_prob(x)               # (B,)
        kl_dims = kl_per_dim(q, prior)
        kl = kl_dims.sum(-1) if kl_dims is not None else closed_form_kl(q, prior)
        if kl is None:                                    # e.g. a flow posterior: the one-sample estimate
            kl = q.log_prob(z) - prior.log_prob(z)
        penalty = kl_penalty(kl, kl_dims, free_bits, z.shape[-1])
        objective = recon.mean() - kl_weight * penalty
        return Terms(-objective, objective.detach(), recon.detach(), kl.detach(),
                     None if kl_dims is None else kl_dims.detach(), posterior_mean(q, z).detach())


class IWAE(Objective):
    """The importance-weighted bound with k samples; dreg: the DReG estimator for the encoder's gradient;
    start: the fraction of the run trained on the ELBO first (0: the bound from the first step)."""

    name = "iwae"

    def __init__(self, k: PosInt = 5, dreg: bool = False, start: RunFraction = 0.0) -> None:
        super().__init__()
        self.k, self.dreg, self.start = k, dreg, start

    def check(self, beta: float, kl_warmup_steps: int, free_bits: float) -> None:
        if free_bits > 0:
            raise ValueError(f"free_bits={free_bits} is not allowed with objective=iwae: the IWAE bound has no KL "
                             "term to floor; use objective=elbo with free_bits, or kl_warmup_steps with iwae")

    def terms(self, model, x: torch.Tensor, kl_weight: float = 1.0, free_bits: float = 0.0) -> Terms:
        q, prior = model.posterior(x), model.prior
        z = q.rsample((self.k,))                          # (k, B, D)
        log_px_z = model.decode(z).log_prob(x)            # (k, B)
        log_pz = prior.log_prob(z)                        # (k, B)
        log_q = stopped_log_prob(model, x, q, z) if self.dreg and torch.is_grad_enabled() else q.log_prob(z)
        log_w = log_px_z + kl_weight * (log_pz - log_q)   # (k, B): tempered weights (w = 1: p(x, z) / q(z|x))
        bound = torch.logsumexp(log_w, 0) - math.log(self.k)   # (B,)
        if self.dreg and z.requires_grad and torch.is_grad_enabled():
            # DReG: the encoder's gradient reaches it through z alone (log q above has its parameters
            # stopped). With normalised weights v_i, d bound / dz_i = v_i d log_w_i / dz_i; DReG
            # weighs it by (1 - w) + w v_i instead, i.e. v_i^2 at w = 1 (eq. 8 of Tucker et al.).
            v = torch.softmax(log_w.detach(), 0)            # (k, B)
            scale = ((1 - kl_weight) + kl_weight * v).unsqueeze(-1)
            z.register_hook(lambda g: g * scale)
        objective = bound.mean()
        # The true ELBO from the same draws: recon averaged over the k draws, KL in closed form where there is one.
        kl_dims = kl_per_dim(q, prior)
        kl = kl_dims.sum(-1) if kl_dims is not None else closed_form_kl(q, prior)
        if kl is None:
            kl = (q.log_prob(z) - log_pz).mean(0)
        return Terms(-objective, objective.detach(), log_px_z.detach().mean(0), kl.detach(),
                     None if kl_dims is None else kl_dims.detach(), posterior_mean(q, z).detach())


def stopped_log_prob(model, x: torch.Tensor, q: Distribution, z: torch.Tensor) -> torch.Tensor:
    """log q(z|x) with q's parameters held fixed (gradient to z only): the DReG term.

    For a diagonal Gaussian, q rebuilt from detached mean and scale; for any other posterior,
    model.posterior run again with every parameter of the model detached.
    """
    qn = diagonal_normal(q)
    if qn is not None:
        return Independent(Normal(qn.loc.detach(), qn.scale.detach(), validate_args=False), 1,
                           validate_args=False).log_prob(z)
    from torch.func import functional_call

    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    return functional_call(_PosteriorLogProb(model), {**{f"model.{k}": v for k, v in params.items()},
                                                      **{f"model.{k}": v for k, v in buffers.items()}}, (x, z))


class _PosteriorLogProb(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.posterior(x).log_prob(z)
