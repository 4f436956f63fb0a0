"""The per-step ratio of vae train's Trainer to the plain loop, paired in time, in one process.

    python bench/paired_steps.py --threads 2                  # 2-core CPU, 2 epochs (about 2 minutes)
    python bench/paired_steps.py --epochs 1 --window 10 --data-dir /tmp/benchdata   # smoke test

On a machine whose speed wanders by 20% or more within a minute, runs timed one after the other
differ by more than the sides do (bench/train_speed.py). Here the comparison is made in windows of a
few dozen steps that lie next to each other in time. A callback in the Trainer that `vae train`
builds (vae_cli.train.build_trainer: its checkpoints, pictures, safe interrupt, progress bar and
profiler; no logger, no validation) over `experiment=pytorch_example` times each --window training
steps. Right after each window it times, on --window batches of the same loader:

- plain: bench/train_speed.py's plain model (pytorch/examples vae/main.py's, summed BCE with
  logits and the closed-form KL written out), ``zero_grad``, ``backward``, fused Adam's ``step``;
- bare: vae's own model and objective (``objective.terms``: the distributions, the KL per
  dimension, the bounded log-variance) in the same for loop, no Lightning.

Each side makes its batches on the clock as it would in a run: plain indexes a float copy of the
training images in memory with a shuffled order (as bench/train_speed.py's plain loop does), bare
and the Trainer take them from vae's loader (uint8 bytes turned into pixels, vae_cli.data.Batches).
Each window gives three ratios: Trainer / plain, bare / plain and Trainer / bare. Printed: their
medians and quartiles over all windows (the first of each epoch is left out: it includes the epoch's
start). The Trainer side also includes what vae's module does around its objective at each step
(the epoch's sums, the collapse monitor, the finiteness bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch

from loop_overhead import module, prepare  # bench/ is the script's folder, on sys.path
from train_speed import BATCH, VAE, device_name
from vae_cli.module import compile_terms


class Pairs(pl.Callback):
    """Times each `window` Trainer steps, then as many plain and bare steps; keeps the ratios."""

    def __init__(self, cfg: dict, loader, window: int, compiled: bool = False) -> None:
        self.window, self.loader = window, loader
        self.images = loader.data.flatten(1).float() / 255  # (N, 784): the plain loop's data, in memory
        torch.manual_seed(0)
        self.plain = VAE()
        self.plain_opt = torch.optim.Adam(self.plain.parameters(), lr=1e-3, fused=True)
        self.bare = module(cfg)
        self.bare.train()
        self.bare_opt = self.bare.configure_optimizers()
        # compile=true: the bare side's objective compiled as VAEModule compiles it, after one step op by op
        self.compiled = compile_terms(self.bare.objective.terms) if compiled else None
        self.warm = False
        self.ratios: dict[str, list[float]] = {"Trainer / plain": [], "bare / plain": [], "Trainer / bare": []}
        self.t0: float | None = None
        self.bare_pass: Iterator[torch.Tensor] | None = None
        self.n = 0
        self.first = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.t0, self.n, self.first = None, 0, True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.t0 is None:
            self.t0, self.n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.n += 1
        if self.n < self.window:
            return
        trainer_s = (time.perf_counter() - self.t0) / self.window
        order = torch.randperm(len(self.images))[: self.window * BATCH].view(self.window, BATCH)
        plain_s = self.timed(self.plain_step, (self.images[i] for i in order))  # (B, 784) float
        bare_s = self.timed(self.bare_step, self.bare_batches())  # (B, C, H, W) from the uint8 bytes
        if not self.first:  # the first window of an epoch includes the epoch's start
            self.ratios["Trainer / plain"].append(trainer_s / plain_s)
            self.ratios["bare / plain"].append(bare_s / plain_s)
            self.ratios["Trainer / bare"].append(trainer_s / bare_s)
        # the next window starts now, so that the windows cover whole steps, from one batch's end to the next
        self.first, self.t0, self.n = False, time.perf_counter(), 0

    def bare_batches(self) -> Iterator[torch.Tensor]:
        """The bare side's batches: one pass over the loader after another, as a run takes them. A pass
        shuffles the whole split at its first batch: once per epoch's worth of batches, as in a run,
        not once per window."""
        while True:
            if self.bare_pass is None:
                self.bare_pass = iter(self.loader)
            x = next(self.bare_pass, None)
            if x is None:
                self.bare_pass = None
                continue
            yield x

    def plain_step(self, x: torch.Tensor) -> None:
        self.plain_opt.zero_grad()
        self.plain.loss(x).backward()
        self.plain_opt.step()

    def bare_step(self, x: torch.Tensor) -> None:
        # compiled as VAEModule runs it: the full batches only, after one op-by-op step, the KL weight a tensor
        if self.compiled is not None and self.warm and len(x) == BATCH:
            loss = self.compiled(self.bare.model, x, torch.tensor(1.0)).loss
        else:
            loss = self.bare.objective.terms(self.bare.model, x).loss
            self.warm = True
        self.bare_opt.zero_grad()
        loss.backward()
        self.bare_opt.step()

    def timed(self, step, batches: Iterator[torch.Tensor]) -> float:
        """Seconds per step over the window's batches, each made on the clock."""
        t0 = time.perf_counter()
        for _, x in zip(range(self.window), batches):
            step(x)
        return (time.perf_counter() - t0) / self.window


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--window", type=int, default=30, help="steps per window and side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None, help="vae's data_dir (default: the config's)")
    p.add_argument("--compile", action="store_true", help="vae's sides with compile=true (the training objective "
                   "torch.compile'd; the compilation falls in each side's first window, which is left out)")
    a = p.parse_args()
    from vae_cli.train import build_trainer

    cfg, data = prepare(a.threads, a.data_dir)
    pairs = Pairs(cfg, data.train_dataloader(), a.window, a.compile)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {device_name('cpu')}  torch {torch.__version__}  "
          f"pytorch_lightning {pl.__version__}  threads {torch.get_num_threads()}  window {a.window}"
          f"{'  compile=true' if a.compile else ''}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(dict(max_epochs=a.epochs, accelerator="cpu", devices=1, limit_val_batches=0),
                                   Path(tmp) / "run", logger=False)
        trainer.callbacks.append(pairs)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the bar
            trainer.fit(module(cfg, compile=a.compile), datamodule=data)
    for name, r in pairs.ratios.items():
        if len(r) < 2:
            print(f"{name:16} {len(r)} windows: too few (more epochs, or a smaller --window)")
            continue
        q1, _, q3 = statistics.quantiles(r, n=4)
        print(f"{name:16} median {statistics.median(r):.3f}  quartiles {q1:.3f} {q3:.3f}  ({len(r)} windows)")


if __name__ == "__main__":
    main()
