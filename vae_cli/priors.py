"""Priors p(z) over the latent space (conf/prior/): the standard normal and the VampPrior.

A prior is an ``nn.Module`` (it may hold parameters, saved in checkpoints under ``prior_module.``)
whose ``distribution(vae)`` gives p(z) as a torch Distribution with batch shape () and event shape
(D,), with ``sample(shape)`` -> (*shape, D) and ``log_prob(z)`` for z (..., D) -> (...). It is
given the whole VAE because the VampPrior is evaluated through the VAE's own encoder (and its
posterior family). ``VAE.prior`` calls it; nothing else needs to know which prior a model has.

- ``standard``: p(z) = N(0, I) (Kingma and Welling 2014), no parameters.
- ``vamp``: the VampPrior (Tomczak and Welling 2018, "VAE with a VampPrior"),
  p(z) = (1/K) sum_k q(z | u_k), a mixture of the variational posteriors of K learned
  pseudo-inputs u_k. As in the paper's code, u_k = hardtanh(w_k) clipped to [0, 1] with w_k
  initialised from N(0.05, 0.01): dark images at first, inside [0, 1], so every gradient flows.
"""

from __future__ import annotations

import math
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints, register_kl

from vae_cli.typed import ImageShape, PosInt

# Rows of z evaluated against all K components at once in EqualMixture.log_prob (bounds memory).
_ROWS_TIMES_COMPONENTS = 1 << 21


class Prior(nn.Module):
    """A prior family: ``distribution(vae)`` -> p(z), batch (), event (D,); ``vae`` is the
    vae_cli.model.VAE that holds it (typed nn.Module here: model.py imports this module)."""

    def distribution(self, vae: nn.Module) -> Distribution:
        raise NotImplementedError


class UnitNormal(Normal):
    """N(0, 1) in each dimension: a Normal built from a loc of zeros and a scale of ones (the VAE's
    ``prior_loc`` and ``prior_scale`` buffers), so that KL(q || p) takes the short form below."""


@register_kl(Normal, UnitNormal)
def _kl_normal_unit(q: Normal, p: UnitNormal) -> torch.Tensor:
    """KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s per dimension (Kingma and Welling 2014,
    appendix B). torch's Normal-Normal form gives the same value with p's loc and scale as
    tensors, in about twice the elementwise ops and autograd nodes: at a (128, 20) batch each op
    costs its dispatch, not its arithmetic, and this one runs at every training step."""
    m, s = q.loc, q.scale
    return (m * m + s * s).sub_(1).mul_(0.5).sub_(s.log())


class StandardNormal(Prior):
    """p(z) = N(0, I), the default.

    The distribution object is built once per pair of the VAE's ``prior_loc`` and ``prior_scale``
    buffers and then handed out again (a new pair, as after ``.to(device)``, builds a new one):
    the objectives ask for p(z) at every training step, where building it cost about 25 us in
    place of nothing (README, Speed). Its tensors are the buffers themselves, never copies.
    """

    def __init__(self) -> None:
        super().__init__()
        self._built: tuple[torch.Tensor, torch.Tensor, Distribution] | None = None

    def distribution(self, vae: nn.Module) -> Distribution:
        loc, scale = vae.prior_loc, vae.prior_scale
        built = self._built
        if built is None or built[0] is not loc or built[1] is not scale:
            built = self._built = (loc, scale, Independent(UnitNormal(loc, scale, validate_args=False), 1,
                                                           validate_args=False))
        return built[2]


