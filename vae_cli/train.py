"""`vae train`: build data, model and Trainer from the config, fit, evaluate the test split, report."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vae_cli.errors import UserError, first_line, raised_in
from vae_cli.logs import STDOUT, log, shell
from vae_cli.run_config import TrainSettings, trainer_arguments  # noqa: F401  (the settings of this command)


def build_datamodule(config: dict[str, Any], data_dir: str | None = None):
    """The ImageData of a run's resolved config (data_dir replaced when given)."""
    from hydra.utils import instantiate

    from vae_cli.data import likelihood_name

    dataset = dict(config["dataset"])
    if data_dir is not None:
        dataset["data_dir"] = data_dir
    return instantiate(dataset, likelihood=likelihood_name(config))


def run_folder(cfg: DictConfig) -> Path:
    """Hydra's output folder for this run (or the current folder outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, lists as strings: what TensorBoard's HPARAMS tab shows."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = str(v) if isinstance(v, list) or v is None else v
    return out


def check_model_size(model: Any) -> None:
    """Refuse a model whose training state cannot fit: beside its weights, Adam keeps a gradient and two
    moments of every parameter (12 more bytes each in float32), before any activation. Past the
    memory, a model of a million hidden units filled 16 GB for over a minute before anything failed."""
    check_parameters(sum(p.numel() for p in model.parameters()), next(model.parameters()).device, built=True)


def check_parameters(n: int, device: Any = None, built: bool = False) -> None:
    """Refuse n parameters whose training state exceeds the memory free on the device (the host's by
    default): 16 bytes each in float32 (weights, gradients, Adam's two moments), or 12 more once the
    model is built (its weights take memory already)."""
    from vae_cli.cli import _task_overrides
    from vae_cli.errors import available_memory, sizes_given

    need, have = (12 if built else 16) * n, available_memory(device)
    if have and need > have:
        given = sizes_given([o for o in _task_overrides() if o.startswith(("model.", "prior.", "posterior.", "dataset.shape="))])
        raise UserError(f"the model has {n:,} parameters{' (' + ' '.join(given) + ')' if given else ''}: "
                        f"training them takes about {need / 1e9:.1f} GB{' more' if built else ''}, beyond "
                        f"the {have / 1e9:.1f} GB free here: make it smaller")


def parameters_to_build(model_config: dict[str, Any]) -> int | None:
    """The parameters the model's config builds, counted on torch's meta device: nothing is allocated
    or initialised. None where the model cannot be built there (it is then checked once built)."""
    import torch
    from hydra.utils import instantiate

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in instantiate(model_config).parameters())
    except Exception:  # noqa: BLE001 - a setting the real build reports in its own words
        return None


def warn_if_costly(model: Any) -> None:
    """One warning for a combination that trains, but at a cost the user would not guess: the VampPrior
    over a flow posterior is a mixture of K flows, and its density at a draw inverts each of them (an
    autoregressive inverse, one network pass per latent dimension)."""
    from vae_cli.posteriors import IAFPosterior
    from vae_cli.priors import VampPrior

    prior, posterior = getattr(model, "prior_module", None), getattr(model, "posterior_module", None)
    # K * D network passes a step: about 0.5 ms each for the default mlp (5.2 s at K=500, D=20; 0.54 s
    # at K=50), so from K * D = 200 (0.1 s) on the step costs several times the flow's own 39 ms
    if isinstance(prior, VampPrior) and isinstance(posterior, IAFPosterior) and \
            len(prior.pseudo_raw) * model.latent_dim >= 200:
        k, d = len(prior.pseudo_raw), model.latent_dim
        log.warning(f"prior=vamp with posterior=iaf: p(z) is a mixture of {k} flows, and log p(z) at each draw "
                    f"inverts all of them in {d} passes each: on 2 CPU cores a training step of the default mlp took "
                    "5.2 s, against 39 ms with posterior=iaf alone (README, Configuration); fewer prior.components "
                    "make it cheaper")


def build_trainer(trainer_kwargs: dict[str, Any], run: Path, logger: Any, verbose: bool = False):
    """vae train's Trainer over run/: Lightning's with trainer_kwargs, two checkpoints (best by val/elbo,
    and last), the pictures, the safe interrupt, the progress bar. Returns (trainer, best checkpoint)."""
    import pytorch_lightning as pl

    from vae_cli.callbacks import (AtomicCheckpointIO, ModelCheckpoint, NoProfiler, ProgressBar, SafeInterrupt,
                                   SpawnedProcesses, TrainingPictures)
    from vae_cli.logs import show_model_summary

    best = ModelCheckpoint(
        dirpath=run / "checkpoints", filename="best-epoch={epoch}-step={step}", auto_insert_metric_name=False,
        monitor="val/elbo", mode="max", save_top_k=1,
    )
    # A checkpoint of its own for "last": ModelCheckpoint's save_last only writes when the best
    # improves, which would make last.ckpt the best one and resume from the wrong step. Saved at
    # the end of every training epoch (after its validation, if any), and so at the end of fit:
    # left to Lightning, it is saved after each validation instead wherever validation is not once
    # an epoch (check_val_every_n_epoch > 1, val_check_interval), and last.ckpt then missed the
    # epochs trained since, or was never written.
    last = ModelCheckpoint(dirpath=run / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False, save_on_train_epoch_end=True)
    kwargs = dict(trainer_kwargs)
    # The summary table goes to RUN/train.log, and to the terminal only when asked for: verbose=true,
    # or trainer.enable_model_summary=true (false: no table at all).
    summary = verbose or kwargs.get("enable_model_summary") is True
    show_model_summary(summary)
    kwargs.setdefault("enable_model_summary", True)
    kwargs.setdefault("profiler", NoProfiler())  # no profiler, as Lightning's default, without its cost per hook
    callbacks = [best, last, TrainingPictures(), SafeInterrupt()]
    if "spawn" in str(kwargs.get("strategy")):  # only there: every callback is called at every step's hooks
        callbacks.append(SpawnedProcesses(run / "train.log", verbose, summary))
    if kwargs.get("enable_progress_bar", True):
        # Redrawn every 10 steps, not every step: the bar costs 0.3 ms a draw, a step 5 ms.
        callbacks.append(ProgressBar(refresh_rate=10))
    trainer = pl.Trainer(**kwargs, default_root_dir=str(run), logger=logger, callbacks=callbacks,
                         plugins=[AtomicCheckpointIO()])
    return trainer, best


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train a VAE as cfg says; returns the final metrics (also written to RUN/metrics.json)."""
    from vae_cli.logs import lightning_verbose
    from vae_cli.runs import resume_source, run_lock

    verbose = bool(cfg.get("verbose", False))  # the command line's, also on resume: it only changes the terminal
    lightning_verbose(verbose)

    resume_ckpt = None
    if cfg.resume is not None:  # continue that run with its own saved config, in its own folder
        config, resume_ckpt = resume_source(cfg.resume)
        run = Path(os.path.abspath(os.path.expanduser(cfg.resume)))  # the summary's paths work from anywhere
        if resume_ckpt is None:
            log.warning(f"resume={cfg.resume} has no checkpoints/last.ckpt yet: "
                        "starting over from step 0 with its saved config (.hydra/config.yaml)")
        elif resume_ckpt.name != "last.ckpt":
            log.warning(f"resume={cfg.resume} has no checkpoints/last.ckpt: continuing from {resume_ckpt.name}, "
                        "the checkpoint of the most steps it holds")
    else:
        config = OmegaConf.to_container(cfg, resolve=True)
        run = run_folder(cfg)
        dataset = config["dataset"]
        if dataset.get("path"):  # dataset=folder: the checkpoint names the folder as seen from anywhere
            from hydra.utils import to_absolute_path  # from where `vae train` ran, also with hydra.job.chdir=true

            dataset["path"] = str(Path(to_absolute_path(os.path.expanduser(dataset["path"]))).resolve())
    with run_lock(run, f"resume={cfg.resume}" if cfg.resume is not None else f"the run folder {str(run)!r}"):
        for partial in (run / "checkpoints").glob(".*.tmp"):  # a write that a forced exit cut short
            partial.unlink(missing_ok=True)
        try:
            return train_in(run, config, resume_ckpt, verbose)
        except (UserError, MemoryError, RuntimeError) as e:
            from vae_cli.cli import _in_sweep
            from vae_cli.errors import out_of_memory
            from vae_cli.module import NonFiniteLoss

            # a user's mistake, or a size this machine cannot hold (the CLI says so in one line); a
            # sweep keeps its failed job's folder (its summary reads the error and the overrides
            # there); a loss that went NaN stops a run that trained, whose log says why
            refused = isinstance(e, UserError) or out_of_memory(e)
            if refused and cfg.resume is None and not _in_sweep() and not isinstance(e, NonFiniteLoss):
                discard_untrained(run)
            raise


RUN_FILES = (".hydra", "train.log", "tensorboard", "checkpoints")  # what a run makes in its folder before training


def discard_untrained(run: Path) -> None:
    """Remove what a new run refused before it trained anything (a dataset that cannot be fetched, a
    model too large to train here) made in its folder: Hydra's .hydra/ and train.log, Lightning's
    tensorboard/ and checkpoints/. Else the folder would hold a run that is not one: the same command
    run again was refused ("holds a run already"). The folder goes too where this command made it and
    nothing else is in it. A run with a checkpoint or a logged training value is kept, and so is
    whatever else the folder held; rank 0 alone decides."""
    import shutil

    from vae_cli.checks import NEW_FOLDERS
    from vae_cli.runs import first_process, remove_empty

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    if not first_process() or any((run / "checkpoints").glob("*.ckpt")) or \
            any(b"train/" in e.read_bytes() for e in events):
        return
    for name in RUN_FILES:
        path = run / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink(missing_ok=True)
    if run.resolve() in NEW_FOLDERS or _stamped_run_dir():  # made for this run: gone too, once empty,
        # then outputs/DATE/ and outputs/ where this command made them
        remove_empty([run, *itertools.takewhile(lambda d: d.resolve() in NEW_FOLDERS, run.parents)])


def _stamped_run_dir() -> bool:
    """Whether Hydra made the run folder from the default outputs/DATE/TIME-MICROSECONDS (no
    hydra.run.dir given): a name of this run's own. The checked name was stamped a moment earlier."""
    from hydra.core.hydra_config import HydraConfig

    from vae_cli.checks import override_key

    if not HydraConfig.initialized():
        return False
    return not any(override_key(o) == "hydra.run.dir" for o in HydraConfig.get().overrides.hydra)


def train_in(run: Path, config: dict[str, Any], resume_ckpt: Path | None, verbose: bool) -> dict[str, Any]:
    """train()'s work in the run folder it holds: fit (from resume_ckpt, if given), then measure and report."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from vae_cli.module import VAEModule
    from vae_cli.run_config import NO_END, check_nodes, endless
    from vae_cli.runs import set_matmul_precision

    trainer_cfg = config["trainer"]
    # The run's own precision (a resumed run continues as it started; runs older than the setting: highest).
    set_matmul_precision(config.get("matmul_precision", "highest"))

    check_nodes(trainer_cfg)
    pl.seed_everything(config["seed"], workers=True, verbose=False)
    try:
        data = build_datamodule(config)
        # Counted before it is built: 'dataset.shape=[3,2048,2048]' makes an mlp of 10 billion
        # parameters, whose initialisation wrote 24 GB until the kernel killed the process, silently.
        n = parameters_to_build(config["model"])
        if n is not None:
            check_parameters(n)
        model = instantiate(config["model"])
        objective = instantiate(config.get("objective") or {"_target_": "vae_cli.objectives.ELBO"})
        module = VAEModule(model, instantiate(config["optimizer"]), config["beta"], config["kl_warmup_steps"],
                           config=config, objective=objective, free_bits=config.get("free_bits", 0.0),
                           cuda_graph=config.get("cuda_graph", True), compile=bool(config.get("compile")),
                           scheduler=instantiate(config["scheduler"]) if config.get("scheduler") else None)
        try:  # a bad optimizer setting fails here, in one line naming the settings, not inside fit
            module.configure_optimizers()
        except (ValueError, TypeError) as e:
            from vae_cli.settings import show

            given = [f"{group}.{k}={show(v)}" for group in ("optimizer", "scheduler")
                     for k, v in (config.get(group) or {}).items() if not k.startswith("_")]
            raise UserError(f"{', '.join(given)}: not allowed together ({first_line(e)})") from None
        check_model_size(model)
        warn_if_costly(model)
        if endless(trainer_cfg) and module.follows_progress():
            raise UserError(NO_END.format(what=module.follows_progress()))
    except UserError:
        raise
    except Exception as e:  # Hydra's InstantiationException, TypeError, ValueError: a bad setting
        from vae_cli.errors import out_of_memory

        if out_of_memory(e.__cause__ or e):  # sizes too large: the CLI's one line names them
            raise (e.__cause__ or e) from None
        raise UserError(f"cannot build the model or optimizer from these settings: {first_line(e.__cause__ or e)}") from None
    logger = TensorBoardLogger(save_dir=str(run), name="tensorboard", version="", default_hp_metric=False)
    try:
        trainer, best = build_trainer(trainer_arguments(trainer_cfg), run, logger, verbose)
    except Exception as e:  # Lightning's MisconfigurationException and ValueErrors name the bad value
        raise UserError(f"trainer settings: {first_line(e)}") from None
    if not any(word in str(trainer_cfg.get("strategy")) for word in ("fork", "notebook")):
        # Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 so that CUDA checks do not poison a later
        # fork. With it, every Adam step asks NVML whether CUDA is there (dlopen and all): 0.3 ms a
        # step, a tenth of the step of a small model on a CPU. Nothing forks here, so it goes.
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    from vae_cli.cli import raise_if_stopped

    raise_if_stopped()  # a Ctrl-C that some library swallowed while the run was being built
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume_ckpt) if resume_ckpt else None, weights_only=True)
    except (MisconfigurationException, ValueError) as e:
        # Settings Lightning can only judge once it sees the data, before any step: a fraction
        # trainer.limit_train_batches of the epoch that is no batch (its MisconfigurationException),
        # a trainer.val_check_interval of more batches than an epoch has (a ValueError of its
        # fit loop's setup_data). Any other ValueError is not the user's: it stays as it is.
        if isinstance(e, MisconfigurationException) or raised_in(e, "setup_data"):
            raise UserError(f"trainer settings: {first_line(e)}") from None
        raise
    except SystemExit:
        # Lightning catches Ctrl-C inside fit, shuts down (last.ckpt stays that of the last finished
        # epoch) and calls sys.exit(1): turn it back into the interrupt the CLI reports.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:  # Lightning versions that return from fit instead
        raise KeyboardInterrupt

    step = trainer.global_step or saved_step(run)  # 0 where fit ran in other processes (ddp_spawn, ddp_fork)
    if step == module.resumed.get("step") and (run / "metrics.json").is_file():
        # A finished run resumed: nothing trained, and its test figures stand (a second evaluation
        # would log test/* and the hyperparameters to TensorBoard again, at the same step).
        metrics = json.loads((run / "metrics.json").read_text())
        if trainer.is_global_zero:
            report(run, metrics, resumed="nothing left to train: it had finished")
        return metrics
    metrics = {"val_elbo": _metric(trainer, "val/elbo"), "step": step,
               "epoch": epochs_done(step, steps_per_epoch(trainer, data))}
    if metrics["val_elbo"] is None and resume_ckpt is not None:  # a finished run resumed: no new epoch
        metrics["val_elbo"] = module.resumed.get("val_elbo")
    watch = module.divergence
    if watch.diverged_epoch is not None:  # the last model may not be the one to measure: say where the best is
        untrained = watch.best_epoch == watch.UNTRAINED  # ruined in its first epoch: no checkpoint holds better
        metrics.update(best_val_elbo=watch.best, best_epoch=watch.best_epoch, diverged_epoch=watch.diverged_epoch,
                       best_checkpoint=None if untrained else best.best_model_path or watch.best_checkpoint)
    if trainer.is_global_zero:
        metrics.update(test_metrics(module.model, data, config, trainer,
                                    progress=trainer.progress_bar_callback is not None))
        logger.log_hyperparams(flat(config), {f"hparams/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        # fit() closed the logger's writer; these last events went to a new one: flush and close it,
        # or they may still sit in its queue when the process exits.
        logger.finalize("success")
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report(run, metrics, resumed=resume_ckpt is not None, checkpointed=not trainer.fast_dev_run)
    return metrics


def steps_per_epoch(trainer, data) -> int:
    """Optimizer steps in one epoch of this run: its training batches (after trainer.limit_train_batches)
    over trainer.accumulate_grad_batches; from the training split where fit had no epoch to set up
    (a finished run resumed)."""
    from vae_cli.data import Batches

    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        # one process's share of the split (this process may not have joined the others: ddp_spawn),
        # limited as Lightning limits it (data_connector._parse_num_batches)
        world = trainer.num_nodes * trainer.num_devices
        batches = len(Batches(data.load()["train"], data.batch_size, data.mode, shuffle=False, world_size=world))
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def saved_step(run: Path) -> int:
    """The optimizer steps last.ckpt holds: what a run trained where fit ran in processes of its own
    (ddp_spawn and ddp_fork start them, and this one's trainer counts none)."""
    import torch

    path = run / "checkpoints" / "last.ckpt"
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - none written (a run stopped before its first epoch ended)
        return 0


def epochs_done(steps: int, per_epoch: int) -> float:
    """Epochs trained, from the steps, to three significant digits where not whole. Lightning's
    current_epoch counts an epoch that max_steps stopped after 30 of its 391 steps as done, and a
    checkpoint saved then as epoch 0, so a run and its resume said 1 and 0 for the same 30 steps."""
    return float(f"{steps / per_epoch:.3g}") if steps % per_epoch else float(steps // per_epoch)


def _metric(trainer, name: str) -> float | None:
    v = trainer.callback_metrics.get(name)
    return float(v) if v is not None else None


def test_metrics(model, data, config: dict[str, Any], trainer, progress: bool = False) -> dict[str, Any]:
    """The test split's ELBO, log p(x) (IWAE with eval.k samples), gap and bits/dim, logged as test/*."""
    import math

    from vae_cli.estimators import bits_per_dim
    from vae_cli.evaluate import Plan, evaluate_split

    k = config["eval"]["k"]
    if k == 0:
        return {}
    images = data.load()["test"]
    if config["eval"]["limit"]:
        images = images[: config["eval"]["limit"]]
    if trainer.fast_dev_run:  # Lightning's check of the code, a batch or N of each loop: so here too
        images = images[: int(trainer.fast_dev_run) * config["eval"]["batch_size"]]
    # Said before it starts: with k=100 over 10,000 images it is the slowest minute of a short run.
    log.info(f"test evaluation: IWAE k={k} on {len(images)} examples", extra=STDOUT)
    # In float32, as `vae evaluate` rebuilds the model from its checkpoint (trainer.precision=64-true,
    # bf16-true, ... train in another dtype): the same figures either way, from the same images.
    model.float().eval()
    r = evaluate_split(model, images, data.mode, Plan(k=k, estimators=("iwae",)), config["eval"]["batch_size"],
                       seed=config["seed"], progress=progress)
    out = {"test_elbo": r["elbo"], "test_log_px": r["log_px"], "test_gap": r["gap"], "test_k": k,
           "test_log_px_estimator": r["log_px_estimator"], "test_n": len(images),
           "test_bits_per_dim": bits_per_dim(r["log_px"], math.prod(images.shape[1:]), data.mode)}
    trainer.logger.log_metrics({"test/elbo": r["elbo"], "test/log_px": r["log_px"], "test/gap": r["gap"]},
                               step=trainer.global_step)
    return out


ESTIMATOR_NAMES = {"iwae": "IWAE", "ais": "AIS", "exact": "exact (quadrature)", "refined": "IWAE, refined proposal"}


def report(run: Path, metrics: dict[str, Any], resumed: bool | str = False, checkpointed: bool = True) -> None:
    """The last lines a user reads, the same block for every run: where it is, how it went, how to look
    at it. ``resumed``: True, or what the resume did (shown in brackets after the steps);
    ``checkpointed``: False where no checkpoint was saved (trainer.fast_dev_run)."""
    rows = [("run folder", str(run))]
    if "step" in metrics:
        epochs, steps = metrics["epoch"], metrics["step"]
        trained = f"{epochs:g} epoch{'s' * (epochs != 1)}, {steps} step{'s' * (steps != 1)}"
        note = (resumed if isinstance(resumed, str) else "resumed") if resumed else ""
        rows.append(("trained", trained + (f" ({note})" if note else "")))
    val = metrics.get("val_elbo")
    rows.append(("val ELBO", f"{val:.2f} nats/example (last validation)" if val is not None
                 else "none (no validation epoch, so no best checkpoint" +
                 ("; last.ckpt is kept)" if (run / "checkpoints" / "last.ckpt").is_file() else ")")))
    if not checkpointed:
        rows.append(("checkpoint", "none (trainer.fast_dev_run saves none), so no command can read this run"))
    if "best_val_elbo" in metrics:  # the run diverged (vae_cli.collapse.DivergenceMonitor)
        where = f": vae evaluate ckpt={shell(metrics['best_checkpoint'])}" if metrics.get("best_checkpoint") else ""
        when = "the untrained model" if metrics["best_epoch"] == -1 else f"epoch {metrics['best_epoch']}"
        rows.append(("best val ELBO", f"{metrics['best_val_elbo']:.2f} nats/example ({when}; "
                                      f"diverged at epoch {metrics['diverged_epoch']}){where}"))
    if "test_log_px" in metrics:
        n = f" on {metrics['test_n']} examples" if "test_n" in metrics else ""
        name = ESTIMATOR_NAMES.get(metrics.get("test_log_px_estimator", "iwae"), metrics.get("test_log_px_estimator"))
        rows += [("test ELBO", f"{metrics['test_elbo']:.2f} nats/example{n}"),
                 ("test log p(x)", f"{metrics['test_log_px']:.2f} nats/example ({name}, k={metrics['test_k']})"),
                 ("test gap", f"{metrics['test_gap']:.2f} nats/example (log p(x) - ELBO"
                              + ("; below 0 by Monte Carlo noise: raise eval.k)" if metrics["test_gap"] < 0 else ")"))]
        if metrics.get("test_bits_per_dim") is not None:
            rows.append(("bits/dim", f"{metrics['test_bits_per_dim']:.3f} (of log p(x))"))
    else:
        later = f"; measure it with: vae evaluate run={shell(run)}" if checkpointed else ""
        rows.append(("test", f"skipped (eval.k=0){later}"))
    rows.append(("TensorBoard", f"tensorboard --logdir {shell(run / 'tensorboard')}"))
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:  # on stdout, and in the run's train.log
        log.info(f"{label + ':':<{width}} {value}", extra=STDOUT)
