"""Encoder and decoder bodies.

An encoder maps x (B, C, H, W) to the mean and log-variance of q(z|x), each (B, D).
A decoder maps z (..., D) to the parameters of p(x|z), (..., C, H, W): logits for Bernoulli,
the mean for Gaussian. A new architecture is one class here plus one yaml in conf/model/.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The encoder's log-variance is bounded smoothly to (-LOGVAR_BOUND, LOGVAR_BOUND): sigma stays in
# (1e-3, 1e3), so exp() never overflows and ordinary learning rates never produce NaNs.
LOGVAR_BOUND = 14.0


def bounded_logvar(raw: torch.Tensor) -> torch.Tensor:
    """A soft clamp (tanh) that keeps gradients alive, unlike a hard clamp."""
    return LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no activation on the output layer


class MLPEncoder(nn.Module):
    """x -> hidden ReLU layers -> (mu, logvar)."""

    def __init__(self, image_shape: list[int], latent_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.net = _mlp([math.prod(image_shape), *hidden, 2 * latent_dim])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.net(x.flatten(1)).chunk(2, dim=-1)  # (B, D) each
        return mu, bounded_logvar(raw)


class MLPDecoder(nn.Module):
    """z -> hidden ReLU layers (``hidden`` read from the image side, so reversed) -> (C, H, W)."""

    def __init__(self, image_shape: list[int], latent_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = _mlp([latent_dim, *reversed(hidden), math.prod(image_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.image_shape)  # (..., C, H, W)


def _check_conv_shape(image_shape: list[int]) -> None:
    if image_shape[1] % 4 or image_shape[2] % 4:
        raise ValueError(f"model=conv needs height and width divisible by 4 (28 or 32), got {image_shape}")


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (H -> H/4), then a linear layer to (mu, logvar)."""

    def __init__(self, image_shape: list[int], latent_dim: int, channels: list[int], hidden: int) -> None:
        super().__init__()
        _check_conv_shape(image_shape)
        c, h, w = image_shape
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(c, c1, 4, 2, 1), nn.ReLU(),   # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU(),  # (B, c2, H/4, W/4)
            nn.Flatten(),
            nn.Linear(c2 * (h // 4) * (w // 4), hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.net(x).chunk(2, dim=-1)  # (B, D) each
        return mu, bounded_logvar(raw)


class ConvDecoder(nn.Module):
    """The mirror of ConvEncoder: linear to (c2, H/4, W/4), two stride-2 transposed convolutions."""

    def __init__(self, image_shape: list[int], latent_dim: int, channels: list[int], hidden: int) -> None:
        super().__init__()
        _check_conv_shape(image_shape)
        c, h, w = image_shape
        c1, c2 = channels
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, c2 * (h // 4) * (w // 4)), nn.ReLU(),
            nn.Unflatten(1, (c2, h // 4, w // 4)),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(),  # (B, c1, H/2, W/2)
            nn.ConvTranspose2d(c1, c, 4, 2, 1),              # (B, C, H, W)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*lead, *self.image_shape)  # (..., C, H, W)
