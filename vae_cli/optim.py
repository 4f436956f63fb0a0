"""The optimizers a config can name, as typed factories: their arguments are the settings' description.

conf/optimizer/*.yaml point at these with ``_partial_: true``; training calls the partial with the
model's parameters. conf/scheduler/*.yaml likewise name a learning-rate schedule, which training
calls with the optimizer and the run's progress (the fraction of the run done, in [0, 1]).
Checkpoints of 0.1.0 name torch.optim.Adam/AdamW/SGD, checked against the same arguments
(vae_cli.settings.TARGETS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import torch
from pydantic import Field

from vae_cli.errors import NewRunsOnly
from vae_cli.typed import NonNegFloat, PosFloat

Beta = Annotated[float, Field(ge=0, lt=1)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]
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


def _check_sgd(args: dict) -> None:
    """momentum < 1 (at 1 or more the velocity grows without bound: Adam's betas are < 1 likewise) and
    dampening <= 1, for new runs (NewRunsOnly: a checkpoint saved with other values still loads)."""
    momentum, dampening = args.get("momentum", 0.0), args.get("dampening", 0.0)
    if isinstance(momentum, int | float) and momentum >= 1:
        raise NewRunsOnly(f"momentum={momentum} is not allowed: expected a number >= 0 and < 1")
    if isinstance(dampening, int | float) and dampening > 1:
        raise NewRunsOnly(f"dampening={dampening} is not allowed: expected a number >= 0 and <= 1")


sgd.check_settings = _check_sgd  # type: ignore[attr-defined]  # read by vae_cli.settings.description


def cosine(optimizer: torch.optim.Optimizer, progress: Callable[[], float],
           final: UnitFloat = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay of every group's lr to ``final`` times it over the run (SGDR without restarts,
    Loshchilov and Hutter 2017): lr_t = lr (final + (1 - final) (1 + cos(pi t)) / 2), t = progress().

    t is the fraction of the run done, not a step count, so that the decay also ends on time in a
    run bounded by trainer.max_time (VAEModule.progress)."""
    def factor(_: int) -> float:
        t = min(1.0, max(0.0, progress()))
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
