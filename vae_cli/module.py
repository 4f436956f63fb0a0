"""Training: the LightningModule around a VAE.

Training minimises -(recon - w * kl) with w = beta (Higgins et al. 2017) times a linear warm-up
(Sønderby et al. 2016). Every logged ``elbo`` is the true ELBO (w = 1) in nats per example, whatever
beta is, so runs with different beta compare on the same scale.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch

from vae_cli.errors import UserError
from vae_cli.model import VAE


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: training stops, keeping the last good checkpoint."""


class VAEModule(pl.LightningModule):
    """Trains a VAE; logs split/elbo, split/recon, split/kl (nats per example)."""

    def __init__(
        self,
        model: VAE,
        optimizer: Callable[..., torch.optim.Optimizer],
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.beta, self.kl_warmup_steps = beta, kl_warmup_steps
        self.config = config  # the run's resolved config, stored in every checkpoint

    def kl_weight(self) -> float:
        """beta, ramped linearly from 0 over the first kl_warmup_steps optimizer steps."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def step(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """The one step shared by train, val and test: ELBO terms, loss, logs."""
        recon, kl = self.model.elbo_terms(x)  # (B,) each
        self._last_terms = (recon.detach(), kl.detach())
        w = self.kl_weight() if split == "train" else 1.0
        loss = -(recon - w * kl).mean()
        elbo = (recon - kl).mean()
        on_step = split == "train"
        log = dict(on_step=on_step, on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log(f"{split}/elbo", elbo, prog_bar=True, **log)
        self.log_dict({f"{split}/recon": recon.mean(), f"{split}/kl": kl.mean()}, **log)
        return loss

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.step(x, "train")
        # One host sync a step; a NaN found a thousand steps late costs the whole run.
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"training stopped at step {self.global_step}: the loss is {loss.item()} "
                "(likely cause: a learning rate too high for this model; try a smaller optimizer.lr); "
                "the last good checkpoint is kept"
            )
        if self.kl_warmup_steps > 0:
            self.log("train/kl_weight", self.kl_weight(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "val")
        # A finite training loss can still leave weights that give -inf on new data: stop before
        # ModelCheckpoint saves such a model as "last" or "best".
        recon, kl = self._last_terms
        if not (torch.isfinite(recon).all() and torch.isfinite(kl).all()):
            raise NonFiniteLoss(
                f"training stopped at step {self.global_step}: the validation ELBO is not finite "
                "(likely cause: a learning rate too high for this model; try a smaller optimizer.lr); "
                "the last good checkpoint is kept"
            )

    def test_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the model (as nanoGPT does): the resolved run config, plain types only, so
        # the checkpoint loads with torch.load(weights_only=True).
        from vae_cli import __version__

        checkpoint["vae_cli"] = {"config": self.config, "version": __version__}
