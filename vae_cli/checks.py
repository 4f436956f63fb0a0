"""Check a command line before Hydra runs it: compose the config, then check every value.

Each problem becomes a UserError whose one line names the value and what is allowed. The checks
run before Hydra creates a run folder, so a mistake writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vae_cli.errors import UserError, first_line


def register_resolvers() -> None:
    """Resolvers the configs use: where a run goes (a resumed run stays in its own folder)."""
    if not OmegaConf.has_resolver("vae_run_dir"):
        OmegaConf.register_new_resolver("vae_run_dir", lambda resume, new: new if resume is None else str(resume))
        OmegaConf.register_new_resolver("vae_output_subdir", lambda resume: ".hydra" if resume is None else None)


def options(conf_dir: str, group: str) -> list[str]:
    """The options of a config group: the yaml files in conf/<group>/."""
    return sorted(p.stem for p in Path(conf_dir, group).glob("*.yaml"))


def _variants(overrides: list[str], multirun: bool = True) -> list[list[str]]:
    """One override list per value of every sweep (``a=1,2``), the others at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except Exception:  # Hydra's parser message is multi-line
            raise UserError(f"cannot read {o!r}: expected key=value; quote values with characters such as ~ "
                            """or spaces, e.g. 'data_dir="~/data"'""") from None
    parsed = parser.parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_sweep_override() and not multirun:
            raise UserError(f"{o.input_line!r} is a sweep: add -m to run one job per value")
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            choices.append([f"{o.get_key_element()}={v}" for v in values])
        else:
            choices.append([o.input_line])
    base = [c[0] for c in choices]
    out = [base]
    for i, c in enumerate(choices):
        out += [base[:i] + [v] + base[i + 1 :] for v in c[1:]]
    return out


def _explain(e: Exception, conf_dir: str) -> str:
    """Hydra's multi-line composition errors, as one line."""
    text = str(e).strip() or first_line(e.__cause__ or e)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m:
        group, value = m.groups()
        if group.startswith("hydra/"):
            return f"{group}={value} is not installed (see the README: pip install 'vae-cli[{value}]')"
        allowed = options(conf_dir, group)
        return f"{group}={value!r} does not exist: choose one of {', '.join(allowed)}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        return f"unknown setting {m.group(1)!r} (see `--cfg job` for the settings; prefix + to add a new key)"
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return f"+{m.group(1)}: that setting exists already; drop the +"
    return text.splitlines()[0]


def compose(conf_dir: str, command: str, overrides: list[str]) -> DictConfig:
    """Compose conf/<command>.yaml with overrides, as Hydra will (with the hydra node removed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name=command):
            return hydra_compose(config_name=command, overrides=overrides)
    except UserError:
        raise
    except Exception as e:
        raise UserError(_explain(e, conf_dir)) from None
    finally:
        GlobalHydra.instance().clear()


def check_command_line(conf_dir: str, command: str, overrides: list[str], multirun: bool = False) -> None:
    """Compose every variant of the command line and check its values; raise UserError on the first problem."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    for o, k in zip(overrides, keys):
        if command == "train" and k in ("hydra.run.dir", "hydra.sweep.dir") and "resume" not in keys:
            value = o.split("=", 1)[1].strip("'\"")
            if not value:
                raise UserError(f"{k} is empty: give a new folder")
            folder = Path(value).expanduser()
            taken = (folder / "checkpoints").exists() if k == "hydra.run.dir" else (
                folder.is_dir() and any(p.is_dir() and (p / ".hydra").exists() for p in folder.iterdir()))
            if taken:
                raise UserError(f"{k}={str(folder)!r} holds a run already: choose a new folder"
                                + (f" (or continue it with resume={folder})" if k == "hydra.run.dir" else ""))
    if command == "train" and "resume" in keys:
        others = [o for o, k in zip(overrides, keys) if k != "resume" and not k.startswith("hydra")]
        if others:
            raise UserError(f"resume=DIR continues a run with its own saved config: drop {others[0]!r}")
    for variant in _variants(overrides, multirun):
        cfg = compose(conf_dir, command, variant)
        CHECKS.get(command, lambda c: None)(cfg)


# --------------------------------------------------------------------------- value checks


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as e:
        raise UserError(f"{key}: {first_line(e)}") from None


