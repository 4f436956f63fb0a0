"""Training: the LightningModule around a VAE.

Training maximises the objective (vae_cli.objectives: the ELBO, recon - w * kl, by default; IWAE)
with w = beta (Higgins et al. 2017) times a linear warm-up (Sønderby et al. 2016), and free bits on
the KL. Every logged ``elbo`` is the true ELBO (w = 1) in nats per example, whatever the objective
and beta are, so runs compare on the same scale; ``objective`` is the objective's own value.
Each validation epoch also logs the active units and the KL per latent dimension, and a collapsing
posterior is reported once (vae_cli.collapse).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch

from vae_cli.collapse import CollapseMonitor, UnitStats
from vae_cli.errors import UserError
from vae_cli.model import VAE
from vae_cli.objectives import ELBO, Objective


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: training stops, keeping the last good checkpoint."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(
            f"training stopped at step {step}: {what} (likely cause: a learning rate too high for this model; "
            "try a smaller optimizer.lr); the last good checkpoint is kept"
        )


class VAEModule(pl.LightningModule):
    """Trains a VAE; logs split/elbo, split/recon, split/kl, split/objective (nats per example)."""

    def __init__(
        self,
        model: VAE,
        optimizer: Callable[..., torch.optim.Optimizer],
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        config: dict | None = None,
        objective: Objective | None = None,
        free_bits: float = 0.0,
    ) -> None:
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.beta, self.kl_warmup_steps, self.free_bits = beta, kl_warmup_steps, free_bits
        self.objective = objective if objective is not None else ELBO()
        try:
            self.objective.check(beta, kl_warmup_steps, free_bits)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.config = config  # the run's resolved config, stored in every checkpoint
        self._sums: dict[str, torch.Tensor] = {}  # split -> (elbo, recon, kl, objective) summed this epoch, on the device
        self._counts: dict[str, int] = {}         # split -> examples this epoch (a host int: no copy to the device)
        self._finite: torch.Tensor | None = None  # on the device: every training loss since the last check was finite
        self._checked_step = 0                    # the optimizer step of that check
        self._units: dict[str, UnitStats] = {}    # split -> E_q[z] moments and KL per dimension this epoch
        self.collapse = CollapseMonitor()

    def kl_weight(self) -> float:
        """beta, ramped linearly from 0 over the first kl_warmup_steps optimizer steps."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def step(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """The one step shared by train, val and test: the objective, the ELBO terms, logs."""
        train = split == "train"
        t = self.objective.terms(self.model, x, self.kl_weight() if train else 1.0,
                                 self.free_bits if train else 0.0)
        recon, kl, n = t.recon, t.kl, len(x)
        # Sums per epoch, kept on the device: one in-place add a step instead of Lightning's per-step
        # logging machinery, which cost as much as the model itself here (README, Speed). Nothing
        # here reads a value back to the host, so a GPU never waits for Python (no sync a step).
        terms = torch.stack([recon.sum() - kl.sum(), recon.sum(), kl.sum(), t.objective * n])
        self._sums[split] = terms if split not in self._sums else self._sums[split] + terms
        self._counts[split] = self._counts.get(split, 0) + n
        if train:
            if self.trainer.is_global_zero:  # one warning, not one per process; reads the KL every 50 steps
                self.collapse.train_step(self.global_step, kl)
            if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
                # A float, read once here: a tensor would be read back at every redraw of the bar.
                self.log("train/elbo_step", float(terms[0]) / n, prog_bar=True)
        elif split == "val":
            self._units.setdefault(split, UnitStats()).add(t.mean, t.kl_dims)
        return t.loss

    def _log_epoch(self, split: str) -> None:
        """split/elbo, split/recon, split/kl, split/objective: means over the epoch's examples, summed
        over all processes; for val, the active units and the KL per dimension too."""
        sums = self._sums.pop(split, None)
        if sums is None:
            return
        sums = torch.cat([sums, sums.new_tensor([self._counts.pop(split)])])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # DDP: every process's examples
        elbo, recon, kl, objective = (sums[:4] / sums[4]).tolist()
        if split == "val" and not math.isfinite(elbo):
            # A finite training loss can still leave weights that give -inf on new data: stop
            # before ModelCheckpoint saves such a model as "last" or "best". Every process holds
            # the same reduced sums, so all take this decision together.
            raise NonFiniteLoss(self.global_step, "the validation ELBO is not finite")
        self.log(f"{split}/elbo", elbo, prog_bar=True)
        self.log_dict({f"{split}/recon": recon, f"{split}/kl": kl, f"{split}/objective": objective})
        if split == "train" and self.trainer.is_global_zero:
            self.collapse.train_epoch(self.global_step, kl)
        units = self._units.pop(split, None)
        if units is None:
            return
        units = units.reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        active = units.active_units()
        self.log(f"{split}/active_units", float(active))
        kl_dims = units.kl_per_dim()
        logger = self.logger
        if kl_dims is not None and logger is not None and self.trainer.is_global_zero and \
                hasattr(logger.experiment, "add_histogram"):
            logger.experiment.add_histogram(f"{split}/kl_per_dim", kl_dims, self.global_step)
        if split == "val" and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.collapse.validation(self.global_step, kl, active, units.dims)

    def check_finite(self) -> None:
        """Stop if any training loss since the last check was NaN or infinite.

        One host sync (in DDP one all-reduce, on every process at the same steps): it runs every
        log_every_n_steps steps and before every checkpoint, never at every step, so a GPU is not
        held up; a non-finite model is still never saved (ModelCheckpoint runs after these hooks).
        """
        if self._finite is None:
            return
        finite, first = bool(self._finite), self._checked_step
        self._finite, self._checked_step = None, self.global_step
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLoss(self.global_step, f"a training loss of steps {first + 1}-{self.global_step} "
                                                  "is NaN or infinite")

    def on_train_batch_end(self, outputs: object, batch: torch.Tensor, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.check_finite()

    def on_train_epoch_end(self) -> None:
        self.check_finite()  # before ModelCheckpoint's on_train_epoch_end (Lightning calls this hook first)
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.check_finite()  # before ModelCheckpoint's on_validation_end
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.step(x, "train")
        finite = torch.isfinite(loss.detach())  # decided on the device, read by check_finite
        self._finite = finite if self._finite is None else self._finite & finite
        if self.kl_warmup_steps > 0 and (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/kl_weight", self.kl_weight())
        return loss

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "val")

    def test_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the model (as nanoGPT does): the resolved run config, plain types only, so
        # the checkpoint loads with torch.load(weights_only=True).
        from vae_cli import __version__

        checkpoint["vae_cli"] = {"config": self.config, "version": __version__}
