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

    def __init__(self, step: int, what: str) -> None:
        super().__init__(
            f"training stopped at step {step}: {what} (likely cause: a learning rate too high for this model; "
            "try a smaller optimizer.lr); the last good checkpoint is kept"
        )


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
        self._sums: dict[str, torch.Tensor] = {}  # split -> (elbo, recon, kl, n) summed this epoch

    def kl_weight(self) -> float:
        """beta, ramped linearly from 0 over the first kl_warmup_steps optimizer steps."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def step(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """The one step shared by train, val and test: ELBO terms, loss, logs."""
        recon, kl = self.model.elbo_terms(x)  # (B,) each
        w = self.kl_weight() if split == "train" else 1.0
        loss = -(recon - w * kl).mean()
        # Sums per epoch, kept on the device: one in-place add a step instead of Lightning's per-step
        # logging machinery, which cost as much as the model itself here (README, Speed).
        terms = torch.stack([recon.sum() - kl.sum(), recon.sum(), kl.sum(), recon.new_tensor(len(x))]).detach()
        self._sums[split] = terms if split not in self._sums else self._sums[split] + terms
        if split == "train" and (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/elbo_step", terms[0] / terms[3], prog_bar=True)
        return loss

    def _log_epoch(self, split: str) -> None:
        """split/elbo, split/recon, split/kl: means over the epoch's examples, summed over all processes."""
        sums = self._sums.pop(split, None)
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # DDP: every process's examples
        elbo, recon, kl = (sums[:3] / sums[3]).tolist()
        self.log(f"{split}/elbo", elbo, prog_bar=True)
        self.log_dict({f"{split}/recon": recon, f"{split}/kl": kl})

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.step(x, "train")
        # One host sync a step (free on a CPU); a NaN found a thousand steps late costs the run.
        # In DDP every process takes the same decision, so none is left waiting for the others.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            raise NonFiniteLoss(self.global_step, f"the loss is {loss.item()}")
        if self.kl_warmup_steps > 0 and (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/kl_weight", self.kl_weight())
        return loss

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "val")
        # A finite training loss can still leave weights that give -inf on new data: stop before
        # ModelCheckpoint saves such a model as "last" or "best".
        finite = bool(torch.isfinite(self._sums["val"][0]))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLoss(self.global_step, "the validation ELBO is not finite")

    def test_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the model (as nanoGPT does): the resolved run config, plain types only, so
        # the checkpoint loads with torch.load(weights_only=True).
        from vae_cli import __version__

        checkpoint["vae_cli"] = {"config": self.config, "version": __version__}
