"""The optimizers a config can name, as typed factories: their arguments are the settings' description.

conf/optimizer/*.yaml point at these with ``_partial_: true``; training calls the partial with the
model's parameters. Checkpoints of 0.1.0 name torch.optim.Adam/AdamW/SGD, checked against the same
arguments (vae_cli.settings.TARGETS).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import torch
from pydantic import Field

from vae_cli.typed import NonNegFloat, PosFloat

Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = Annotated[list[Beta], Field(min_length=2, max_length=2)]


def adam(params: Iterable[Any], lr: PosFloat = 1e-3, betas: Betas = (0.9, 0.999), eps: PosFloat = 1e-8,
         weight_decay: NonNegFloat = 0.0, amsgrad: bool = False, fused: bool | None = None) -> torch.optim.Adam:
    """Adam (Kingma and Ba 2015); fused=true runs one kernel for the whole update."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                            fused=fused)


def adamw(params: Iterable[Any], lr: PosFloat = 1e-3, betas: Betas = (0.9, 0.999), eps: PosFloat = 1e-8,
          weight_decay: NonNegFloat = 1e-2, amsgrad: bool = False, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW: Adam with decoupled weight decay (Loshchilov and Hutter 2019)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                             fused=fused)


def sgd(params: Iterable[Any], lr: PosFloat = 1e-2, momentum: NonNegFloat = 0.0, dampening: NonNegFloat = 0.0,
        weight_decay: NonNegFloat = 0.0, nesterov: bool = False) -> torch.optim.SGD:
    """SGD with (optionally Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov)
