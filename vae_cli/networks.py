"""Encoder and decoder bodies.

An encoder maps x (B, C, H, W) to the mean and log-variance of q(z|x), each (B, D).
A decoder maps z (..., D) to the parameters of p(x|z), (..., C, H, W): logits for Bernoulli,
the mean for Gaussian. A new architecture is one class here plus one yaml in conf/model/; the typed arguments of
``__init__`` are the settings' description (vae_cli.settings checks every config against them).
"""

from __future__ import annotations

import math

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from vae_cli.typed import ImageShape, PosInt, PosInts

# The encoder's log-variance is bounded smoothly to (-LOGVAR_BOUND, LOGVAR_BOUND): sigma stays in
# (1e-3, 1e3), so exp() never overflows and ordinary learning rates never produce NaNs.
LOGVAR_BOUND = 14.0


def bounded_logvar(raw: torch.Tensor) -> torch.Tensor:
    """A soft clamp (tanh) that keeps gradients alive, unlike a hard clamp."""
    return LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)


class _ELUFunction(torch.autograd.Function):
    """elu(x) = max(x, exp(min(x, 0)) - 1); its derivative exp(min(x, 0)) is kept from forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        e = x.clamp(max=0).exp()                 # the derivative: 1 for x > 0, exp(x) below
        ctx.save_for_backward(e)
        # The ELU as a maximum: e - 1 is 0 (< x) for x > 0, and exp(x) - 1 >= x for x <= 0. One
        # elementwise pass over e - 1, in place, instead of torch.where(x > 0, x, e - 1) with its
        # comparison and mask: the conv's CPU step went from 51.8 to 42.0 ms (README, Speed).
        return (e - 1).clamp_min_(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (e,) = ctx.saved_tensors
        return grad * e


class ELU(nn.Module):
    """The ELU (Clevert et al. 2016, alpha 1), as nn.ELU computes it, from exp rather than expm1.

    Why: on a CPU torch's ELU runs on expm1, which this build did not vectorise on an AMD EPYC:
    227 us against 80 for this on a (128, 200) tensor (python bench/kernels.py, 2 threads; on an
    Intel Xeon with AVX-512 the two are within 20% either way); exp(x) - 1 differs
    from expm1(x) by at most one float32 rounding near 0 (6e-8).
    No parameters: checkpoints are the same as with nn.ELU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ELUFunction.apply(x)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no activation on the output layer


class MLPEncoder(nn.Module):
    """x -> hidden ReLU layers -> (mu, logvar)."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, hidden: PosInts) -> None:
        super().__init__()
        self.net = _mlp([math.prod(image_shape), *hidden, 2 * latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.net(x.flatten(1)).chunk(2, dim=-1)  # (B, D) each
        return mu, bounded_logvar(raw)


class MLPDecoder(nn.Module):
    """z -> hidden ReLU layers (``hidden`` read from the image side, so reversed) -> (C, H, W)."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, hidden: PosInts) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = _mlp([latent_dim, *reversed(hidden), math.prod(image_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.image_shape)  # (..., C, H, W)


Channels = Annotated[list[PosInt], Field(min_length=2, max_length=2)]
# The conv networks' hidden activation. ReLU units of a wide layer die in Adam's first steps (its
# first update is lr * sign(g), and g_ij = delta_i h_j has one sign along a unit's row since h >= 0,
# so the whole row moves its pre-activation by lr * sum_j h_j): with channels [64,128] and hidden
# 512 every unit of the encoder's second convolution died within 300 steps and the posterior
# collapsed (README, Posterior collapse). ELU units cannot die. "relu" stays the class default, so a
# checkpoint saved before this setting existed rebuilds as it was trained; conf/model/conv.yaml says elu.
Activation = Literal["relu", "elu"]
ACTIVATIONS = {"relu": nn.ReLU, "elu": ELU}


class _Conv(nn.Module):
    @staticmethod
    def check_settings(args: dict) -> None:
        """Two stride-2 layers: height and width must be divisible by 4 (28 and 32 are)."""
        shape = args["image_shape"]
        if shape[1] % 4 or shape[2] % 4:
            raise ValueError(f"image_shape={shape} is not allowed: model=conv needs height and width divisible "
                             "by 4 (28, 32); set dataset.shape")


def _check_conv_shape(image_shape: list[int]) -> None:
    _Conv.check_settings({"image_shape": list(image_shape)})


