"""What a training run's config holds (conf/train.yaml): the settings of `vae train`.

``TrainSettings`` describes the top level; the nodes (dataset, model, likelihood, prior, posterior, optimizer,
scheduler, objective) are
described by the typed classes they build, the trainer node by ``TrainerSettings``. The same
description checks a command line before anything is written and a checkpoint's saved config
before anything is built from it. This module sits below runs.py and train.py (it imports
neither), so both can use it.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vae_cli.errors import NewRunsOnly
from vae_cli.settings import show
from vae_cli.typed import STRICT, MatmulPrecision, Node, NonNegFloat, NonNegInt, PosInt, Seed, Text

Precision = Annotated[
    Literal[64, 32, 16, "64", "32", "16", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true",
            "64-true", "transformer-engine", "transformer-engine-float16"],
    Field(description="one of 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, 64-true, transformer-engine, "
                      "transformer-engine-float16, 16, 32, 64, bf16")]
Limit = Annotated[int, Field(ge=0)] | Annotated[float, Field(ge=0, le=1)] | None
ValCheckInterval = Annotated[
    PosInt | Annotated[float, Field(gt=0, le=1)] | Text | dict[str, NonNegInt],
    Field(description='a number of training batches >= 1, a fraction of the epoch in (0, 1], or a time '
                      '("DD:HH:MM:SS", or {hours: 1})')]
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Trainer arguments `vae train` sets itself.
OWN_TRAINER_ARGUMENTS = {"logger", "callbacks", "plugins", "default_root_dir", "enable_checkpointing"}


class TrainerSettings(BaseModel):
    """pytorch_lightning.Trainer's arguments (conf/trainer): the common ones typed here; any other
    argument of Trainer is accepted as Lightning takes it (``extra_keys``). null: Lightning's default."""

    model_config = ConfigDict(**{**STRICT, "extra": "allow"})

    max_epochs: Annotated[int, Field(ge=-1)] | None = None
    min_epochs: NonNegInt | None = None
    max_steps: Annotated[int, Field(ge=-1)] | None = None
    min_steps: NonNegInt | None = None
    accelerator: Literal[ACCELERATORS] | None = None  # type: ignore[valid-type]
    devices: PosInt | Literal["auto"] | Annotated[list[NonNegInt], Field(min_length=1)] | None = None
    num_nodes: PosInt | None = None
    strategy: Text | None = None
    precision: Precision | None = None
    limit_train_batches: Limit = None
    limit_val_batches: Limit = None
    limit_test_batches: Limit = None
    log_every_n_steps: PosInt | None = None
    check_val_every_n_epoch: PosInt | None = None
    val_check_interval: ValCheckInterval | None = None  # 0 divided by zero inside fit
    num_sanity_val_steps: Annotated[int, Field(ge=-1)] | None = None
    accumulate_grad_batches: PosInt | None = None
    gradient_clip_val: NonNegFloat | None = None
    gradient_clip_algorithm: Literal["norm", "value"] | None = None
    deterministic: bool | Literal["warn"] | None = None
    benchmark: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    fast_dev_run: bool | PosInt | None = None

    @staticmethod
    def check_settings(args: dict) -> None:
        """A run that would train nothing (it ended with exit 0, no checkpoint, and a summary that
        pointed to one), and a max_time Lightning cannot read."""
        for key in ("max_epochs", "max_steps"):
            if args.get(key) == 0:
                raise NewRunsOnly(f"{key}=0 is not allowed: it trains nothing; expected an integer >= 1 (or -1: no limit)")
        if args.get("barebones"):  # Lightning's own refusal named log_every_n_steps=50, a value the user never gave
            raise NewRunsOnly("barebones=true is not allowed: Lightning's barebones mode turns off the logging, "
                              "checkpoints and progress bar that vae train is made of; leave it out")
        if args.get("limit_train_batches") == 0:
            raise NewRunsOnly(f"limit_train_batches={args['limit_train_batches']} is not allowed: it trains nothing; "
                              "expected a number of batches >= 1 or a fraction of the epoch > 0")
        if args.get("max_time") is not None:
            seconds = max_time_seconds(args["max_time"])
            if seconds is None:
                raise ValueError(f"max_time={show(args['max_time'])} is not allowed: expected DD:HH:MM:SS (e.g. "
                                 "00:01:00:00) or a mapping such as {hours: 1, minutes: 30}")
            if seconds <= 0:
                raise NewRunsOnly(f"max_time={show(args['max_time'])} is not allowed: it trains nothing; expected "
                                  "a time > 0")

    @classmethod
    def extra_keys(cls) -> set[str]:
        """Trainer's other arguments (Lightning imported only when a config names one)."""
        import inspect

        import pytorch_lightning as pl

        return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"} - OWN_TRAINER_ARGUMENTS


