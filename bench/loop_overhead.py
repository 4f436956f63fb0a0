"""What Lightning's training loop costs per step: vae's own model and objective, four ways, in one process.

    python bench/loop_overhead.py --threads 1 --repeats 3        # 2-core CPU
    python bench/loop_overhead.py --steps 20 --repeats 1 --data-dir /tmp/benchdata   # smoke test

bench/train_speed.py compares whole `vae train` runs with a plain loop, run after run; on a machine
whose speed wanders by 20% from minute to minute, a difference of a few percent drowns there. Here
the four sides train the same model (`experiment=pytorch_example`: MLP 784-400-20, Bernoulli, fused
Adam, batch 128) on the same batches, interleaved in one process, so a slow minute slows them all:

- manual: ``objective.terms``, ``zero_grad``, ``backward``, ``step`` in a for loop over vae's loader;
- lightning: ``Trainer.fit`` of vae's ``VAEModule`` with no callbacks, logger or progress bar. Its
  step also does VAEModule's own bookkeeping (the epoch's sums, the finiteness flag, the collapse
  monitor's running KL), so the difference to manual is Lightning's loop plus that bookkeeping;
- lightning + callbacks: the same with the callbacks `vae train` adds (two ModelCheckpoints, the
  training pictures, the safe interrupt, the progress bar redrawn every 10 steps);
- lightning, manual optimization: no callbacks, ``automatic_optimization = False`` and a training
  step that calls ``zero_grad``, ``manual_backward`` and ``step`` itself (Lightning's documented
  alternative to its closure-based loop), to see how much of the loop's cost that would save.

Each side times its steps from batch 20 to the last (no validation, no checkpoint is written: the
epoch never ends inside the window); the fastest of --repeats is printed, with every repeat.
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

from train_speed import device_name  # bench/ is the script's folder, on sys.path

WARMUP = 20  # steps before the clock starts: first-step allocations and Adam's state


def config(data_dir: str | None) -> dict:
    """`vae train experiment=pytorch_example`'s resolved config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vae_cli.cli import config_dir

    with initialize_config_dir(config_dir(), version_base=None):
        cfg = compose("train", ["experiment=pytorch_example"] + ([f"data_dir={data_dir}"] if data_dir else []))
    return OmegaConf.to_container(cfg, resolve=True)


def module(cfg: dict, manual_optimization: bool = False):
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
    return cls(instantiate(cfg["model"]), instantiate(cfg["optimizer"]), config=cfg)


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


def lightning(cfg: dict, data, steps: int, callbacks: bool, tmp: str, manual_optimization: bool = False) -> float:
    """ms per step under Trainer.fit, with or without vae train's callbacks."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from vae_cli.callbacks import ProgressBar, SafeInterrupt, TrainingPictures

    clock = Clock(steps)
    extra = [ModelCheckpoint(dirpath=tmp, monitor="val/elbo", mode="max", save_top_k=1),
             ModelCheckpoint(dirpath=tmp, filename="last", monitor=None, save_top_k=1),
             TrainingPictures(), SafeInterrupt(), ProgressBar(refresh_rate=10)] if callbacks else []
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                         callbacks=[clock, *extra], enable_checkpointing=callbacks, enable_progress_bar=callbacks,
                         enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp)
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
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # as vae train does (vae_cli/train.py)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from vae_cli.train import build_datamodule

    cfg = config(a.data_dir)
    data = build_datamodule(cfg)
    data.setup("fit")
    loader = data.train_dataloader()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {device_name('cpu')}  torch {torch.__version__}  "
          f"pytorch_lightning {pl.__version__}  threads {torch.get_num_threads()}  steps {a.steps}", flush=True)
    sides = {"manual": [], "lightning": [], "lightning + callbacks": [], "lightning, manual optim.": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            sides["manual"].append(manual(cfg, loader, a.steps))
            sides["lightning"].append(lightning(cfg, data, a.steps, False, tmp))
            sides["lightning + callbacks"].append(lightning(cfg, data, a.steps, True, tmp))
            sides["lightning, manual optim."].append(lightning(cfg, data, a.steps, False, tmp, manual_optimization=True))
    base = min(sides["manual"])
    for name, ms in sides.items():
        print(f"{name:24} {min(ms):7.2f} ms/step  x{min(ms) / base:.2f}   (repeats: {' '.join(f'{m:.2f}' for m in ms)})")


if __name__ == "__main__":
    main()
