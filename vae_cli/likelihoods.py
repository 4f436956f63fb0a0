"""p(x|z) as torch.distributions objects.

A likelihood module turns the decoder's output (..., C, H, W) into a distribution whose event is
the whole image (``Independent`` over C, H, W), so ``log_prob`` returns one number per example,
in nats, summed over pixels.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn
from torch.distributions import Bernoulli as _Bernoulli
from torch.distributions import Distribution, Independent, Normal
from torch.distributions.utils import broadcast_all

from vae_cli.typed import ImageShape, PosFloat

Scale = Literal["fixed", "shared", "pixel"]
SCALES = get_args(Scale)


class _BernoulliLogProb(torch.autograd.Function):
    """log Bernoulli(x; sigmoid(l)) = x l - softplus(l) for x in [0, 1], summed over the last ``dims``
    dims (0: elementwise). logits carry the broadcast shape; x broadcasts against them.

    The same numbers as torch's Bernoulli.log_prob (-BCE with logits), computed as
    -[(max(l, 0) - x l) + log(1 + exp(-|l|))]: both bracketed terms are >= 0 for x in [0, 1], so
    the sum over pixels cancels nothing. Why by hand: on a CPU, torch's BCE, softplus and log1p
    kernels cost ~5 ns an element on some CPUs (log1p is not vectorised there), while exp and log
    are; and the sum inside the function lets the backward be one in-place expression,
    (sigmoid(l) - x) * -g, with no tensor of pixels allocated but the gradient itself (README,
    Speed). log(1 + e) instead of log1p(e), e in (0, 1], errs by at most one float32 rounding of
    1 + e (6e-8 nats a pixel); tests/test_model.py compares with torch's values and gradients.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor, dims: int) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        ctx.dims = dims
        nll = logits.clamp(min=0).addcmul_(x, logits, value=-1)             # max(l, 0) - x l >= 0
        nll.add_(logits.abs().neg_().exp_().add_(1).log_())                # + log(1 + e^-|l|) >= 0
        return (nll.sum(tuple(range(-dims, 0))) if dims else nll).neg_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        logits, x = ctx.saved_tensors
        g = grad.reshape(grad.shape + (1,) * ctx.dims)                      # (..., 1, 1, 1) for an image
        grad_logits = torch.sigmoid(logits).sub_(x).mul_(g.neg()) if ctx.needs_input_grad[0] else None
        grad_x = (g * logits).sum_to_size(x.shape) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x, None


class BernoulliLogits(_Bernoulli):
    """torch's Bernoulli on logits, with a faster log_prob of the same value (_BernoulliLogProb),
    built without argument checks: p(x|z) is built at every training step, where torch's
    constructor and broadcasts cost more than the few attribute writes they come to (README, Speed)."""

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = False) -> None:
        self.logits = self._param = logits
        Distribution.__init__(self, logits.shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size | tuple, _instance: _Bernoulli | None = None) -> _Bernoulli:
        return super().expand(batch_shape, _instance=self._get_checked_instance(BernoulliLogits, _instance))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.log_prob_sum(value, 0)

    def log_prob_sum(self, value: torch.Tensor, dims: int) -> torch.Tensor:
        """log_prob(value) summed over its last ``dims`` dims, in one function (ImageDistribution)."""
        logits = self.logits
        if logits.shape != value.shape:
            logits, value = broadcast_all(logits, value)  # expanded views, no copies
        # In float32 at least, as autocast runs torch's BCE: in half precision 1 + e rounds to 1 for
        # |l| > 6 or so, and sigmoid(l) to 1, which would bias the value and zero the gradient.
        dtype = torch.promote_types(torch.promote_types(logits.dtype, value.dtype), torch.float32)
        return _BernoulliLogProb.apply(logits.to(dtype), value.to(dtype), dims)


class ImageDistribution(Independent):
    """torch's Independent over an image's (C, H, W), with ``log_prob`` summed over those three
    dims in one reduction. Why: torch's Independent reshapes to (..., C*H*W) and sums the last
    dim, and the gradient flows back through that reshape of an expanded tensor: 35 us more a
    training step of the default mlp on a 2-core CPU (forward and backward of a (128, 1, 28, 28)
    Bernoulli log-density, 297 against 261 us), for the same sums."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        n = self.reinterpreted_batch_ndims  # 3 here; sum(dim=()) would sum every dim
        if n and isinstance(self.base_dist, BernoulliLogits):
            return self.base_dist.log_prob_sum(value, n)
        lp = self.base_dist.log_prob(value)
        return lp.sum(dim=tuple(range(-n, 0))) if n else lp


class Bernoulli(nn.Module):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(logits_i)), evaluated on logits (numerically stable)."""

    name = "bernoulli"

    def forward(self, logits: torch.Tensor) -> Distribution:
        # validate_args=False: log_prob also takes grey levels in [0, 1] (as -BCE, like
        # pytorch/examples), and the per-call support checks cost time in the training loop.
        return ImageDistribution(BernoulliLogits(logits=logits, validate_args=False), 3, validate_args=False)


class Gaussian(nn.Module):
    """p(x|z) = N(x; sigmoid(out), sigma^2 I) with sigma fixed, learned and shared, or learned per pixel.

    The mean goes through a sigmoid so that it lies in the data's range [0, 1].
    ``scale``: ``fixed`` keeps ``sigma``; ``shared`` learns one sigma (initialised at ``sigma``);
    ``pixel`` learns one sigma per pixel and channel. Learned sigmas are kept above ``min_sigma``.
    """

    name = "gaussian"

    def __init__(self, image_shape: ImageShape, scale: Scale = "shared", sigma: PosFloat = 0.1,
                 min_sigma: PosFloat = 1e-3) -> None:
        super().__init__()
        self.check_settings({"scale": scale, "sigma": sigma, "min_sigma": min_sigma})
        # a floor for the learned sigmas; a fixed sigma is what was asked for, whatever min_sigma says
        self.scale, self.min_log_sigma = scale, -math.inf if scale == "fixed" else math.log(min_sigma)
        shape = {"fixed": (), "shared": (), "pixel": tuple(image_shape)}[scale]
        log_sigma = torch.full(shape, math.log(sigma))
        if scale == "fixed":
            self.register_buffer("log_sigma", log_sigma)
        else:
            self.log_sigma = nn.Parameter(log_sigma)

    @staticmethod
    def check_settings(args: dict) -> None:
        """min_sigma <= sigma (learned sigmas start at sigma and stay above min_sigma; a fixed sigma
        has no floor, so scale=fixed takes any sigma)."""
        sigma, min_sigma = args.get("sigma", 0.1), args.get("min_sigma", 1e-3)
        if args.get("scale", "shared") not in SCALES:
            raise ValueError(f"scale={args['scale']!r} is not allowed: expected one of {', '.join(SCALES)}")
        if args.get("scale", "shared") != "fixed" and not 0 < min_sigma <= sigma:
            # either may be the one given: name both, and what each can do
            raise ValueError(f"min_sigma={min_sigma} is not allowed with sigma={sigma}: a learned sigma starts at "
                             "sigma and stays at or above min_sigma > 0 (lower min_sigma, raise sigma, or use scale=fixed)")

    def forward(self, out: torch.Tensor) -> Distribution:
        loc = torch.sigmoid(out)                                           # (..., C, H, W)
        sigma = self.log_sigma.clamp_min(self.min_log_sigma).exp().expand_as(loc)
        return ImageDistribution(Normal(loc, sigma, validate_args=False), 3, validate_args=False)