def max_time_seconds(value: Any) -> float | None:
    """trainer.max_time in seconds, read by Lightning's own Timer ("DD:HH:MM:SS", or timedelta's
    keywords such as {hours: 1}); None where it cannot read it."""
    from pytorch_lightning.callbacks import Timer

    try:
        return Timer(duration=value).time_remaining()  # before the run: the whole duration
    except Exception:  # its MisconfigurationException, timedelta's TypeError, an int's AttributeError
        return None


class EvalSettings(BaseModel):
    """The test evaluation at the end of training."""

    model_config = STRICT
    k: NonNegInt = 100                  # IWAE samples; 0 skips the test evaluation
    limit: PosInt | None = None         # only the first N test examples
    batch_size: PosInt = 100


class TrainSettings(BaseModel):
    """The top level of conf/train.yaml, and of the config saved in every checkpoint."""

    model_config = STRICT
    dataset: Node("vae_cli.datamodule.ImageData")
    likelihood: Node("torch.nn.Module")  # before model, which holds a copy: errors name likelihood.*
    # likewise; absent from the configs of 0.1.0 (N(0, I) and the diagonal Gaussian then)
    prior: Node("vae_cli.priors.Prior") = None
    posterior: Node("vae_cli.posteriors.Posterior") = None
    model: Node("vae_cli.model.LatentModel")  # VAE, or LadderVAE (model=ladder)
    optimizer: Node("torch.optim.Optimizer")
    scheduler: Node("torch.optim.lr_scheduler.LRScheduler") = None  # absent or null: a constant lr
    objective: Node("vae_cli.objectives.Objective") = {"_target_": "vae_cli.objectives.ELBO"}  # runs before 0.2
    trainer: Node("pytorch_lightning.Trainer")
    seed: Seed = 0
    beta: NonNegFloat = 1.0             # weight on the KL
    kl_warmup_steps: NonNegInt = 0
    free_bits: NonNegFloat = 0.0        # nats per latent dimension (Kingma et al. 2016); 0 is off
    compile: bool = False               # torch.compile the training objective (README, Speed)
    cuda_graph: bool = True             # on one GPU, replay the training step as one CUDA graph (README, Speed)
    matmul_precision: MatmulPrecision = "highest"
    verbose: bool = False               # Lightning's device lines, tips and the model summary
    data_dir: Text
    resume: Text | None = None
    eval: EvalSettings = EvalSettings()

    @staticmethod
    def check_settings(args: dict) -> None:
        """The settings that follow another (conf/: image_shape is ${dataset.shape}, a network's
        latent_dim is ${model.latent_dim}) still agree with it: set alone, they built networks of
        mismatched sizes that failed inside training ("mat1 and mat2 shapes cannot be multiplied")."""
        from vae_cli.errors import NewRunsOnlyClash

        rules = [("image_shape", "dataset.shape", (args.get("dataset") or {}).get("shape"),
                  "set dataset.shape instead (dataset=folder resizes your own images to any shape)")]
        latent_dim = (args.get("model") or {}).get("latent_dim")
        if isinstance(latent_dim, int):
            rules.append(("latent_dim", "model.latent_dim", latent_dim, "set model.latent_dim instead"))

        def walk(node: Any, path: str) -> None:
            for key, value in node.items() if isinstance(node, dict) else ():
                for name, source, expected, hint in rules:
                    if key == name and expected is not None and value != expected and f"{path}{key}" != source:
                        raise NewRunsOnlyClash(f"{path}{key}={show(value)} is not allowed: it must equal {source} "
                                            f"({show(expected)}); {hint}")
                walk(value, f"{path}{key}.")

        # the groups first: the user sets prior.image_shape, and model.prior is a copy of it
        first = ("likelihood", "prior", "posterior")
        walk({k: args[k] for k in [*first, *args] if k in args and k != "dataset"}, "")


def endless(trainer_cfg: dict[str, Any]) -> bool:
    """True if nothing ends the run: no epoch limit (-1), no step limit and no trainer.max_time."""
    return (trainer_cfg.get("max_epochs") == -1 and trainer_cfg.get("max_steps") in (None, -1)
            and not trainer_cfg.get("max_time"))


# What a scheduler or objective.start is told when nothing ends the run (both need its length).
NO_END = ("{what} needs the run's end: set trainer.max_epochs, trainer.max_steps or trainer.max_time "
          "(now the run has no limit)")
# The clock of trainer.max_time, read by several processes: each would follow its own
MANY_CLOCKS = ("{what} with trainer.max_time is not allowed on several processes (each would follow its own clock): "
               "bound the run by trainer.max_steps or trainer.max_epochs instead")


