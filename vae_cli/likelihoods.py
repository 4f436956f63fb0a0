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

from vae_cli.typed import ImageShape, PosFloat

Scale = Literal["fixed", "shared", "pixel"]
SCALES = get_args(Scale)


class Bernoulli(nn.Module):
    """p(x|z) = prod_i Bernoulli(x_i; sigmoid(logits_i)), evaluated on logits (numerically stable)."""

    name = "bernoulli"

    def forward(self, logits: torch.Tensor) -> Distribution:
        # validate_args=False: log_prob also takes grey levels in [0, 1] (as -BCE, like
        # pytorch/examples), and the per-call support checks cost time in the training loop.
        return Independent(_Bernoulli(logits=logits, validate_args=False), 3, validate_args=False)


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
        self.scale, self.min_log_sigma = scale, math.log(min_sigma)
        shape = {"fixed": (), "shared": (), "pixel": tuple(image_shape)}[scale]
        log_sigma = torch.full(shape, math.log(sigma))
        if scale == "fixed":
            self.register_buffer("log_sigma", log_sigma)
        else:
            self.log_sigma = nn.Parameter(log_sigma)

    @staticmethod
    def check_settings(args: dict) -> None:
        """min_sigma <= sigma (learned sigmas start at sigma and stay above min_sigma)."""
        sigma, min_sigma = args.get("sigma", 0.1), args.get("min_sigma", 1e-3)
        if args.get("scale", "shared") not in SCALES:
            raise ValueError(f"scale={args['scale']!r} is not allowed: expected one of {', '.join(SCALES)}")
        if not 0 < min_sigma <= sigma:
            raise ValueError(f"min_sigma={min_sigma} is not allowed: expected a number > 0 and <= sigma ({sigma})")

    def forward(self, out: torch.Tensor) -> Distribution:
        loc = torch.sigmoid(out)                                           # (..., C, H, W)
        sigma = self.log_sigma.clamp_min(self.min_log_sigma).exp().expand_as(loc)
        return Independent(Normal(loc, sigma, validate_args=False), 3, validate_args=False)