def diagonal_log_densities(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z_n; loc_k, diag scale_k^2) for every row z_n (N, D) and component k (K, D): (N, K).

    The squared distance sum_d (z_d - loc_kd)^2 / scale_kd^2 expands into two matmuls,
    (z^2) P^T - 2 z (loc P)^T + sum_d loc^2 P with P = 1 / scale^2, so no (N, K, D) tensor is
    built: on one CPU thread, torch's density over that tensor took 34 ms forward and backward for
    128 draws at K=500, D=50, this one 3 ms (bench/kernels.py), against about 13 ms for the ladder's
    whole training step without a VampPrior. The expansion cancels large terms when scale is small
    (P up to ~1e6), so it runs in float64, where the cancellation is harmless, and returns float32
    or z's wider dtype (a float16 log-density would overflow under mixed precision). On a GPU with
    slow float64 (most consumer cards) and small batches torch's tensor may be the faster way.
    """
    z64, loc, prec = z.double(), loc.double(), scale.double().pow(-2)          # (N, D), (K, D), (K, D)
    sq = (z64 * z64) @ prec.T - 2 * z64 @ (loc * prec).T + (loc * loc * prec).sum(-1)   # (N, K)
    norm = scale.double().log().sum(-1) + 0.5 * z.shape[-1] * math.log(2 * math.pi)     # (K,)
    return (-0.5 * sq - norm).to(torch.promote_types(z.dtype, torch.float32))


class EqualMixture(Distribution):
    """(1/K) sum_k c_k(z) for components c with batch shape (K,) and event shape (D,).

    ``log_prob`` evaluates z (..., D) against every component (in chunks of rows, so a large
    batch of draws does not build a (rows, K, D) tensor at once) and takes a logsumexp;
    ``sample`` picks a component uniformly per draw. No rsample: the prior is never
    reparameterised through (its parameters learn through log_prob).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, components: Distribution) -> None:
        if len(components.batch_shape) != 1 or len(components.event_shape) != 1:
            raise ValueError(f"components must have batch shape (K,) and event shape (D,); got "
                             f"{tuple(components.batch_shape)} and {tuple(components.event_shape)}")
        self.components = components
        self.k = components.batch_shape[0]
        super().__init__(torch.Size(), components.event_shape, validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        lead, d = z.shape[:-1], z.shape[-1]
        c = self.components
        if isinstance(c, Independent) and isinstance(c.base_dist, Normal):
            rows = max(1, _ROWS_TIMES_COMPONENTS // self.k)
            per = [diagonal_log_densities(part, c.base_dist.loc, c.base_dist.scale)
                   for part in z.reshape(-1, d).split(rows)]                  # each (n, K)
        else:
            rows = max(1, _ROWS_TIMES_COMPONENTS // (self.k * d))
            per = [c.log_prob(part) for part in z.reshape(-1, 1, d).split(rows)]   # each (n, K)
        return (torch.logsumexp(torch.cat(per), dim=-1) - math.log(self.k)).reshape(lead)

    def sample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        with torch.no_grad():
            c = self.components
            if isinstance(c, Independent) and isinstance(c.base_dist, Normal):
                k = torch.randint(self.k, shape, device=c.base_dist.loc.device)  # (*shape,) a component per draw
                loc, scale = c.base_dist.loc[k], c.base_dist.scale[k]           # (*shape, D)
                return loc + scale * torch.randn_like(loc)
            z = c.sample(shape)                                                  # (*shape, K, D): any family
            k = torch.randint(self.k, shape, device=z.device)
            return z.gather(-2, k[..., None, None].expand(*shape, 1, z.shape[-1])).squeeze(-2)


class VampPrior(Prior):
    """p(z) = (1/K) sum_k q(z | u_k): K = ``components`` learned pseudo-inputs of shape ``image_shape``."""

    def __init__(self, image_shape: ImageShape, components: PosInt = 500) -> None:
        super().__init__()
        self.pseudo_raw = nn.Parameter(torch.empty(components, *image_shape).normal_(0.05, 0.01))

    def pseudo_inputs(self) -> torch.Tensor:
        """u_k in [0, 1]: (K, C, H, W)."""
        return nn.functional.hardtanh(self.pseudo_raw, 0.0, 1.0)

    def distribution(self, vae: nn.Module) -> Distribution:
        # a hierarchy (model=ladder) puts the VampPrior on its top latent only (Tomczak and Welling 2018, 3.2)
        posterior = getattr(vae, "top_posterior", vae.posterior)
        return EqualMixture(posterior(self.pseudo_inputs()))         # components: batch (K,), event (D,)
