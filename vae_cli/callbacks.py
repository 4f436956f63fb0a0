"""Lightning plug-ins: pictures logged to TensorBoard each validation epoch, atomic checkpoint writes,
a progress bar that shows the ELBO as a number one can read, Ctrl-C and SIGTERM taken at a batch boundary,
and the cheaper dispatch of Lightning's hooks (NoProfiler, ModelCheckpoint)."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint as _ModelCheckpoint
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.profilers import PassThroughProfiler

from vae_cli import cli, pictures
from vae_cli.sources import torch_save_atomic


class SafeInterrupt(pl.Callback):
    """Ctrl-C and SIGTERM during fit stop training at the next batch boundary, not at whatever
    instruction they land on (vae_cli.cli.defer); and Ctrl-C goes back to the CLI's handler after
    Lightning ignores it for its shutdown, so that a second one ends a shutdown that hangs."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cli.defer(True)

    def on_train_batch_start(self, *args: Any) -> None:
        cli.raise_pending()

    def on_train_batch_end(self, *args: Any) -> None:
        cli.raise_pending()

    def on_validation_batch_start(self, *args: Any) -> None:
        cli.raise_pending()

    def on_validation_batch_end(self, *args: Any) -> None:
        cli.raise_pending()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cli.defer(False)
        cli.raise_pending()  # a signal during the last epoch's end still stops what follows

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        cli.defer(False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        cli.defer(False)
        cli.rearm()


class TrainingPictures(pl.Callback):
    """Each validation epoch, on rank 0: inputs above reconstructions, prior samples, one interpolation row."""

    def __init__(self, n: int = 8, samples: int = 64, steps: int = 10) -> None:
        self.n, self.samples, self.steps = n, samples, steps

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        logger = trainer.logger
        if not trainer.is_global_zero or trainer.sanity_checking or logger is None:
            return
        model, data = module.model, trainer.datamodule
        x = next(iter(data.val_dataloader()))[: self.n]                       # (n, C, H, W) model inputs
        x = trainer.precision_plugin.convert_input(x)  # the model's dtype (trainer.precision=64-true, bf16-true)
        was_training = model.training
        model.eval()
        recon = pictures.reconstructions(model, x)
        samples = pictures.sample_images(model, self.samples, seed=0)
        path = None
        if len(x) >= 2:
            z = pictures.encode_mean(model, x[:2])
            path = pictures.interpolation_rows(model, z[:1], z[1:2], self.steps)[0]  # (steps, C, H, W)
        model.train(was_training)
        step, writer = trainer.global_step, logger.experiment
        add_image(writer, "val/reconstructions", pictures.grid(torch.cat([x, recon]), len(x)), step)
        add_image(writer, "val/samples", pictures.grid(samples, 8), step)
        if path is not None:
            add_image(writer, "val/interpolation", pictures.grid(torch.cat([x[:1], path, x[1:2]]), self.steps + 2), step)


def add_image(writer: Any, tag: str, image: torch.Tensor, step: int) -> None:
    """An image (C, H, W) in [0, 1] to TensorBoard at this step: what SummaryWriter.add_image
    writes, except that a grey image stays one channel and the PNG is compressed at zlib level 1.

    Why: add_image repeats a grey image into three channels and compresses at PIL's default
    level, which took 44 ms for vae train's 242x242 grid of samples, every validation epoch
    (README, Speed). A writer that is not torch's SummaryWriter, or an image that is not floating
    point (uint8 in 0-255), goes through the writer's own add_image.
    """
    file_writer = getattr(writer, "_get_file_writer", None)
    # None also from trainer.fast_dev_run's stand-in logger, whose writer writes nothing
    events = file_writer() if file_writer is not None and image.is_floating_point() else None
    if events is None:
        writer.add_image(tag, image, step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    png = io.BytesIO()
    pictures.to_pil(image).save(png, format="PNG", compress_level=1)
    c, h, w = image.shape
    picture = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=png.getvalue())
    events.add_summary(Summary(value=[Summary.Value(tag=tag, image=picture)]), step)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint with sources.torch_save_atomic: to a temporary file beside it, flushed
    to disk, then renamed into place, so a kill at any moment leaves either the previous checkpoint
    or the new one, never half a file. (Lightning's own save goes through a temporary file in the
    system's temp folder, which is only atomic when that is the same file system.) A full disk
    fails as an OSError naming the checkpoint, which the CLI reports in one line.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        torch_save_atomic(checkpoint, Path(path))


def short_number(value: float) -> str:
    """A progress-bar figure: one decimal (-104.3, -1876.2), three significant digits below 1 in size.

    tqdm's own format cuts to three significant digits (-104., -1.88e+3): too coarse for an ELBO
    that moves by tenths of a nat.
    """
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the metrics written by ``short_number``, and the module's per-step
    values (VAEModule.bar_metrics: the training ELBO, which never goes through self.log).

    Strings go into tqdm's postfix as they are (it reformats only numbers), so they show unpadded.
    """

    # On stderr, as tqdm's default and the test evaluation's bar: Lightning's bars write to stdout,
    # which then held every redrawn frame (carriage returns, cursor moves) around the summary block
    # in `vae train > log.txt` or `| cat`. stdout carries the summary alone.
    @staticmethod
    def _on_stderr(make: Callable[[], Any]) -> Any:
        with redirect_stdout(sys.stderr):  # Lightning's bars take sys.stdout as their file when made
            return make()

    def init_sanity_tqdm(self) -> Any:
        return self._on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Any:
        return self._on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Any:
        return self._on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Any:
        return self._on_stderr(super().init_test_tqdm)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.update(getattr(pl_module, "bar_metrics", {}))  # VAEModule.log_train_step's, kept out of self.log
        return {k: short_number(v) if isinstance(v, float) else v for k, v in items.items()}


class SpawnedProcesses(pl.Callback):
    """Carries vae train's terminal and log settings into the processes that ddp_spawn starts.

    Those unpickle the Trainer, this callback with it, and never run the command line that sets
    them: without this, each printed Lightning's banners, the model summary and its warnings, and
    none of it reached RUN/train.log. (ddp re-runs the command line; ddp_fork copies this process.)
    """

    def __init__(self, log_file: Path, verbose: bool, summary: bool) -> None:
        self.log_file, self.verbose, self.summary, self.pid = str(log_file), verbose, summary, os.getpid()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.pid:  # unpickled in a new process
            from vae_cli.logs import join_run_log

            join_run_log(self.log_file, self.verbose, self.summary)


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler (none), without its cost per hook.

    Lightning wraps every hook call, about 25 a training step, in ``profiler.profile(name)``, and its
    PassThroughProfiler makes a new generator-based context manager each time although it records
    nothing: on a 2-core CPU, Lightning's step over a one-parameter model with vae train's
    callbacks took 596 us with it and 479 with this (README, Speed), against the default model's
    2.5-ms step. This one hands out one shared do-nothing context. ``trainer.profiler`` set in the
    config (simple, advanced, pytorch) replaces it.
    """

    _nothing = nullcontext()

    def profile(self, action_name: str) -> nullcontext:  # type: ignore[override]
        return self._nothing


class ModelCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint with its ``state_key`` computed once, and no batch-end check
    where nothing is saved at a batch's end.

    Lightning reads ``state_key`` for every callback at every hook call (to name the profiler's
    action), and ModelCheckpoint builds it each time from the repr of a dict of its settings,
    about 2 us, twelve times a step for vae train's two checkpoints. The settings it is made of
    (monitor, mode, the save triggers) are fixed in __init__, so the key cannot change. The class
    keeps Lightning's class name, and with it the same key, under which a checkpoint stores this
    callback's state (best score, best path): runs saved before this class existed resume as before.
    A run resumed in a folder it was moved or copied to keeps tracking its files there.
    """

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_vae_state_key")
        if key is None:
            key = self.__dict__["_vae_state_key"] = super().state_key
        return key

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # vae train's checkpoints are saved at the end of an epoch or validation: with no
        # every_n_train_steps and no train_time_interval, Lightning's batch-end check (the trainer's
        # state, the step, the clock) always ends in "nothing to save"; it is skipped.
        if self._every_n_train_steps >= 1 or self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, *args)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Lightning never removes the checkpoint a fit resumed from. vae train resumes a run in its own
        # folder, from last.ckpt or, where that is gone, from the newest best-*.ckpt: that best one,
        # once a better one is saved, goes as it would in a run never stopped (two best-*.ckpt files
        # were left, the older one first in a listing).
        if super()._should_remove_checkpoint(trainer, previous, current):
            return True
        resumed = trainer.ckpt_path
        return (self.monitor is not None and previous != current and resumed is not None
                and Path(previous).absolute() == Path(resumed).absolute()
                and Path(previous).absolute().parent == Path(self.dirpath or "").absolute())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A run folder moved or copied, then resumed: Lightning keeps only best_model_path (the old
        # folder's file) and warns, so the best checkpoint here was no longer tracked (a new best left
        # the old one beside it) and the summary could name a file of the old folder. The files are
        # here now, under the same names: their paths are moved to this folder.
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:
            def here(path: Any) -> Any:
                moved = isinstance(path, str) and Path(path).parent == Path(old)
                return str(Path(self.dirpath) / Path(path).name) if moved else path

            state_dict = {k: here(v) for k, v in state_dict.items()}
            state_dict["best_k_models"] = {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}
            state_dict["dirpath"] = self.dirpath
        super().load_state_dict(state_dict)
