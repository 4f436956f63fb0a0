"""Training: the LightningModule around a VAE.

Training maximises the objective (vae_cli.objectives: the ELBO, recon - w * kl, by default; IWAE)
with w = beta (Higgins et al. 2017) times a linear warm-up (Sønderby et al. 2016), and free bits on
the KL. Every logged ``elbo`` is the true ELBO (w = 1) in nats per example, whatever the objective
and beta are, so runs compare on the same scale; ``objective`` is the objective's own value.
Each validation epoch also logs the active units and the KL per latent dimension, and a collapsing
posterior is reported once (vae_cli.collapse). On one GPU the whole training step (forward,
backward, the optimizer's update) is replayed as one CUDA graph (vae_cli.graphs; cuda_graph=false
runs it op by op).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from vae_cli.collapse import CollapseMonitor, DivergenceMonitor, UnitStats
from vae_cli.data import folder_changed
from vae_cli.errors import UserError, first_line
from vae_cli.graphs import StepGraph, graph_blocker
from vae_cli.logs import FILE_ONLY, log
from vae_cli.model import VAE
from vae_cli.objectives import ELBO, Objective, Terms
from vae_cli.run_config import MANY_CLOCKS, NO_END


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: training stops, keeping the last good checkpoint."""

    def __init__(self, step: int, what: str, kept: bool = True) -> None:
        super().__init__(
            f"training stopped at step {step}: {what} (likely cause: a learning rate too high for this model; "
            "try a smaller optimizer.lr); " + ("the last good checkpoint is kept" if kept else
                                               "no checkpoint had been written yet")
        )


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a batch's recon (B,), kl (B,), objective (): detached
KEPT_BATCHES = 256  # batches kept at most before their sums are taken (VAEModule.step)


def backward_compiled_now() -> contextlib.AbstractContextManager:
    """torch.compile compiles a graph's backward at its first backward pass, which Lightning runs
    outside VAEModule's try around the compiled call: this makes it compile with the forward, so a
    failure there also falls back to op by op. (A no-op where torch has no such setting.)"""
    import torch._functorch.config as config

    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_terms(terms: Callable[..., Terms]) -> Callable[..., Terms]:
    """An objective's ``terms`` through torch.compile, for one batch shape (``dynamic=False``: a
    batch of another shape runs op by op instead, VAEModule._compiled_terms). The forward pass,
    the distributions, the log-density and the KL become a few fused kernels and their backward
    one compiled graph: on a 2-core CPU experiment=pytorch_example's model and objective took 0.98
    of the plain loop's step against 1.08 op by op (paired, README Speed)."""
    return torch.compile(terms, dynamic=False)