def _need(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    value = _get(cfg, key)
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good:
        raise UserError(f"{key}={_show(value)} is not allowed: expected {allowed}")


def _show(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return repr(value) if isinstance(value, str) else str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _opt(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or ok(v)


def _one_of(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), "one of " + ", ".join(map(str, allowed))


def _ints(v: Any, n: int | None = None) -> bool:
    v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
    return isinstance(v, list) and len(v) > 0 and all(positive_int(i) for i in v) and (n is None or len(v) == n)


def _check_network(cfg: DictConfig) -> None:
    """The architecture's sizes, for the models in conf/model/ (others are the user's own business)."""
    target = str(_get(cfg, "model.encoder._target_"))
    if target.endswith("MLPEncoder"):
        _need(cfg, "model.encoder.hidden", _ints, "a list of positive integers, e.g. [400] or [512,256]")
    elif target.endswith("ConvEncoder"):
        _need(cfg, "model.encoder.channels", lambda v: _ints(v, 2), "two positive integers, e.g. [32,64]")
        _need(cfg, "model.encoder.hidden", positive_int, "a positive integer")


def _check_shape(cfg: DictConfig) -> None:
    shape = _get(cfg, "dataset.shape")
    shape = OmegaConf.to_container(shape) if OmegaConf.is_config(shape) else shape
    if not (isinstance(shape, list) and len(shape) == 3 and all(positive_int(s) for s in shape) and shape[0] in (1, 3)):
        raise UserError(f"dataset.shape={shape} is not allowed: expected [C, H, W] with C 1 or 3, e.g. [1,28,28]")
    if "Conv" in str(_get(cfg, "model.encoder._target_")) and (shape[1] % 4 or shape[2] % 4):
        raise UserError(f"dataset.shape={shape} does not suit model=conv: height and width must be divisible by 4 (28, 32)")


def check_train(cfg: DictConfig) -> None:
    """The values `vae train` needs right before it writes anything."""
    from vae_cli.data import BINARIZE

    _need(cfg, "model.latent_dim", positive_int, "a positive integer")
    _need(cfg, "dataset.batch_size", positive_int, "a positive integer")
    _need(cfg, "dataset.eval_batch_size", positive_int, "a positive integer")
    _need(cfg, "dataset.binarize", *_one_of(*BINARIZE))
    _need(cfg, "dataset.validation", *_one_of("holdout", "test"))
    _need(cfg, "beta", lambda v: _num(v) and v >= 0, "a number >= 0")
    _need(cfg, "kl_warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _need(cfg, "seed", _is_int, "an integer")
    _need(cfg, "compile", lambda v: isinstance(v, bool), "true or false")
    _need(cfg, "optimizer.lr", lambda v: _num(v) and v > 0, "a positive number")
    _need(cfg, "trainer.max_epochs", lambda v: v is None or (_is_int(v) and v >= -1), "an integer >= -1 (-1: no limit)")
    _need(cfg, "eval.k", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 skips the test evaluation)")
    _need(cfg, "eval.limit", _opt(positive_int), "a positive integer or null")
    _need(cfg, "eval.batch_size", positive_int, "a positive integer")
    if OmegaConf.select(cfg, "likelihood.scale") is not None:
        from vae_cli.likelihoods import SCALES

        _need(cfg, "likelihood.scale", *_one_of(*SCALES))
        _need(cfg, "likelihood.sigma", lambda v: _num(v) and v > 0, "a positive number")
    _need(cfg, "dataset.val_fraction", _opt(lambda v: _num(v) and 0 < v < 1), "a number between 0 and 1")
    if OmegaConf.select(cfg, "likelihood.min_sigma") is not None:
        _need(cfg, "likelihood.min_sigma", lambda v: _num(v) and 0 < v <= _get(cfg, "likelihood.sigma"),
              "a positive number no larger than likelihood.sigma")
    _check_network(cfg)
    _check_shape(cfg)
    _check_data_dir(_get(cfg, "data_dir"))
    if _get(cfg, "dataset.name") == "folder":
        from vae_cli.data import IMAGE_SUFFIXES

        path = _get(cfg, "dataset.path")
        if not path:
            raise UserError("dataset=folder needs dataset.path=DIR: a folder of images")
        root = Path(str(path)).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset.path={path!r} is not a folder: give a folder of images")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*")):
            raise UserError(f"dataset.path={path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    _check_trainer(cfg)
    resume = _get(cfg, "resume")
    if resume is not None:
        from vae_cli.runs import resume_source

        resume_source(str(resume))  # raises UserError when the run cannot be resumed


def _device_ok(v: Any) -> bool:
    if not isinstance(v, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?", v):
        return False
    if v.startswith("cuda"):
        import torch

        index = int(v.split(":")[1]) if ":" in v else 0
        return torch.cuda.is_available() and index < torch.cuda.device_count()
    return True


def _check_data_dir(value: Any) -> None:
    """data_dir must be a folder that exists or can be made (training makes it anyway)."""
    from vae_cli.data import data_root

    if not isinstance(value, str) or not value:
        raise UserError(f"data_dir={_show(value)} is not allowed: expected a folder")
    try:
        data_root(value).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data_dir={value!r} cannot be created ({e.strerror or type(e).__name__}): "
                        "give a folder you can write to") from None


def _check_trainer(cfg: DictConfig) -> None:
    """Build a throwaway Trainer from trainer.*: Lightning names a bad accelerator, strategy, precision..."""
    import logging

    import pytorch_lightning as pl

    from vae_cli.train import trainer_arguments

    kwargs = trainer_arguments(OmegaConf.to_container(_get(cfg, "trainer")))
    kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        pl.Trainer(**kwargs)
    except Exception as e:
        raise UserError(f"trainer settings: {first_line(e)}") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_from_run(cfg: DictConfig) -> None:
    """The settings every command that reads a trained model shares."""
    _need(cfg, "device", _device_ok, "cpu, auto, or cuda / cuda:N where such a GPU is visible")
    _need(cfg, "seed", _is_int, "an integer")
    _need(cfg, "run", _opt(lambda v: isinstance(v, str) and v != ""), "a run folder")
    _need(cfg, "ckpt", _opt(lambda v: isinstance(v, str) and v != ""), "a checkpoint file")
    _need(cfg, "out", _opt(lambda v: isinstance(v, str) and v != ""), "a file name")


def check_sample(cfg: DictConfig) -> None:
    check_from_run(cfg)
    _need(cfg, "n", positive_int, "a positive integer")
    _need(cfg, "nrow", positive_int, "a positive integer")
    _need(cfg, "temperature", lambda v: _num(v) and v > 0, "a positive number")
    _need(cfg, "mode", *_one_of("mean", "sample"))


def check_interpolate(cfg: DictConfig) -> None:
    check_from_run(cfg)
    _need(cfg, "pairs", positive_int, "a positive integer")
    _need(cfg, "steps", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    _need(cfg, "index", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _need(cfg, "method", *_one_of("linear", "slerp"))
    _need(cfg, "source", *_one_of("data", "prior"))
    _need(cfg, "split", *_one_of("test", "val", "train"))
    _need(cfg, "gif", lambda v: isinstance(v, bool), "true or false")
    _need(cfg, "mode", *_one_of("mean", "sample"))


def check_reconstruct(cfg: DictConfig) -> None:
    check_from_run(cfg)
    _need(cfg, "n", positive_int, "a positive integer")
    _need(cfg, "index", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _need(cfg, "split", *_one_of("test", "val", "train"))


def check_traverse(cfg: DictConfig) -> None:
    check_reconstruct(cfg)
    _need(cfg, "steps", lambda v: _is_int(v) and v >= 2, "an integer >= 2")
    _need(cfg, "range", lambda v: _num(v) and v > 0, "a positive number (the walk covers -range..range)")
    _need(cfg, "dims", _opt(positive_int), "a positive integer or null (all)")


def check_manifold(cfg: DictConfig) -> None:
    check_from_run(cfg)
    _need(cfg, "steps", lambda v: _is_int(v) and v >= 2, "an integer >= 2")


def check_evaluate(cfg: DictConfig) -> None:
    check_from_run(cfg)
    _need(cfg, "k", positive_int, "a positive integer")
    _need(cfg, "limit", _opt(positive_int), "a positive integer or null (all)")
    _need(cfg, "split", *_one_of("test", "val", "train"))
    _need(cfg, "batch_size", positive_int, "a positive integer")
    _need(cfg, "chunk", positive_int, "a positive integer")
    from vae_cli.evaluate import ESTIMATORS

    _need(cfg, "estimators", lambda v: v == "auto" or v in ESTIMATORS or (
        OmegaConf.is_list(v) and len(v) > 0 and all(e in ESTIMATORS for e in v)),
        "auto, or a list of " + ", ".join(ESTIMATORS) + ", e.g. '[iwae,ais]'")
    for key in ("refined.limit", "refined.steps", "refined.samples", "refined.search", "ais.limit", "ais.steps",
                "ais.leapfrog", "ais.chains", "exact.limit", "bdmc.n", "bdmc.steps", "bdmc.leapfrog", "bdmc.chains"):
        _need(cfg, key, positive_int, "a positive integer")
    _need(cfg, "refined.restarts", _opt(lambda v: _is_int(v) and v >= 0), "an integer >= 0, or null (auto)")
    for key in ("refined.lr", "exact.tol"):
        _need(cfg, key, lambda v: _num(v) and 0 < v < float("inf"), "a positive finite number")


CHECKS: dict[str, Callable[[DictConfig], None]] = {
    "train": check_train,
    "sample": check_sample,
    "interpolate": check_interpolate,
    "reconstruct": check_reconstruct,
    "traverse": check_traverse,
    "manifold": check_manifold,
    "evaluate": check_evaluate,
}
