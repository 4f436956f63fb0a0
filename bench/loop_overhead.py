"""What Lightning's training loop costs per step: a plain loop and vae's own model and objective, five ways, in one process.

    python bench/loop_overhead.py --threads 2 --repeats 5        # 2-core CPU
    python bench/loop_overhead.py --steps 40 --repeats 1 --data-dir /tmp/benchdata   # smoke test

bench/train_speed.py compares whole `vae train` runs with a plain loop, run after run; on a machine
whose speed wanders by 20% from minute to minute, a difference of a few percent drowns there. Here
the sides train the same model (`experiment=pytorch_example`: MLP 784-400-20, Bernoulli, fused
Adam, batch 128) on the same batches, interleaved in one process, so a slow minute slows them all:

- plain: bench/train_speed.py's plain model (pytorch/examples vae/main.py's, summed BCE with
  logits and the closed-form KL written out), ``zero_grad``, ``backward``, ``step`` in a for loop;
- manual: vae's ``objective.terms`` (the distributions, the KL per dimension, the bounded
  log-variance), ``zero_grad``, ``backward``, ``step`` in a for loop over vae's loader;
- lightning: ``Trainer.fit`` of vae's ``VAEModule`` with no callbacks, logger or progress bar and
  Lightning's defaults otherwise. Its step also does VAEModule's own bookkeeping (the epoch's sums,
  the finiteness flag, the collapse monitor's running KL), so the difference to manual is
  Lightning's loop plus that bookkeeping;
- vae train's Trainer: the Trainer `vae train` builds (vae_cli.train.build_trainer: its two
  checkpoints, the training pictures, the safe interrupt, the progress bar redrawn every 10 steps,
  its profiler), without a logger;
- lightning, manual optimization: no callbacks, ``automatic_optimization = False`` and a training
  step that calls ``zero_grad``, ``manual_backward`` and ``step`` itself (Lightning's documented
  alternative to its closure-based loop), to see how much of the loop's cost that would save.

Each side times its steps from batch 20 to the last (no validation, no checkpoint is written: the
epoch never ends inside the window); the fastest of --repeats is printed, with every repeat, and
its ratio to the plain loop.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import tempfile
import time

import pytorch_lightning as pl
import torch

from train_speed import VAE, device_name  # bench/ is the script's folder, on sys.path

WARMUP = 20  # steps before the clock starts: first-step allocations and Adam's state


def config(data_dir: str | None) -> dict:
    """`vae train experiment=pytorch_example`'s resolved config."""
    from vae_cli.checks import compose, resolved
    from vae_cli.cli import config_dir

    return resolved(compose(str(config_dir()), "train",
                            ["experiment=pytorch_example"] + ([f"data_dir={data_dir}"] if data_dir else [])))


def prepare(threads: int | None, data_dir: str | None) -> tuple[dict, "object"]:
    """What the in-process benches do first: torch's threads (None: torch's default), vae train's
    environment, Lightning's logs quiet; then the config and its datamodule, set up for fit."""
    from vae_cli.train import build_datamodule

    if threads:
        torch.set_num_threads(threads)
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # as vae train does (vae_cli/train.py)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cfg = config(data_dir)
    data = build_datamodule(cfg)
    data.setup("fit")
    return cfg, data


def module(cfg: dict, manual_optimization: bool = False, compile: bool = False):
    from hydra.utils import instantiate

    from vae_cli.module import VAEModule

    class ManualVAEModule(VAEModule):
        """VAEModule's step under Lightning's manual optimization (CPU only: no CUDA graph)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, x: torch.Tensor, batch_idx: int) -> None:
            optimizer = self.optimizers()
            loss = self.step(x, "train")
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

        def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
            pl.LightningModule.backward(self, loss, *args, **kwargs)

    cls = ManualVAEModule if manual_optimization else VAEModule
    return cls(instantiate(cfg["model"]), instantiate(cfg["optimizer"]), config=cfg, compile=compile)


def plain(loader, steps: int) -> float:
    """ms per step of bench/train_speed.py's plain model on the same batches."""
    torch.manual_seed(0)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    for i, x in enumerate(loader):
        if i == WARMUP:
            t0 = time.perf_counter()
        x = x.flatten(1)  # (B, 784): a view
        opt.zero_grad()
        model.loss(x).backward()
        opt.step()
        if i == steps - 1:
            return (time.perf_counter() - t0) / (steps - WARMUP) * 1e3
    raise ValueError(f"--steps {steps} is more than an epoch's batches")


def manual(cfg: dict, loader, steps: int) -> float:
    """ms per step of the bare loop."""
    m = module(cfg)
    opt = m.configure_optimizers()
    m.train()
    for i, x in enumerate(loader):
        if i == WARMUP:
            t0 = time.perf_counter()
        loss = m.objective.terms(m.model, x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == steps - 1:
            return (time.perf_counter() - t0) / (steps - WARMUP) * 1e3
    raise ValueError(f"--steps {steps} is more than an epoch's batches")


class Clock(pl.Callback):
    """ms per step from batch WARMUP to batch steps - 1."""

    def __init__(self, steps: int) -> None:
        self.steps, self.ms = steps, float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == WARMUP:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.steps - 1:
            self.ms = (time.perf_counter() - self.t0) / (self.steps - WARMUP) * 1e3


def lightning(cfg: dict, data, steps: int, vae_trainer: bool, tmp: str, manual_optimization: bool = False) -> float:
    """ms per step under Trainer.fit: Lightning's defaults, or the Trainer vae train builds."""
    from pathlib import Path

    from vae_cli.train import build_trainer

    clock = Clock(steps)
    kwargs = dict(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, accelerator="cpu", devices=1)
    if vae_trainer:
        trainer, _ = build_trainer(kwargs, Path(tmp) / f"run-{time.time_ns()}", logger=False)
        trainer.callbacks.append(clock)
    else:
        trainer = pl.Trainer(**kwargs, logger=False, callbacks=[clock], enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # the bar
        trainer.fit(module(cfg, manual_optimization), datamodule=data)
    return clock.ms


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="steps per side and repeat (more than 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None, help="vae's data_dir (default: the config's)")
    a = p.parse_args()
    if a.steps <= WARMUP:
        p.error(f"--steps {a.steps} must be more than {WARMUP}")
    cfg, data = prepare(a.threads, a.data_dir)
    loader = data.train_dataloader()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {device_name('cpu')}  torch {torch.__version__}  "
          f"pytorch_lightning {pl.__version__}  threads {torch.get_num_threads()}  steps {a.steps}", flush=True)
    sides = {"plain": [], "manual": [], "lightning": [], "vae train's Trainer": [], "lightning, manual optim.": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            sides["plain"].append(plain(loader, a.steps))
            sides["manual"].append(manual(cfg, loader, a.steps))
            sides["lightning"].append(lightning(cfg, data, a.steps, False, tmp))
            sides["vae train's Trainer"].append(lightning(cfg, data, a.steps, True, tmp))
            sides["lightning, manual optim."].append(lightning(cfg, data, a.steps, False, tmp, manual_optimization=True))
    base = min(sides["plain"])
    for name, ms in sides.items():
        print(f"{name:24} {min(ms):7.2f} ms/step  x{min(ms) / base:.2f}   (repeats: {' '.join(f'{m:.2f}' for m in ms)})")


if __name__ == "__main__":
    main()