def batch_sums(batches: list[Batch]) -> torch.Tensor:
    """(elbo, recon, kl, objective) summed over the batches' examples, (4,); the objective, a batch
    mean, weighed by the batch's size. In float32 at least: a 16-bit sum of a batch overflows (-540 x 128)."""
    recon = batches[0][0] if len(batches) == 1 else torch.cat([b[0] for b in batches])  # (N,)
    kl = batches[0][1] if len(batches) == 1 else torch.cat([b[1] for b in batches])     # (N,)
    wide = torch.promote_types(recon.dtype, torch.float32)
    r, k = recon.sum(dtype=wide), kl.sum(dtype=wide)
    objective = torch.stack([b[2].to(wide) * len(b[0]) for b in batches]).sum()
    return torch.stack([r - k, r, k, objective])


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
        cuda_graph: bool = True,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.optimizer, self.cuda_graph = model, optimizer, cuda_graph
        self.compile_step = compile  # torch.compile the training objective (not nn.Module.compile: a method)
        self.scheduler = scheduler  # called with (optimizer, self.progress); None: a constant lr
        self.beta, self.kl_warmup_steps, self.free_bits = beta, kl_warmup_steps, free_bits
        self.objective = objective if objective is not None else ELBO()
        try:
            self.objective.check(beta, kl_warmup_steps, free_bits)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.config = config  # the run's resolved config, stored in every checkpoint
        self._sums: dict[str, torch.Tensor] = {}  # split -> (elbo, recon, kl, objective) summed this epoch, on the device
        self._batches: dict[str, list[Batch]] = {}  # split -> the batches not yet added to _sums (_add_batches)
        self._counts: dict[str, int] = {}         # split -> examples this epoch (a host int: no copy to the device)
        self._checked_step = 0                    # the optimizer step of the last finiteness check
        self._logged_step = -1                    # the optimizer step whose ELBO was last logged (log_train_step)
        self.bar_metrics: dict[str, float] = {}   # the latest per-step values the progress bar shows (log_train_step)
        self._units: dict[str, UnitStats] = {}    # split -> E_q[z] moments and KL per dimension this epoch
        self.collapse = CollapseMonitor()
        self.divergence = DivergenceMonitor()      # a val ELBO far below its best: one warning
        self._graph: StepGraph | None = None      # the captured training step, while fit runs on one GPU
        self._replayed = False                    # this step ran as the graph: no backward or update left to do
        self._planned_steps = math.inf            # the optimizer steps that max_steps / max_epochs allow
        self._timer = None                        # Lightning's Timer callback, where trainer.max_time is set
        self._elbo = ELBO()                       # trained on until objective.start (objective=iwae)
        self._graph_objective: Objective | None = None  # the objective the captured graph runs
        self.resumed: dict[str, float | int | None] = {}  # the checkpoint fit resumed from: its step and val ELBO
        self._compiled: dict[Objective, Callable[..., Terms] | None] = {}  # objective -> its terms compiled (compile=true)
        self._compiled_shape: torch.Size | None = None  # the batch shape they were compiled for
        self._compiled_ok: set[Objective] = set()  # those whose first compiled call succeeded

    def __setattr__(self, name: str, value: object) -> None:
        # Lightning sets _current_fx_name before and after every hook call, about 44 times a training
        # step, and this module sets _replayed once a step; nn.Module.__setattr__ (which looks for
        # parameters, buffers and submodules of that name) takes 2.9 us for it against 0.3 us for a
        # plain attribute: ~0.1 ms a step, 4% of the default model's step on a 2-core CPU. Both are
        # plain values (a str or None, a bool), never parameters, buffers or modules.
        if name in ("_current_fx_name", "_replayed"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def progress(self) -> float:
        """The fraction of the run done, in [0, 1]: the larger of the steps done over the steps that
        trainer.max_steps / max_epochs allow and the time trained over trainer.max_time (whichever
        ends the run first); 0 outside fit. The learning-rate schedule reads it at every step."""
        trainer = self._trainer
        if trainer is None:
            return 0.0
        done = trainer.global_step / self._planned_steps
        if self._timer is not None:  # Lightning's own clock for max_time (restored on resume)
            done = max(done, self._timer.time_elapsed("train") / self._timer._duration)
        return min(1.0, done)

    def kl_weight(self) -> float:
        """beta, ramped linearly from 0 over the first kl_warmup_steps optimizer steps."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        return self.beta * min(1.0, self.global_step / self.kl_warmup_steps)

    def follows_progress(self) -> str | None:
        """What reads progress() and so needs the run's end: "scheduler", "objective.start=F", or None."""
        if self.scheduler is not None:
            return "scheduler"
        return f"objective.start={self.objective.start}" if self.objective.start > 0 else None

    def training_objective(self) -> Objective:
        """The objective of this training step: the ELBO until objective.start of the run, then the objective."""
        start = self.objective.start
        return self._elbo if start > 0 and self.progress() < start else self.objective

    def terms(self, x: torch.Tensor, train: bool, objective: Objective | None = None) -> Terms:
        """The objective's terms on a batch (by default this step's)."""
        if objective is None:
            objective = self.training_objective() if train else self.objective
        args = (self.model, x, self.kl_weight() if train else 1.0, self.free_bits if train else 0.0)
        if train and self.compile_step and self._graph is None:  # a CUDA graph replays the whole step: faster
            t = self._terms_compiled(objective, *args)
            if t is not None:
                return t
        return objective.terms(*args)

    def _terms_compiled(self, objective: Objective, model: torch.nn.Module, x: torch.Tensor, kl_weight: float,
                        free_bits: float) -> Terms | None:
        """The terms through compile_terms; None where this step runs op by op (_compiled_terms), or
        where compiling failed (e.g. no C++ compiler for torch's inductor: one line, then op by op)."""
        compiled = self._compiled_terms(objective, x)
        if compiled is None:
            return None
        first = objective not in self._compiled_ok
        try:  # the KL weight as a tensor: a float is a constant to torch.compile, recompiled as a warm-up changes it
            with backward_compiled_now() if first else contextlib.nullcontext():
                t = compiled(model, x, torch.tensor(kl_weight, dtype=torch.float32), free_bits)
        except Exception as e:
            if not first:
                raise  # it compiled and ran before: a fault of this step, not of compiling
            self.compile_step = False
            if self.trainer.is_global_zero:  # torch's BackendCompilerFailed says "backend='inductor' raised:" first
                reason = getattr(e, "inner_exception", None) or e
                log.warning(f"the training step could not be compiled ({type(reason).__name__}: "
                            f"{first_line(reason, 200)}); it runs op by op (set compile=false to skip the attempt)")
            return None
        self._compiled_ok.add(objective)
        return t

    def _compiled_terms(self, objective: Objective, x: torch.Tensor) -> Callable[..., Terms] | None:
        """objective.terms compiled (compile=true), or None where this training step runs op by op:
        each objective's first step in this process (it fills torch's table of KL functions, whose
        lookup torch.compile cannot trace: it would split the graph in two) and a batch of another
        shape than the loader's full batch (an epoch's smaller last batch: one batch an epoch is not
        worth a second compilation)."""
        if objective not in self._compiled:
            self._compiled[objective] = None
            return None
        if self._compiled_shape is None:  # compiled for the loader's full batches, whichever comes first
            whole = self.trainer.num_training_batches == 1  # a split (or DDP shard) smaller than a batch
            if not whole and len(x) != getattr(self.trainer.datamodule, "batch_size", len(x)):
                return None
            self._compiled_shape = x.shape
        if x.shape != self._compiled_shape:
            return None
        if self._compiled[objective] is None:
            self._compiled[objective] = compile_terms(objective.terms)
        return self._compiled[objective]

    def step(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """The one step shared by train, val and test: the objective, the ELBO terms, logs."""
        t = self.terms(x, split == "train")
        # The batch's terms are kept as they are and summed with the others every log_every_n_steps
        # steps, every KEPT_BATCHES batches and at the epoch's end (_add_batches): their sums at
        # every step took 10 small ops, 27 us a step on a 2-core CPU (README, Speed).
        batches = self._batches.setdefault(split, [])
        batches.append((t.recon, t.kl, t.objective))
        if len(batches) >= KEPT_BATCHES:
            self._add_batches(split)
        self._counts[split] = self._counts.get(split, 0) + len(x)
        if split == "train":
            self._after_train_batch(t.kl, lambda: float(t.recon.sum() - t.kl.sum()) / len(x))
        if split == "val":
            self._units.setdefault(split, UnitStats()).add(t.mean, t.kl_dims)
        return t.loss

    def record(self, split: str, sums: torch.Tensor, kl: torch.Tensor, n: int) -> None:
        """Add a batch's sums (4,) and KLs (B,) to the epoch's: a step replayed as a CUDA graph."""
        # A new tensor, never sums itself: a replayed graph overwrites its outputs at the next step.
        self._sums[split] = self._sums[split] + sums if split in self._sums else sums.clone()
        self._counts[split] = self._counts.get(split, 0) + n
        self._after_train_batch(kl.clone(), lambda: float(sums[0]) / n)

    def _after_train_batch(self, kl: torch.Tensor, elbo: Callable[[], float]) -> None:
        """What each training batch adds: its KLs (B,) to the collapse monitor, its ELBO (read when
        called) to the logs every log_every_n_steps steps."""
        # Nothing here reads a value back to the host but every log_every_n_steps steps, so a GPU
        # never waits for Python at a step; the sums per epoch replace Lightning's per-step logging
        # machinery, which cost as much as the model itself here (README, Speed).
        step = self.global_step  # the same for each batch of a step under trainer.accumulate_grad_batches
        if self.trainer.is_global_zero:  # one warning, not one per process; reads the KL every 50 steps
            self.collapse.train_step(step, kl)
        if (step + 1) % self.trainer.log_every_n_steps == 0 and step != self._logged_step:  # once a step
            self._logged_step = step
            self.log_train_step(elbo())

    def _add_batches(self, split: str) -> torch.Tensor | None:
        """The split's sums (elbo, recon, kl, objective) this epoch, (4,), with the batches kept since
        the last call added: one cat and four sums for them all. None before any batch."""
        batches = self._batches.pop(split, None)
        if batches:
            added = batch_sums(batches)
            self._sums[split] = self._sums[split] + added if split in self._sums else added
        return self._sums.get(split)

    def log_train_step(self, elbo: float) -> None:
        """train/elbo_step, and train/kl_weight and train/lr where they change, to the loggers at
        this step; the ELBO also to the progress bar (``bar_metrics``). Called every log_every_n_steps steps.

        Written to the loggers directly, not through self.log: Lightning turns a value given to
        self.log into a tensor on the model's device, and at the end of every batch walks its
        logged values and reads the progress bar's back (a host sync a step on a GPU; about
        20 us a step on a CPU, where the default model's step is 2.5 ms).
        """
        scalars = {"train/elbo_step": elbo}
        if self.kl_warmup_steps > 0:
            scalars["train/kl_weight"] = self.kl_weight()
        if self.scheduler is not None:
            scalars["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.bar_metrics["train/elbo_step"] = elbo
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(scalars, step=self.global_step)

    def _log_epoch(self, split: str) -> None:
        """split/elbo, split/recon, split/kl, split/objective: means over the epoch's examples, summed
        over all processes; for val, the active units and the KL per dimension too."""
        self._add_batches(split)
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
            raise NonFiniteLoss(self.global_step, "the validation ELBO is not finite", self._checkpoint_kept())
        if split == "val" and self.trainer.sanity_checking and self.trainer.state.fn == "fit" and not self.resumed:
            self.divergence.untrained(elbo)  # the reference for a first epoch that ruins the model (a new run's)
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
                not self.trainer.sanity_checking and hasattr(logger.experiment, "add_histogram"):  # not the untrained model's
            logger.experiment.add_histogram(f"{split}/kl_per_dim", kl_dims, self.global_step)
        if split == "val" and not self.trainer.sanity_checking:
            if self.trainer.is_global_zero:
                self.collapse.validation(self.global_step, kl, active, units.dims)
            self._check_divergence(elbo)

    def _check_divergence(self, elbo: float) -> None:
        """One warning if the val ELBO fell far below its best, naming the best checkpoint so far (the
        monitoring ModelCheckpoint has not seen this epoch yet, so its best is an earlier one). Not
        during a KL warm-up: the val ELBO (weight 1) may fall as the weight climbs to a beta > 1."""
        trainer = self.trainer
        if trainer.state.fn != "fit" or self.global_step < self.kl_warmup_steps:
            return
        group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
        lr = group.get("initial_lr", group.get("lr"))  # initial_lr: the configured peak under a scheduler
        best = next((c for c in trainer.checkpoint_callbacks if c.monitor == "val/elbo" and c.mode == "max"), None)
        # Every process holds the same reduced ELBO and keeps the state; one prints.
        self.divergence.validation(self.current_epoch, self.global_step, elbo, lr,
                                   best.best_model_path if best is not None else None, say=trainer.is_global_zero)

    def check_finite(self) -> None:
        """Stop if any training loss since the last check was NaN or infinite.

        The epoch's running sum of the objective (record) holds it: a NaN or an infinity in any
        step's loss stays in that sum (the loss is the negated objective), so no test is needed a
        step. One host sync (in DDP one all-reduce, on every process at the same steps): it runs
        every log_every_n_steps steps and before every checkpoint, never at every step, so a GPU
        is not held up; a non-finite model is still never saved (ModelCheckpoint runs after these
        hooks). Every earlier check passed, so the first non-finite loss came after the last one.
        """
        sums = self._add_batches("train")
        if sums is None:  # no training step yet this epoch
            return
        finite, first = bool(torch.isfinite(sums[3])), self._checked_step
        self._checked_step = self.global_step
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLoss(self.global_step, f"a training loss of steps {first + 1}-{self.global_step} "
                                                  "is NaN or infinite", self._checkpoint_kept())

    def _checkpoint_kept(self) -> bool:
        """Whether a checkpoint of this run exists (written before the loss went bad, or the resumed one)."""
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None)
        return folder is not None and any(Path(folder).glob("*.ckpt"))

    def on_train_batch_end(self, outputs: object, batch: torch.Tensor, batch_idx: int) -> None:
        step = self.global_step  # once a step, also where several batches make one (accumulate_grad_batches)
        if step % self.trainer.log_every_n_steps == 0 and step != self._checked_step:
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
        outputs = self._replay(x, batch_idx)
        self._replayed = outputs is not None  # then optimizer_step, zero_grad and backward do nothing more
        if outputs is not None:
            loss, sums, kl = outputs
            self.record("train", sums, kl, len(x))
        else:
            loss = self.step(x, "train")
        return loss

    # Lightning asks at every step whether training_step takes batch_idx, through
    # inspect.getfullargspec: 35 us a step on a 2-core CPU, 1% of the default model's step. A
    # function's __signature__ (PEP 362) is what inspect returns for it, so it is computed once here.
    training_step.__signature__ = inspect.signature(training_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning calls this at every step and, with no trainer.gradient_clip_val, checks the
        # settings before its precision plugin returns without clipping: skip that. With a value,
        # Lightning's own clipping, unchanged.
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- the training step as one CUDA graph (vae_cli.graphs) ---

    def on_fit_start(self) -> None:
        if not self.compile_step:
            return
        # A fresh start for each run: torch.compile keeps at most 8 versions of a function in a
        # process, and a sweep's jobs (one process) with other sizes would pass that and go op by op.
        torch._dynamo.reset()
        graphed = self.cuda_graph and graph_blocker(self.trainer, self.trainer.optimizers[0]) is None
        if self.trainer.is_global_zero and not graphed:  # the bar stands still meanwhile: say why
            log.info("compile=true: torch.compile compiles the training step at its second batch (up to a minute "
                     "the first time for a model; cached, a few seconds after)")

    def on_train_start(self) -> None:
        self._graph = None
        self._checked_step = self.global_step  # a resumed run's steps before this one were checked
        if self.follows_progress():
            self._plan_schedule()
        if not self.cuda_graph:
            return
        optimizer = self.trainer.optimizers[0]
        blocker = graph_blocker(self.trainer, optimizer)
        if blocker is None:
            self._graph = StepGraph(self._graph_forward, optimizer)
            if self.compile_step:
                log.info("compile=true: the training step runs as one CUDA graph instead (cuda_graph=false "
                         "compiles it)", extra=FILE_ONLY)
        elif self.trainer.strategy.root_device.type == "cuda":  # on a CPU there is nothing to say
            log.info(f"the training step runs op by op, not as a CUDA graph: {blocker}", extra=FILE_ONLY)

    def _plan_schedule(self) -> None:
        """Where the run ends, for progress(): the planned steps and the max_time clock, read once."""
        from pytorch_lightning.callbacks import Timer

        trainer = self._trainer
        what = self.follows_progress()
        planned = float(trainer.estimated_stepping_batches)  # inf with no step or epoch limit
        self._planned_steps = planned if planned > 0 else math.inf  # -1: max_steps=-1 over an endless loader
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer) and c._duration), None)
        if math.isinf(self._planned_steps) and self._timer is None:
            raise UserError(NO_END.format(what=what))
        if self._timer is not None and trainer.world_size > 1:
            # Each process's clock differs a little, and so would its lr or objective: the replicas would drift apart.
            raise UserError(MANY_CLOCKS.format(what=what))  # checked before launch too (vae_cli.checks), where it can be

    def on_train_end(self) -> None:
        self._graph = None  # its memory pool can go back before the test evaluation

    def _replay(self, x: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, ...] | None:
        """The step for x as the graph: (loss, sums, kl), or None where it runs op by op."""
        graph = self._graph
        if graph is None or not graph.fits(x):  # e.g. a smaller last batch
            return None
        objective = self.training_objective()
        if graph.graph is not None and objective is not self._graph_objective:  # objective.start passed
            graph = self._graph = StepGraph(self._graph_forward, graph.optimizer)
        if graph.graph is None:
            if not self._graph_ready(batch_idx):
                return None
            self._graph_objective = objective  # what _graph_forward records, even if max_time's clock passes start meanwhile
            try:
                graph.capture(x)
            except RuntimeError as e:  # something in the step reads the GPU from the host: op by op
                self._graph = None
                log.warning(f"the training step could not be captured as a CUDA graph "
                            f"({first_line(e.__context__ or e, 200)}); it runs op by op "
                            "(set cuda_graph=false to skip the attempt)")
                return None
            log.info(f"the training step is captured as one CUDA graph at step {self.global_step + 1} "
                     f"(batches of {len(x)}), objective {objective.name}", extra=FILE_ONLY)
        return graph(x)

    def _graph_ready(self, batch_idx: int) -> bool:
        """Capture now? The optimizer has its state (one step done), the KL weight no longer changes,
        and this is not an epoch's last batch, the one that may be smaller than the rest."""
        return (self.global_step >= 1 and self.global_step >= self.kl_warmup_steps
                and batch_idx + 1 < self.trainer.num_training_batches)

    def _graph_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the graph records besides backward and the update: loss, sums (4,), kl (B,)."""
        t = self.terms(x, train=True, objective=self._graph_objective)
        return t.loss, batch_sums([(t.recon, t.kl, t.objective)]), t.kl

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        if self._graph is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()  # training_step; then zero_grad and backward, unless the graph was replayed
        if not self._replayed:
            optimizer.step()  # this step's update, op by op (the first step, a smaller last batch)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        # What torch's optimizer.zero_grad() (set_to_none=True, its default) comes to, without its
        # dynamo guard and profiler range around the loop: in place in the default model's step on
        # a 2-core CPU, 68 us with them against 13 without (README, Speed), 1.5% of the step.
        if not self._replayed:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if not self._replayed:
            super().backward(loss, *args, **kwargs)

    def validation_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "val")

    def test_step(self, x: torch.Tensor, batch_idx: int) -> None:
        self.step(x, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer,  # a new lr after every optimizer step, from progress()
                "lr_scheduler": {"scheduler": self.scheduler(optimizer, self.progress), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What rebuilds the model (as nanoGPT does): the resolved run config, plain types only, so
        # the checkpoint loads with torch.load(weights_only=True).
        from vae_cli import __version__

        checkpoint["vae_cli"] = {"config": self.config, "version": __version__,
                                 "divergence": self.divergence.state_dict()}
        digests = getattr(self._trainer.datamodule, "digests", None) if self._trainer is not None else None
        if digests:  # a folder's splits as trained (vae_cli.data.check_digest)
            checkpoint["vae_cli"]["data"] = digests

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.resumed = {"step": checkpoint.get("global_step"), "val_elbo": last_val_elbo(checkpoint)}
        trained = checkpoint.get("vae_cli", {}).get("data")
        data = self._trainer.datamodule if self._trainer is not None else None
        now = getattr(data, "digests", None)
        if isinstance(trained, dict) and now and trained != now:  # resume: the datamodule is set up already
            data.load(legacy=True)  # a run that decoder 2 trained: its folder read as that decoder read it
            if data.digests != trained:
                raise UserError(folder_changed(self.config, "resuming would train on held-out images"))
        state = checkpoint.get("vae_cli", {}).get("divergence")
        if state is not None:  # a resumed run compares with its best before the resume
            self.divergence.load_state_dict(state)


def last_val_elbo(checkpoint: dict) -> float | None:
    """The val ELBO of the last validation before the checkpoint was saved: the score its val/elbo
    ModelCheckpoint had then (a finished run resumed validates nothing; one stopped during its test
    evaluation has no metrics.json to read it from)."""
    states = checkpoint.get("callbacks")
    scores = [s.get("current_score") for s in states.values() if isinstance(s, dict) and s.get("monitor") == "val/elbo"] \
        if isinstance(states, dict) else []
    return float(scores[0]) if scores and scores[0] is not None else None