class ConvEncoder(_Conv):
    """Two stride-2 convolutions (H -> H/4), then a linear layer to (mu, logvar)."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, channels: Channels, hidden: PosInt,
                 activation: Activation = "relu") -> None:
        super().__init__()
        _check_conv_shape(image_shape)
        c, h, w = image_shape
        c1, c2 = channels
        act = ACTIVATIONS[activation]
        self.net = nn.Sequential(
            nn.Conv2d(c, c1, 4, 2, 1), act(),   # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 4, 2, 1), act(),  # (B, c2, H/4, W/4)
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), hidden), act(),
            nn.Linear(hidden, 2 * latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.net(x).chunk(2, dim=-1)  # (B, D) each
        return mu, bounded_logvar(raw)


class ConvDecoder(_Conv):
    """The mirror of ConvEncoder: linear to (c2, H/4, W/4), two stride-2 transposed convolutions."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, channels: Channels, hidden: PosInt,
                 activation: Activation = "relu") -> None:
        super().__init__()
        _check_conv_shape(image_shape)
        c, h, w = image_shape
        c1, c2 = channels
        self.image_shape = tuple(image_shape)
        act = ACTIVATIONS[activation]
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), act(),
            nn.Linear(hidden, c2 * (h // 4) * (w // 4)), act(),
            nn.Unflatten(1, (c2, h // 4, w // 4)),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), act(),  # (B, c1, H/2, W/2)
            nn.ConvTranspose2d(c1, c, 4, 2, 1),              # (B, C, H, W)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*lead, *self.image_shape)  # (..., C, H, W)


# model=resnet: the conv layout with residual blocks at each resolution.
# Stages: 1 to 4, each a stride-2 convolution (so height and width must be divisible by 2**stages).
ResNetChannels = Annotated[list[PosInt], Field(min_length=1, max_length=4)]


def _groups(channels: int) -> int:
    """GroupNorm's group count: up to 8 groups that divide ``channels``."""
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016): x + conv(elu(norm(conv(elu(norm(x)))))).

    GroupNorm, not BatchNorm: GroupNorm normalises each example by its own statistics, so an
    example's output never depends on the rest of its batch, and training and evaluation compute the
    same function. BatchNorm mixes a batch's examples in training and switches to running averages in
    eval mode; the importance-sampled bounds (IWAE, evaluate's estimators) need q(z|x) and p(x|z) to be
    per-example functions that stay the same between training and evaluation.
    ELU, not ReLU: ReLU units of this project's conv network died early in training (see Activation).
    The second convolution starts at zero, so every block starts as the identity (a stable start
    however deep the network is).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels), ELU(), nn.Conv2d(channels, channels, 3, 1, 1),
            nn.GroupNorm(_groups(channels), channels), ELU(), nn.Conv2d(channels, channels, 3, 1, 1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _ResNet(nn.Module):
    @staticmethod
    def check_settings(args: dict) -> None:
        """One stride-2 layer per stage: height and width must be divisible by 2**len(channels)."""
        shape, stages = args["image_shape"], len(args["channels"])
        if shape[1] % 2**stages or shape[2] % 2**stages:
            raise ValueError(f"image_shape={shape} is not allowed: model=resnet with {stages} stages "
                             f"(channels={args['channels']}) needs height and width divisible by {2**stages} "
                             "(28 and 32 are divisible by 4); set dataset.shape or model.encoder.channels")

    @staticmethod
    def bottleneck(image_shape: ImageShape, channels: list[int]) -> tuple[int, int, int]:
        """The checked settings' smallest feature map, (channels[-1], H / 2**stages, W / 2**stages)."""
        _ResNet.check_settings({"image_shape": list(image_shape), "channels": list(channels)})
        scale = 2 ** len(channels)
        return channels[-1], image_shape[1] // scale, image_shape[2] // scale


class ResNetEncoder(_ResNet):
    """Per stage: a stride-2 convolution (H -> H/2), then ``blocks`` residual blocks; then a hidden
    linear layer to (mu, logvar)."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, channels: ResNetChannels, blocks: PosInt,
                 hidden: PosInt) -> None:
        super().__init__()
        last, hs, ws = self.bottleneck(image_shape, channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([image_shape[0], *channels[:-1]], channels):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), *(ResBlock(c_out) for _ in range(blocks))]
        self.net = nn.Sequential(
            *layers,                                                    # (B, last, hs, ws)
            nn.GroupNorm(_groups(last), last), ELU(),
            nn.Flatten(),
            nn.Linear(last * hs * ws, hidden), ELU(),
            nn.Linear(hidden, 2 * latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.net(x).chunk(2, dim=-1)  # (B, D) each
        return mu, bounded_logvar(raw)


class ResNetDecoder(_ResNet):
    """The mirror of ResNetEncoder: linear layers to (channels[-1], H/scale, W/scale), then per stage
    (last first) ``blocks`` residual blocks and a stride-2 transposed convolution (H -> 2H)."""

    def __init__(self, image_shape: ImageShape, latent_dim: PosInt, channels: ResNetChannels, blocks: PosInt,
                 hidden: PosInt) -> None:
        super().__init__()
        last, hs, ws = self.bottleneck(image_shape, channels)
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = [
            nn.Linear(latent_dim, hidden), ELU(),
            nn.Linear(hidden, last * hs * ws),
            nn.Unflatten(1, (last, hs, ws)),                            # (B, last, hs, ws)
        ]
        outs = [image_shape[0], *channels[:-1]]
        for c_in, c_out in zip(reversed(channels), reversed(outs)):
            layers += [*(ResBlock(c_in) for _ in range(blocks)),
                       nn.GroupNorm(_groups(c_in), c_in), ELU(), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)]
        self.net = nn.Sequential(*layers)  # the last transposed convolution gives (B, C, H, W), no activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*lead, *self.image_shape)  # (..., C, H, W)