def several_processes(trainer: dict[str, Any]) -> bool:
    """Whether Lightning will train in more than one process: several devices or nodes given, or
    devices=auto over several GPUs (a strategy or accelerator that pins one process is not looked at)."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if nodes > 1 or (isinstance(devices, int) and devices > 1) or (isinstance(devices, list) and len(devices) > 1):
        return True
    if devices in ("auto", None) and str(trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.device_count() > 1
    return False


def trainer_arguments(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """pytorch_lightning.Trainer's keyword arguments from conf/trainer: null means Lightning's default,
    but where None is an argument of its own (check_val_every_n_epoch=None: validate by the batches
    counted across epochs, as Lightning's own message advises; it was turned back into 1)."""
    return {k: v for k, v in trainer_cfg.items() if k != "_target_" and (v is not None or k in NONE_IS_A_VALUE)}


NONE_IS_A_VALUE = {"check_val_every_n_epoch"}  # Trainer arguments whose None is not their default


def check_nodes(trainer_cfg: dict[str, Any]) -> None:
    """trainer.num_nodes > 1 only where a cluster started this process (SLURM, torchrun, LSF, MPI,
    Kubeflow, or MASTER_ADDR and NODE_RANK set by hand): started alone, Lightning's DDP waits for
    the other nodes forever. Checked in the job's own process, which a cluster launcher starts
    (hydra/launcher=submitit_slurm submits from a machine outside the cluster)."""
    nodes = trainer_cfg.get("num_nodes") or 1
    if nodes <= 1:
        return
    from lightning_fabric.plugins.environments import (KubeflowEnvironment, LSFEnvironment, MPIEnvironment,
                                                       SLURMEnvironment, TorchElasticEnvironment)

    from vae_cli.errors import UserError

    clusters = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, KubeflowEnvironment, MPIEnvironment)
    if any(_detects(env) for env in clusters) or {"MASTER_ADDR", "NODE_RANK"} <= set(os.environ):
        return
    raise UserError(f"trainer.num_nodes={nodes} needs a multi-node launch (SLURM, e.g. -m hydra/launcher=submitit_slurm; "
                    "torchrun --nnodes; or MASTER_ADDR, MASTER_PORT and NODE_RANK set on each node): started alone it "
                    "would wait for the other nodes forever; on one machine use trainer.devices")


def _detects(env: Any) -> bool:
    try:
        return bool(env.detect())
    except Exception:  # e.g. MPI's detection without mpi4py
        return False


def check_trainer_here(trainer_cfg: dict[str, Any]) -> None:
    """What only this machine knows: the accelerator is there, and so are the devices asked for.
    (Not part of the description: a checkpoint trained on a GPU still loads on a CPU.)"""
    import torch

    from vae_cli.errors import UserError

    accelerator = trainer_cfg.get("accelerator") or "auto"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    available = ["auto", "cpu"] + (["gpu", "cuda"] if gpus else []) + (["mps"] if mps else [])
    if accelerator == "tpu":
        from pytorch_lightning.accelerators import XLAAccelerator

        if XLAAccelerator.is_available():
            available.append("tpu")
    if accelerator not in available:
        raise UserError(f"trainer.accelerator={accelerator!r} is not allowed: no such device here; expected one of "
                        f"{', '.join(available)}")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus):
        count, what = gpus, "GPUs"
    elif accelerator in ("mps", "tpu"):
        return  # Lightning counts these itself
    else:
        count, what = os.cpu_count() or 1, "CPUs"
    devices = trainer_cfg.get("devices")
    if what == "CPUs":
        precision = str(trainer_cfg.get("precision"))
        if precision in ("16", "16-mixed"):  # Lightning would switch to bf16-mixed, and say so in a log line
            raise UserError(f"trainer.precision={show(trainer_cfg['precision'])} is not allowed on a CPU: float16 "
                            "mixed precision needs a GPU; use bf16-mixed (or 16-true, 32-true, 64-true)")
        if isinstance(devices, list):  # Lightning's CPU accelerator counts processes, it picks no cores
            raise UserError(f"trainer.devices={show(devices)} is not allowed on CPUs: expected auto or the number of "
                            f"processes, an integer from 1 to {count}")
    wanted = devices if isinstance(devices, list) else ([] if devices in (None, "auto") else [devices - 1])
    if any(i >= count for i in wanted):
        choices = f"auto or an integer from 1 to {count}" if what == "CPUs" else \
            f"auto, an integer from 1 to {count}, or a list of indices from 0 to {count - 1}"
        raise UserError(f"trainer.devices={devices} is not allowed: this machine has {count} {what}; expected {choices}")
