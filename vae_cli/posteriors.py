"""Posterior families q(z|x) (conf/posterior/): the diagonal Gaussian and an inverse autoregressive flow.

The encoder (vae_cli.networks) maps x to (mu, logvar), each (B, D). A posterior family turns them
(and, for a flow, x itself) into q(z|x), a torch Distribution with batch shape (B,) and event shape
(D,), ``rsample`` and ``log_prob``; ``point(q)`` is the one code the pictures use for an input.

- ``gaussian``: q(z|x) = N(mu, diag sigma^2), the default (Kingma and Welling 2014).
- ``iaf``: an inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever and
  Welling 2016, "Improved variational inference with inverse autoregressive flow"):
  z_0 = mu + sigma * eps, then ``transforms`` affine autoregressive steps
  z_t = z_{t-1} * s_t(z_{t-1,<i}, h) + m_t(z_{t-1,<i}, h), each a MADE conditioned on a context h.
  Where h comes from: a small context network of its own on x (an MLP on the flattened pixels,
  ``context_hidden`` -> ``context`` features), so the flow works with any encoder architecture and
  the encoder's (mu, logvar) interface is unchanged. The autoregressive steps are zuko's masked
  autoregressive transforms (fully autoregressive: passes = D) used in the inverse direction
  (``.inv``): drawing z is one MADE pass per step (IAF), log q(z|x) of the flow's own draw comes
  with it (``rsample_and_log_prob``), and log q of any other z inverts each step in D passes.
  Each MADE's output layer starts at zero, so an untrained flow is the identity: q starts as the
  Gaussian (the near-identity initialisation of Kingma et al. 2016).
  ``point(q)`` is the flow applied to the base mean, f(mu) (eps = 0): not the mean of q in general.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal
from torch.distributions.utils import broadcast_all

from vae_cli.typed import ImageShape, PosInt, PosInts


class Posterior(nn.Module):
    """A posterior family: ``forward(x, mu, logvar)`` -> q(z|x), batch (B,), event (D,)."""

    def forward(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> Distribution:
        raise NotImplementedError

    def point(self, q: Distribution) -> torch.Tensor:
        """One code per input, (B, D): what the pictures encode x to."""
        return q.mean


class DiagonalNormal(Normal):
    """torch's Normal, built for the training loop: no broadcast of loc and scale where their shapes
    already match, no argument checks, and ``rsample`` as loc + eps * scale in one op (addcmul).

    Why: q(z|x) is built and drawn from at every training step, and there the Python around these
    few ops costs more than their arithmetic on a (128, 20) batch: in place in a CPU training step
    of the default mlp, torch's Normal and its rsample took about 75 us more than the ops alone
    (README, Speed). The values are torch's: eps comes from the same generator call (randn is
    empty().normal_(), as torch's rsample draws it); addcmul rounds loc + eps * scale once, not twice.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        if loc.shape != scale.shape:
            loc, scale = broadcast_all(loc, scale)
        self.loc, self.scale = loc, scale
        Distribution.__init__(self, loc.shape, validate_args=False)

    def expand(self, batch_shape: torch.Size | tuple, _instance: Normal | None = None) -> Normal:
        return super().expand(batch_shape, _instance=self._get_checked_instance(DiagonalNormal, _instance))

    def rsample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        return torch.addcmul(self.loc, eps, self.scale)


def diagonal_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    """N(mu, diag exp(logvar)): batch shape mu.shape[:-1], event shape (D,)."""
    return Independent(DiagonalNormal(mu, (0.5 * logvar).exp()), 1, validate_args=False)


class GaussianPosterior(Posterior):
    """q(z|x) = N(mu(x), diag sigma(x)^2), the default; ``point`` is its mean."""

    def forward(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> Distribution:
        return diagonal_gaussian(mu, logvar)


class IAFPosterior(Posterior):
    """q(z|x): the diagonal Gaussian followed by ``transforms`` IAF steps conditioned on a context of x."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, transforms: PosInt = 2,
                 hidden: PosInts = (64, 64), context: PosInt = 32, context_hidden: PosInts = (256,)) -> None:
        super().__init__()
        from zuko.flows.autoregressive import MaskedAutoregressiveTransform
        from zuko.lazy import LazyComposedTransform

        sizes = [math.prod(image_shape), *context_hidden, context]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.context_net = nn.Sequential(*layers[:-1])           # x (B, C*H*W) -> h (B, context)
        steps = []
        for i in range(transforms):
            order = torch.arange(latent_dim) if i % 2 == 0 else torch.arange(latent_dim).flip(0)  # alternate
            made = MaskedAutoregressiveTransform(features=latent_dim, context=context, order=order,
                                                 hidden_features=list(hidden))
            final = made.hyper[-1] if hasattr(made, "hyper") else None
            if final is not None:                                 # start at the identity (s = 1, m = 0)
                nn.init.zeros_(final.weight)
                nn.init.zeros_(final.bias)
            steps.append(made.inv)                                # the inverse: sampling is one pass
        self.flow = LazyComposedTransform(*steps)                 # z -> z_0 (the log_prob direction)

    def forward(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> Distribution:
        from zuko.distributions import NormalizingFlow

        h = self.context_net(x.flatten(1))                        # (B, context)
        # NormalizingFlow's transform maps z to the base draw z_0 (log_prob); its inverse draws z,
        # one MADE pass per step.
        return NormalizingFlow(self.flow(h), diagonal_gaussian(mu, logvar))

    def point(self, q: Distribution) -> torch.Tensor:
        return q.transform.inv(q.base.mean)                      # f(mu): the flow at eps = 0
