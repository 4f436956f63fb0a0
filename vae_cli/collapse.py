"""Posterior collapse: active units, KL per latent dimension, and one warning when z goes unused;
and one warning when training diverges while its loss stays finite.

A latent unit u is active when Cov_x(E_q(z|x)[z_u]) > 0.01 over a data set (Burda, Grosse and
Salakhutdinov 2016, section 5.2): the encoder's mean moves with the input along it. A collapsed
posterior has q(z|x) = p(z) for every x: no active units, KL near 0, and a decoder that ignores z.

Training checks twice: from the running training KL (every WINDOW steps from CHECK_AFTER on, and
at the end of each training epoch), so a collapse is reported within the first epoch; and at each
validation epoch, from the active units and the validation KL. The first hit prints one warning
line naming the remedies; later ones stay silent.

A run can also diverge without a NaN: a ladder at lr 3e-3 went from a val ELBO of -106 to -3.6e8 in
one epoch and trained on there (README, Results), out of reach of the finiteness checks. Each
validation epoch compares the val ELBO with the best so far and warns once when it falls far below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from vae_cli.logs import log
from vae_cli.objectives import kl_per_dim, posterior_mean

ACTIVE = 0.01          # Cov_x(E_q[z_u]) above this: an active unit (Burda et al. 2016)
# nats per example, over all dimensions: below it, z carries next to nothing (0.14 bits an image).
# 0.05 missed a top-down ladder that had collapsed (val ELBO -205.6, the pixels' marginal) with
# 0.06 nats left; healthy MNIST models carry 20 nats or more, the tests' tiny healthy run 0.2 to 0.9.
KL_FLOOR = 0.1
CHECK_AFTER = 100      # training steps before the running KL is first checked
WINDOW = 50            # training steps averaged per check
REMEDIES = ("ramp the KL in (kl_warmup_steps=10000), keep a floor on each dimension's KL (free_bits=0.25), "
            "or lower the learning rate (a smaller optimizer.lr)")

# A val ELBO this far below the best so far means divergence: DROP_NATS nats, or DROP_FRACTION of the
# best's size where ELBOs are large (Gaussian likelihoods). MNIST models move by under a nat between
# epochs once past the first few; the diverged ladder above fell by 3.6e8.
DROP_NATS = 10.0
DROP_FRACTION = 0.1


class UnitStats:
    """Sums over a data set, per latent dimension: of E_q[z], of its square, and of the KL."""

    def __init__(self) -> None:
        self.n = 0.0
        self.sums: torch.Tensor | None = None   # (3, D) float64: sum m, sum m^2, sum KL_d (NaN: no closed form)

    def add(self, mean: torch.Tensor, kl_dims: torch.Tensor | None) -> None:
        mean = mean.detach().double()
        kl = kl_dims.detach().double().sum(0) if kl_dims is not None else torch.full_like(mean[0], float("nan"))
        part = torch.stack([mean.sum(0), (mean**2).sum(0), kl])
        self.sums = part if self.sums is None else self.sums + part
        self.n += len(mean)

    def reduce(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "UnitStats":
        """The sums over every process (fn: a sum across processes, e.g. the strategy's reduce)."""
        if self.sums is None:
            return self
        flat = fn(torch.cat([self.sums.flatten(), self.sums.new_tensor([self.n])]))
        out = UnitStats()
        out.sums, out.n = flat[:-1].view_as(self.sums), float(flat[-1])
        return out

    @property
    def dims(self) -> int:
        return 0 if self.sums is None else self.sums.shape[1]

    def variances(self) -> torch.Tensor:
        """Cov_x(E_q[z_u]) per unit u, (D,)."""
        m1, m2 = self.sums[0] / self.n, self.sums[1] / self.n
        return (m2 - m1**2).clamp(min=0)

    def active_units(self, threshold: float = ACTIVE) -> int:
        return 0 if self.sums is None else int((self.variances() > threshold).sum())

    def kl_per_dim(self) -> torch.Tensor | None:
        """The mean KL of each dimension, (D,) on the CPU; None without a closed form."""
        if self.sums is None or torch.isnan(self.sums[2]).any():
            return None
        return (self.sums[2] / self.n).cpu()


class CollapseMonitor:
    """Prints one warning the first time the posterior looks collapsed; silent otherwise."""

    def __init__(self, kl_floor: float = KL_FLOOR, after: int = CHECK_AFTER, window: int = WINDOW) -> None:
        self.kl_floor, self.after, self.window = kl_floor, after, window
        self.warned = False
        # The window's batches' KLs, kept as they are on the device and summed once at the window's
        # end: no host sync, and no op, a step.
        self._kl: list[torch.Tensor] = []
        self._checked = -1  # the step last checked: each batch of a step comes with the same step

    def train_step(self, step: int, kl: torch.Tensor) -> None:
        """Every training step (step: optimizer steps before this one), kl: (B,) this batch, detached
        and not written to later (kept until the window's end)."""
        if self.warned:
            return
        self._kl.append(kl)
        if step + 1 >= self.after and (step + 1) % self.window == 0 and step != self._checked:
            self._checked = step
            window = torch.cat(self._kl)
            mean = float(window.sum()) / len(window)
            self._kl = []
            if mean < self.kl_floor:
                self.warn(f"the training KL averaged {mean:.2g} nats over steps {step + 2 - self.window}-{step + 1}")

    def train_epoch(self, step: int, kl_mean: float) -> None:
        """The end of a training epoch: its mean KL."""
        if kl_mean < self.kl_floor:
            self.warn(f"the training KL averaged {kl_mean:.2g} nats over the epoch ending at step {step}")

    def validation(self, step: int, kl_mean: float, active: int, dims: int) -> None:
        """The end of a validation epoch: its mean KL and the active units of dims."""
        if dims and active == 0:
            self.warn(f"no active latent units of {dims} at step {step} (validation KL {kl_mean:.2g} nats)")
        elif kl_mean < self.kl_floor:
            self.warn(f"the validation KL is {kl_mean:.2g} nats at step {step} ({active} of {dims} units active)")

    def warn(self, what: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning(f"posterior collapse: {what}, so the decoder ignores z; to avoid it, {REMEDIES}")


class DivergenceMonitor:
    """Prints one warning the first time the validation ELBO falls far below its best; silent otherwise.
    Its state goes into checkpoints: a resumed run compares with the best before the resume, and a
    command that reads a checkpoint saved after the fall can say so (vae_cli.runs)."""

    def __init__(self, drop_nats: float = DROP_NATS, drop_fraction: float = DROP_FRACTION) -> None:
        self.drop_nats, self.drop_fraction = drop_nats, drop_fraction
        self.best, self.best_epoch, self.best_step = -math.inf, -1, -1
        self.best_checkpoint: str | None = None   # where the best model so far is saved, if known
        self.last = -math.inf                     # the latest val ELBO
        self.diverged_epoch: int | None = None    # the epoch of the warning; None: no warning

    UNTRAINED = -1  # best_epoch of the untrained model's val ELBO (Lightning's sanity check before the first step)

    def untrained(self, elbo: float) -> None:
        """The untrained model's val ELBO, from the validation batches Lightning runs before the first
        step: the first best of a new run. A learning rate that ruins the model in its first steps
        (Adam with lr=10 reached -1e12) gives a first epoch far below it, which is then called a
        divergence; without it, that first epoch became the best and no later epoch fell from it."""
        if self.best == -math.inf and math.isfinite(elbo):  # a new run (a resumed one has its best)
            self.best, self.best_epoch, self.best_step = elbo, self.UNTRAINED, 0

    def when_best(self) -> str:
        """Where the best came from, for a message: "epoch 1, step 8", or "the untrained model"."""
        if self.best_epoch == self.UNTRAINED:
            return "the untrained model"
        return f"epoch {self.best_epoch}, step {self.best_step}"

    def fallen(self, elbo: float) -> bool:
        """Is elbo far below the best so far?"""
        return elbo < self.best - max(self.drop_nats, self.drop_fraction * abs(self.best))

    def validation(self, epoch: int, step: int, elbo: float, lr: float | None = None,
                   best_checkpoint: str | None = None, say: bool = True) -> bool:
        """The end of a validation epoch: its mean ELBO; lr: the configured (peak) learning rate;
        best_checkpoint: where the best model before this epoch is saved; say: print the warning
        (every process keeps the state, one prints). True when it diverged just now."""
        self.last = elbo
        if best_checkpoint and self.best_epoch != self.UNTRAINED:  # no checkpoint holds the untrained model
            self.best_checkpoint = best_checkpoint
        if elbo > self.best:
            self.best, self.best_epoch, self.best_step = elbo, epoch, step
            return False
        if self.diverged_epoch is not None or not self.fallen(elbo):
            return False
        self.diverged_epoch = epoch
        if say:
            known = lr is not None and math.isfinite(lr)
            lower = f"optimizer.lr={lr:g}, try {lr / 2:g}" if known else "a smaller optimizer.lr"
            keep = f"; the best model so far: vae evaluate ckpt={self.best_checkpoint}" if self.best_checkpoint else ""
            log.warning(f"training diverged: the validation ELBO fell from {self.best:.2f} ({self.when_best()}) "
                        f"to {elbo:.4g} (epoch {epoch}, step {step}); training goes on; "
                        f"lower the learning rate ({lower}){keep}")
        return True

    KEYS = ("best", "best_epoch", "best_step", "best_checkpoint", "last", "diverged_epoch")

    def state_dict(self) -> dict[str, float | int | str | None]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load_state_dict(self, state: dict[str, float | int | str | None]) -> None:
        for k in self.KEYS:
            if k in state:
                setattr(self, k, state[k])


@torch.no_grad()
def report(model, images: torch.Tensor, pixels: str, batch_size: int = 100, seed: int = 0) -> dict[str, Any]:
    """Active units and KL per dimension of a model on uint8 images (N, C, H, W): keys for a JSON."""
    from vae_cli.data import Batches

    device = next(model.parameters()).device
    stats = UnitStats()
    torch.manual_seed(seed + 2)
    for x in Batches(images.to(device), batch_size, pixels, shuffle=False, seed=seed, fixed_noise=True):
        q = model.posterior(x)
        mean = posterior_mean(q, q.sample((8,)))   # the draws only where q has no closed-form mean
        stats.add(mean, kl_per_dim(q, model.prior))
    kl = stats.kl_per_dim()
    return {"active_units": stats.active_units(), "latent_dim": stats.dims, "active_threshold": ACTIVE,
            "posterior_mean_variance": stats.variances().tolist(),
            "kl_per_dim": None if kl is None else kl.tolist()}


def line(r: dict[str, Any]) -> str:
    """One line for a table: active units, and the KL per dimension, largest first."""
    text = f"active units: {r['active_units']} of {r['latent_dim']} (Cov_x E_q[z_u] > {r['active_threshold']})"
    if r.get("kl_per_dim") is not None:
        kl = sorted(r["kl_per_dim"], reverse=True)
        shown = ", ".join(f"{v:.2f}" for v in kl[:8]) + (", ..." if len(kl) > 8 else "")
        text += f"; KL per dimension (nats, largest first): {shown}"
    return text
