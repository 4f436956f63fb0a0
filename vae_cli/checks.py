"""Check a command line before Hydra runs it: compose the config, then check it against its description.

The values are checked by vae_cli.settings against the command's settings class and the typed
classes the config builds; here is only what a command line adds: Hydra's composition errors as
one line (with the nearest key for an unknown one), sweeps, and what only this machine can say
(the output folder, data_dir, the devices, a throwaway Trainer). Each problem becomes a UserError
whose one line names the value and what is allowed; nothing has been written when it is raised.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vae_cli.errors import SettingsClash, UserError, first_line
from vae_cli.settings import (TARGETS, arguments, description, dotted_keys, known_argument, load, register_resolvers, suggest,
                              validate)

# command -> its settings class (the top level of conf/<command>.yaml)
SCHEMAS = {
    "train": "vae_cli.run_config.TrainSettings",
    "evaluate": "vae_cli.evaluate.EvaluateSettings",
    "sample": "vae_cli.pictures.SampleSettings",
    "interpolate": "vae_cli.pictures.InterpolateSettings",
    "reconstruct": "vae_cli.pictures.ReconstructSettings",
    "traverse": "vae_cli.pictures.TraverseSettings",
    "manifold": "vae_cli.pictures.ManifoldSettings",
}
# Anything of these in a folder marks a run (or a run killed before its first checkpoint).
RUN_MARKERS = (".hydra", "checkpoints", "tensorboard", "metrics.json", "train.log", "multirun.yaml")
# Output folders (and their parents) that did not exist when the command line was checked: a run refused
# before it trained may remove such a folder once empty (vae_cli.train.discard_untrained), never one
# the user had.
NEW_FOLDERS: set[Path] = set()

__all__ = ["check_command_line", "compose", "options", "register_resolvers", "run_marker"]


def override_key(override: str) -> str:
    """The key a command-line override sets: `+a.b=1`, `~a.b` and `a.b=1` all set a.b."""
    return override.split("=", 1)[0].lstrip("+~")


def options(conf_dir: str, group: str) -> list[str]:
    """The options of a config group: the yaml files in conf/<group>/."""
    return sorted(p.stem for p in Path(conf_dir, group).glob("*.yaml"))


def _variants(overrides: list[str], multirun: bool = True, conf_dir: str | None = None) -> list[list[str]]:
    """One override list per value of every sweep (``a=1,2``), the others at their first value."""
    choices = _choices(overrides, multirun, conf_dir)
    base = [c[0] for c in choices]
    out = [base]
    for i, c in enumerate(choices):
        out += [base[:i] + [v] + base[i + 1 :] for v in c[1:]]
    return out


def _choices(overrides: list[str], multirun: bool, conf_dir: str | None = None) -> list[list[str]]:
    """Each override as the list of key=value it sweeps over (one, where it is no sweep); a glob()
    over a config group's options (conf_dir/GROUP/*.yaml) as the options it matches."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

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
        if o.is_sweep_override() and o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            # Hydra expands it against its config loader, which only the running app has
            found = options(conf_dir, o.key_or_group) if conf_dir else []
            if not found:
                raise UserError(f"{o.input_line!r}: glob() sweeps over the options of a config group, and "
                                f"{o.key_or_group!r} is not one")
            values = o.value().filter(found)
            if not values:
                raise UserError(f"{o.input_line!r} matches none of {o.key_or_group}'s options: {', '.join(found)}")
            choices.append([f"{o.get_key_element()}={v}" for v in values])
        elif o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            choices.append([f"{o.get_key_element()}={v}" for v in values])
        else:
            choices.append([o.input_line])
    return choices


LAUNCHER_EXTRAS = {"joblib": "joblib", "submitit_local": "submitit", "submitit_slurm": "submitit"}  # pyproject extras
JOBS_CHECKED = 32  # a sweep's job folders are compared up to this many jobs (each composed: ~0.2 s)


def _check_job_folders(conf_dir: str, command: str, overrides: list[str]) -> None:
    """A hydra.sweep.subdir that names one folder for two jobs: the later would train over the
    earlier's run (its checkpoints, metrics and config) and the summary show one row."""
    subdir = next((o.split("=", 1)[1] for o in overrides if override_key(o) == "hydra.sweep.subdir"), None)
    if subdir is None or "hydra.job.num" in subdir or "override_dirname" in subdir:
        return  # a folder per job by construction
    jobs = list(itertools.islice(itertools.product(*_choices(overrides, True, conf_dir)), JOBS_CHECKED))
    seen: dict[str, list[str]] = {}
    for job in map(list, jobs):
        try:
            name = str(OmegaConf.select(compose(conf_dir, command, job, hydra=True), "hydra.sweep.subdir",
                                        throw_on_resolution_failure=True))
        except Exception:  # noqa: BLE001 - it names what only the job knows: Hydra's own checks apply
            return
        if name in seen:
            differ = " ".join(o for o in job if o not in seen[name]) or "the same values"
            raise UserError(f"hydra.sweep.subdir={subdir!r} names the folder {name!r} for two jobs (they differ in "
                            f"{differ}): the later would train over the earlier's run; make it differ per job, "
                            "e.g. with ${hydra.job.num}")
        seen[name] = job


def sweep_jobs(overrides: list[str], conf_dir: str) -> int:
    """The jobs of a sweep of Hydra's basic sweeper: one for each combination of the swept values."""
    return math.prod(len(c) for c in _choices(overrides, True, conf_dir))


def _check_job_outputs(overrides: list[str], conf_dir: str) -> None:
    """out=FILE in a sweep with more jobs than it names files: the second job found the file taken,
    after the first had done its work (an evaluation can take an hour)."""
    outs = next((c for c in _choices(overrides, True, conf_dir) if override_key(c[0]) == "out"), None)
    jobs = sweep_jobs(overrides, conf_dir)
    if outs is not None and jobs > len(set(outs)):
        files = len(set(outs))
        named = outs[0] if files == 1 else f"out with {files} values"
        raise UserError(f"{named} names {files} file{'s' * (files > 1)} for the {jobs} jobs of this sweep (one job "
                        "for each combination of the swept values), so a later job would find its file taken: "
                        "drop out= (each job then writes a new numbered file)")


def _explain(e: Exception, conf_dir: str, command: str, overrides: list[str]) -> str:
    """Hydra's multi-line composition errors, as one line."""
    text = str(e).strip() or first_line(e.__cause__ or e)
    m = re.search(r"Could not find '([\w/]+)/'", text)
    if m and not m.group(1).startswith("hydra/"):  # likelihood= with no value
        return f"{m.group(1)}= needs a value: choose one of {', '.join(options(conf_dir, m.group(1)))}"
    given = next((o for o in overrides if o.partition("=")[2] in ("null", "None") and
                  Path(conf_dir, override_key(o)).is_dir()), None)
    if given and "Config group override must be a string or a list" in text:  # scheduler=null
        group = override_key(given)
        return (f"{given}: a config group takes one of its options ({', '.join(options(conf_dir, group))}); "
                f"to leave it out write ~{group}")
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m:
        group, value = m.groups()
        if group == "hydra/launcher":
            extra = LAUNCHER_EXTRAS.get(value)
            if extra:
                return f"{group}={value} is not installed: pip install 'vae-cli[{extra}]' (see the README, Scaling out)"
            return (f"{group}={value!r} does not exist: choose one of basic, {', '.join(LAUNCHER_EXTRAS)} "
                    "(the last three with pip install 'vae-cli[joblib]' or 'vae-cli[submitit]')")
        if group.startswith("hydra/"):
            return f"{group}={value!r} does not exist here (Hydra's plugins add options to its groups)"
        allowed = options(conf_dir, group)
        return f"{group}={value!r} does not exist: choose one of {', '.join(allowed)}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        config = _config_without(conf_dir, command, overrides, key)
        if known_argument(config, key) and not _rule_refuses(config, key, overrides):
            return f"{key} is not in the config yet: add it with +{key}=VALUE"
        # the group's option given by hand (model=ladder): it has no such setting; say which it has.
        # Also where the class takes it but its rule keeps it for another option: dataset.path with
        # MNIST was told "add it with +", and then refused as a setting of dataset=folder.
        chosen = any(override_key(o) == key.partition(".")[0] for o in overrides)
        elsewhere = None if chosen else _option_with(conf_dir, command, overrides, key)
        if elsewhere:
            return f"{key} is a setting of {elsewhere}: choose it first ({elsewhere} {key}=VALUE)"
        if known_argument(config, key):
            return f"{key} is not in the config yet: add it with +{key}=VALUE"
        parent = key.rpartition(".")[0]
        accepted = [f"{parent}.{a}" if parent else a for a in arguments(config, parent)]
        return f"unknown setting {key!r}{suggest(key, list(dict.fromkeys(dotted_keys(config) + accepted)))}"
    m = re.search(r"Multiple values for (\S+)\. To override a value use 'override \S+: ([^']+)'", text)
    if m:  # +experiment=X where the defaults list has experiment already
        return f"+{m.group(1)}={m.group(2)}: {m.group(1)} is in the config already; drop the + ({m.group(1)}={m.group(2)})"
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return f"+{m.group(1)}: that setting exists already; drop the +"
    m = re.match(r"Error merging override (.+)", text)
    if m and e.__cause__ is not None:  # OmegaConf says why: "Value 'maybe' is not a valid bool (type str)"
        return f"{m.group(1)} is not allowed: {first_line(e.__cause__)}"
    return text.splitlines()[0]


def _rule_refuses(config: dict[str, Any], key: str, overrides: list[str]) -> bool:
    """Whether the class of key's node refuses key's value as a new run's setting (NewRunsOnly:
    dataset.path with MNIST, a setting of dataset=folder)."""
    import yaml

    from vae_cli.errors import NewRunsOnly

    parent, _, name = key.rpartition(".")
    node: Any = config
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    check = getattr(description(node["_target_"]), "check_settings", None) \
        if isinstance(node, dict) and node.get("_target_") in TARGETS else None
    raw = next((o.partition("=")[2] for o in overrides if override_key(o) == key), None)
    if check is None or raw is None:
        return False
    try:
        check({**{k: v for k, v in node.items() if not k.startswith("_")}, name: yaml.safe_load(raw)})
    except NewRunsOnly:
        return True
    except Exception:  # noqa: BLE001 - another rule, or a value not yet resolved: not this question
        return False
    return False


def _option_with(conf_dir: str, command: str, overrides: list[str], key: str) -> str | None:
    """The option of a config group that has ``key`` (likelihood.sigma: likelihood=gaussian), where the
    one chosen has not; None when no option has it."""
    group, _, rest = key.partition(".")
    if not rest:
        return None
    others = [o for o in overrides if override_key(o) not in (key, group)]
    for option in options(conf_dir, group):
        try:
            config = OmegaConf.to_container(_compose(conf_dir, command, [*others, f"{group}={option}"]), resolve=False)
        except Exception:  # noqa: BLE001 - that option does not compose with the rest: not the answer
            continue
        node: Any = config
        for part in key.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key.rpartition(".")[2] in node:  # there, also as null (dataset.path)
            return f"{group}={option}"
    return None


def _config_without(conf_dir: str, command: str, overrides: list[str], key: str) -> dict[str, Any]:
    """The config composed without the override of ``key`` (unresolved, for suggestions); Hydra's own
    node only for a key under it (hydra.foo=1: suggest among hydra.run.dir, hydra.job.chdir, ...)."""
    rest = [o for o in overrides if override_key(o) != key]
    hydra = key.partition(".")[0] == "hydra"
    while True:
        try:
            cfg = _compose(conf_dir, command, rest, hydra=hydra)
            break
        except Exception as e:
            # another key that is not in the config (optimizer=sgd optimizer.nesterov=true
            # optimizer.weight_decay=0.1): without it, the rest still chooses the options given
            # (else the defaults' settings were listed: Adam's for an SGD key)
            m = re.search(r"Could not override '([^']+)'", str(e)) or re.search(r"Key '([^']+)' is not in struct", str(e))
            other = [o for o in rest if m and override_key(o) == m.group(1)]
            if not rest:
                return {}
            rest = [o for o in rest if o not in other] if other else []
    with open_dict(cfg):
        if not hydra:
            cfg.pop("hydra", None)
    return OmegaConf.to_container(cfg, resolve=False)


def _compose(conf_dir: str, command: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name=command):
            return hydra_compose(config_name=command, overrides=overrides, return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def compose(conf_dir: str, command: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    """Compose conf/<command>.yaml with overrides, as Hydra will (the hydra node only when asked)."""
    try:
        return _compose(conf_dir, command, overrides, hydra)
    except UserError:
        raise
    except Exception as e:
        raise UserError(_explain(e, conf_dir, command, overrides)) from None


def _interpolation_error(e: Exception, overrides: list[str]) -> str:
    """A ${...} that does not resolve, in one line that names the setting: the command line's own
    where one holds a ${...}, else the config's key whose value failed (OmegaConf's full_key)."""
    given = next((o for o in overrides if "${" in o), None) or getattr(e, "full_key", None)
    return f"{given}: {first_line(e)}" if given else first_line(e)


def resolved(cfg: DictConfig, overrides: list[str] = ()) -> dict[str, Any]:
    """The config as plain values, interpolations resolved (the hydra node left out); ``overrides``:
    the command line's, to name the one whose ${...} fails."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        _class_rules_unresolved(OmegaConf.to_container(cfg, resolve=False))
        raise UserError(_interpolation_error(e, overrides)) from None


def _class_rules_unresolved(raw: dict[str, Any]) -> None:
    """A class's own rule can explain a config that does not resolve: posterior=iaf under model=ladder
    refers to a key of the model that a ladder does not have. Run the rules (``check_settings``) of
    the top-level nodes on their values, each plain reference ${a.b} replaced by what it names; raise
    UserError with a rule's line if one fails. A rule that trips on a value still unresolved says
    nothing here (the resolution error then stands)."""
    def lookup(value: Any) -> Any:
        if not (isinstance(value, str) and re.fullmatch(r"\$\{[\w.]+\}", value)):
            return value
        node: Any = raw
        for part in value[2:-1].split("."):
            if not isinstance(node, dict) or part not in node:
                return value
            node = node[part]
        return node

    for key, node in raw.items():
        if not isinstance(node, dict) or node.get("_target_") not in TARGETS:
            continue
        check = getattr(description(node["_target_"]), "check_settings", None)
        args = {k: lookup(v) for k, v in node.items() if not k.startswith("_")}
        if any(isinstance(v, str) and "${" in v for v in args.values()):
            continue  # a reference this cannot follow: the rule would judge the text, not the value
        try:
            if check is not None:
                check(args)
        except SettingsClash as e:
            raise UserError(str(e)) from None
        except ValueError as e:
            if "${" not in str(e):
                raise UserError(f"{key}.{e}") from None
        except Exception:  # noqa: BLE001 - the rule could not read an unresolved value
            pass


def check_command_line(conf_dir: str, command: str, overrides: list[str], multirun: bool = False,
                       values_only: bool = False) -> list[tuple[str, Path]]:
    """Compose every variant of the command line and check its values; raise UserError on the first
    problem. Returns the new run (or sweep) folders that vae train will write, each with its key=value.
    ``values_only`` (for --help and --info, which run nothing): not what this machine has, nor the folders."""
    keys = [override_key(o) for o in overrides]
    if command == "train" and "resume" in keys:
        # A later value overrides an earlier one in Hydra (what scripts that append overrides rely on),
        # but two runs to continue is a slip: resume=A resume=B continued B alone, silently.
        given = [o for o, k in zip(overrides, keys) if k == "resume"]
        if len(given) > 1:
            raise UserError(f"resume is given {len(given)} times ({', '.join(map(repr, given))}): continue one run "
                            "(or several, one after the other, with -m resume=A,B)")
        def folder(override: str) -> Path:
            return Path(override.split("=", 1)[1].strip("'\"")).expanduser().resolve()

        run_dir = next((o for o, k in zip(overrides, keys) if k == "hydra.run.dir"), None)
        if run_dir is not None and len(given) == 1 and folder(run_dir) != folder(given[0]):
            # the run's folder is DIR itself: its train.log, checkpoints and events (Lightning's DDP
            # restarts each rank with hydra.run.dir="DIR", which is allowed)
            raise UserError(f"resume=DIR trains in DIR itself: drop {run_dir!r}")
        # verbose is how the terminal looks, not how the run trains: it may change on resume
        others = [o for o, k in zip(overrides, keys) if k not in ("resume", "verbose") and not k.startswith("hydra")]
        if others:
            longer = override_key(others[0]).lstrip("+") in ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time")
            raise UserError(f"resume=DIR continues a run with its own saved config: drop {others[0]!r}" +
                            (" (a run ends where its config says; to train longer, start a new run)" if longer else ""))
    _check_removals(conf_dir, command, overrides)
    _check_sweep_settings(overrides, multirun)
    if multirun and command == "train":
        _check_job_folders(conf_dir, command, overrides)
    if multirun:
        _check_job_outputs(overrides, conf_dir)
    schema = load(SCHEMAS[command])
    folders: list[tuple[str, Path]] = []
    unused: list[str | None] = []
    sweeps: set[tuple[str, Path]] = set()  # the sweep folder of a command other than train (-m)
    for variant in _variants(overrides, multirun, conf_dir):
        cfg = compose(conf_dir, command, variant, hydra=command == "train")
        config = resolved(cfg, variant)
        env = os.environ.get("VAE_DATA_DIR")
        if env is not None and "data_dir" in config and not any(override_key(o) == "data_dir" for o in variant):
            # data_dir from $VAE_DATA_DIR: named as such (train's line said data_dir='' for an empty
            # one, and evaluate read '' as the current folder and fetched MNIST into it)
            if not env.strip() or not values_only:
                _check_data_dir(env, "VAE_DATA_DIR")
        try:
            validate(config, schema)
        except UserError as e:
            key = str(e).split("=", 1)[0]
            if any(override_key(o) == key and "oc.env:" in o and "oc.decode" not in o for o in variant):
                raise UserError(f"{e} (${{oc.env:NAME}} is text; for a number write "
                                f"{key}=\"${{oc.decode:${{oc.env:NAME}}}}\", quoted)") from None
            raise
        unused.append(_unused(command, config, variant))
        if not multirun and unused[-1]:
            raise UserError(unused[-1])
        if values_only:
            continue
        if command != "train" and config.get("data_dir") is not None:  # where the commands that read a model cache data
            _check_data_dir(str(config["data_dir"]))
        if command == "train":
            from vae_cli.runs import first_process

            check_train_here(config)
            # Lightning's DDP launcher re-runs this command line per rank, into rank 0's folder
            if config.get("resume") is None and first_process():
                folders.append(check_output_folder(cfg, multirun))
        elif multirun and not sweeps:  # Hydra makes the sweep's folder (multirun/DATE/TIME) for the other commands too
            value = OmegaConf.select(compose(conf_dir, command, variant, hydra=True), "hydra.sweep.dir",
                                     throw_on_resolution_failure=False)
            if value:
                sweeps.add((f"hydra.sweep.dir={str(Path(str(value)).absolute())!r}", Path(str(value)).absolute()))
    for shown, folder in sweeps:  # a folder the user may not write: Hydra's PermissionError was a traceback
        _try_to_create(shown, folder)
    if unused and all(unused):  # a sweep: refused where no job uses it (likelihood=bernoulli,gaussian may binarize)
        raise UserError(unused[0])
    for shown, folder in dict.fromkeys(folders):  # every value passed: can the folder Hydra writes be made?
        _try_to_create(shown, folder)
    return list(dict.fromkeys(folders))


def _gaussian(config: dict[str, Any]) -> bool:
    from vae_cli.data import likelihood_name  # here: torch is loaded by the checks already, not by `vae --help`

    return likelihood_name(config) == "gaussian"


# Settings that one value of another makes meaningless: (command, that value as shown, a test of the
# config for it, the settings unused then with the values that still say what happens, why). Given
# on the command line with that value, they would be accepted and ignored.
UNUSED_WITH = [
    ("interpolate", "source=prior", lambda c: c.get("source") == "prior",
     {"split": (), "data_dir": (), "index": ()}, "the ends are draws of p(z), no image is read"),
    ("train", "likelihood=gaussian", _gaussian, {"dataset.binarize": ("none",)},
     "a Gaussian likelihood dequantizes the 8-bit pixels, it binarizes none"),
    ("train", "likelihood.scale=fixed", lambda c: _gaussian(c) and c["likelihood"].get("scale") == "fixed",
     {"likelihood.min_sigma": ()}, "min_sigma floors a learned sigma; a fixed one stays at likelihood.sigma"),
]


REMOVABLE = {"objective", "scheduler"}  # read with a fallback: the ELBO, a constant learning rate


def _check_removals(conf_dir: str, command: str, overrides: list[str]) -> None:
    """~KEY takes a setting out of the config: fine for a class's argument (the class's default then
    applies), not for a setting vae-cli reads itself (~beta, ~eval.k failed once the run had started)."""
    for o in overrides:
        if not o.startswith("~"):
            continue
        key = override_key(o)
        parent = key.rpartition(".")[0]
        config = OmegaConf.create(_config_without(conf_dir, command, overrides, key))
        # unresolved: another ~KEY may have removed what this one is interpolated from
        node = OmegaConf.select(config, parent, throw_on_resolution_failure=False) if parent else config
        absent = object()
        if OmegaConf.select(config, key, default=absent, throw_on_resolution_failure=False) is absent:
            continue  # nothing there to remove: Hydra's own message
        if not (isinstance(node, DictConfig) and "_target_" in node) and key not in REMOVABLE:
            raise UserError(f"{o}: vae {command} reads {key} itself, so it cannot be removed; set it instead "
                            f"({key}=VALUE)")
        users = referrers(OmegaConf.to_container(config, resolve=False), key)
        if users:  # else Hydra's "Interpolation key 'KEY' not found", naming a setting the user did not touch
            name, value = users[0]
            raise UserError(f"{o}: {name} is set from it ({name}: {value}), so it cannot be removed; set it "
                            f"instead ({key}=VALUE)")


def referrers(config: Any, key: str, at: str = "") -> list[tuple[str, str]]:
    """(name, value) of each setting of config (a plain container) whose value interpolates key or a
    setting under it (${key}, ${key.name}), but for those under key itself, which go with it."""
    if isinstance(config, dict | list):
        items = config.items() if isinstance(config, dict) else enumerate(config)
        found = [referrers(v, key, f"{at}.{k}" if at else str(k)) for k, v in items]
        return [name for names in found for name in names]
    under = at == key or at.startswith(key + ".")
    refers = isinstance(config, str) and re.search(r"\$\{\s*" + re.escape(key) + r"\s*[}.]", config)
    return [(at, config)] if refers and not under else []


def _unused(command: str, config: dict[str, Any], overrides: list[str]) -> str | None:
    """Why a setting given on the command line is one the value of another leaves unused, or None."""
    for cmd, value, holds, unused, why in UNUSED_WITH:
        if cmd != command or not holds(config):
            continue
        for o in overrides:
            key = override_key(o)
            if key in unused and o.split("=", 1)[-1] not in unused[key]:
                return f"{o} is not used with {value} ({why}): drop it"
    return None


def _check_sweep_settings(overrides: list[str], multirun: bool) -> None:
    """Hydra's launcher and sweeper settings that Hydra itself would only refuse with a traceback."""
    import shutil

    for o in overrides:
        if o.startswith("~"):  # a deletion: Hydra's default stands
            continue
        key, _, value = o.lstrip("+").partition("=")
        value = value.strip("'\"")
        if not multirun and key == "hydra/launcher" and value in LAUNCHER_EXTRAS:  # ignored: one local run
            raise UserError(f"{o} runs the jobs of a sweep: add -m (vae COMMAND -m ...), or drop it")
        if multirun and key == "hydra/launcher" and value == "submitit_slurm" and shutil.which("srun") is None:
            raise UserError(f"{o} needs Slurm, and this machine has no `srun`: run the sweep where Slurm is, or use "
                            "hydra/launcher=submitit_local or joblib")
        if key == "hydra.sweeper.max_batch_size" and value not in ("null", "None"):
            try:
                good = int(value) >= 1
            except ValueError:
                good = False
            if not good:
                raise UserError(f"{o} is not allowed: expected a positive integer (jobs launched at a time) or null")


# --------------------------------------------------------------------------- what only this machine knows


def check_train_here(config: dict[str, Any]) -> None:
    """`vae train`'s folders, data and devices, after its values passed the description."""
    from vae_cli.run_config import check_trainer_here

    _check_data_dir(config["data_dir"])
    dataset = config["dataset"]
    if dataset["name"] == "folder":
        from vae_cli.data import IMAGE_SUFFIXES
        from vae_cli.sources import image_files

        path = dataset["path"]
        root = Path(str(path)).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset.path={path!r} is not a folder: give a folder of images")
        try:
            found = image_files(root)  # as the run reads it: linked folders too
        except OSError:
            found = [root]  # unreadable: the run says so itself, naming the file
        if not found:
            raise UserError(f"dataset.path={path!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    check_trainer_here(config["trainer"])
    _check_trainer(config["trainer"])
    _check_run_plan(config)
    if config.get("resume") is not None:
        from vae_cli.runs import resume_source

        resume_source(str(config["resume"]))  # raises UserError when the run cannot be resumed


def _check_run_plan(config: dict[str, Any]) -> None:
    """Settings that are each allowed but not together; refused before Hydra makes the run's folder."""
    import torch

    from vae_cli.dataset_settings import TEST_SIZES
    from vae_cli.run_config import MANY_CLOCKS, NO_END, endless, several_processes

    trainer = config["trainer"]
    start = (config.get("objective") or {}).get("start", 0) or 0
    what = "scheduler" if config.get("scheduler") else f"objective.start={start}" if start > 0 else None
    if what and endless(trainer):  # VAEModule.follows_progress, read from the config
        raise UserError(NO_END.format(what=what))
    if what and trainer.get("max_time") is not None and several_processes(trainer):
        raise UserError(MANY_CLOCKS.format(what=what))  # inside fit, each DDP process said it, after the sanity check
    evaluation = config["eval"]
    if evaluation["k"]:  # the test evaluation at the end: refused now, not after the training
        from vae_cli.evaluate import check_memory

        # its batches hold no more than eval.limit examples, nor more than the test split has
        batch = min(evaluation["batch_size"], evaluation["limit"] or TEST_SIZES.get(config["dataset"]["name"], math.inf))
        check_memory(evaluation["k"], batch, torch.device("cpu"), ("eval.k", "eval.batch_size"))
    optimizer = config["optimizer"]
    precision, clip = str(trainer.get("precision")), trainer.get("gradient_clip_val")
    if clip and precision in ("16-mixed", "bf16-mixed", "16", "bf16") and optimizer.get("fused"):
        # Lightning's mixed precision refuses, inside fit, to clip a fused optimizer's gradients (it
        # expects such an optimizer to unscale them itself): a traceback after the run folder is made
        raise UserError(f"trainer.gradient_clip_val={clip} with trainer.precision={precision} is not allowed with "
                        "optimizer.fused=true (Lightning cannot clip a fused optimizer's gradients under mixed "
                        "precision): add optimizer.fused=false, or drop one of the two")
    objective = config.get("objective") or {}
    if isinstance(objective.get("k"), int):  # IWAE decodes k draws of each image of a batch at once
        from vae_cli.evaluate import check_decodes

        size = TEST_SIZES.get(config["dataset"]["name"], math.inf)  # a validation batch holds no more than its split
        batch = max(config["dataset"]["batch_size"], min(config["dataset"]["eval_batch_size"], size))
        check_decodes(objective["k"] * batch, f"objective.k={objective['k']} with batches of {batch} examples",
                      "objective.k, dataset.batch_size or dataset.eval_batch_size", math.prod(config["dataset"]["shape"]),
                      torch.device("cpu"))
    if objective.get("_target_"):  # the objective's own refusals (IWAE has no KL term for free bits)
        from hydra.utils import instantiate

        try:
            instantiate(objective).check(config.get("beta", 1.0), config.get("kl_warmup_steps", 0),
                                         config.get("free_bits", 0.0))
        except ValueError as e:
            raise UserError(str(e)) from None
    likelihood = config["likelihood"]
    if precision == "16-true" and _gaussian(config) and likelihood.get("scale", "shared") != "fixed":
        # the learned sigma's gradient sums a term for every pixel of the batch (128 x 784), past
        # float16's 65504: inf, then NaN at the first step, at any learning rate
        raise UserError(f"trainer.precision=16-true is not allowed with likelihood=gaussian and a learned sigma "
                        f"(likelihood.scale={likelihood.get('scale', 'shared')}): its gradient sums every pixel of the "
                        "batch and overflows float16; use trainer.precision=bf16-true or 16-mixed, or "
                        "likelihood.scale=fixed")
    if precision == "16-true" and "eps" in _arguments(optimizer["_target_"]):
        eps = optimizer.get("eps", _arguments(optimizer["_target_"])["eps"].default)
        tiny = torch.finfo(torch.float16).tiny
        if eps < tiny:  # Adam's state is float16 there: eps rounds to 0, and sqrt(v) + eps is 0 where g^2 underflows
            raise UserError(f"trainer.precision={trainer['precision']} is not allowed with optimizer.eps={eps:g}: "
                            "every weight and the optimizer's state are float16 there, which holds no eps below "
                            f"{tiny:.2g} in full (1e-08 rounds to 0), so the first steps divide by zero or overflow; "
                            "use trainer.precision=16-mixed or bf16-true, or add +optimizer.eps=1e-4")


def _arguments(target: str) -> dict[str, Any]:
    """The parameters of the function or class a config's _target_ names ({} where it cannot be read)."""
    import inspect

    from hydra.utils import get_object

    try:
        return dict(inspect.signature(get_object(target)).parameters)
    except Exception:  # not importable here: the description checked it already
        return {}


def _check_data_dir(value: str, name: str = "data_dir") -> None:
    """data_dir (or the VAE_DATA_DIR it defaults to: ``name``) must be a folder that exists or can be
    made (training makes it anyway)."""
    from vae_cli.data import data_root

    if not value.strip():  # an empty VAE_DATA_DIR: evaluate fetched MNIST into the current folder
        raise UserError(f"{name}={value!r} is empty: give a folder" +
                        (", or unset it for ~/.cache/vae-cli" if name == "VAE_DATA_DIR" else ""))
    root = data_root(value)
    if root.exists() and not root.is_dir():
        raise UserError(f"{name}={value!r} is a file: give a folder (it is made if missing)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{name}={value!r} cannot be created ({e.strerror or type(e).__name__}): "
                        "give a folder you can write to") from None


def _check_trainer(trainer_cfg: dict[str, Any]) -> None:
    """Build a throwaway Trainer from trainer.*: Lightning knows what else is wrong (a strategy name...)."""
    import logging

    import pytorch_lightning as pl

    from vae_cli.run_config import trainer_arguments

    kwargs = trainer_arguments(trainer_cfg)
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


def _try_to_create(shown: str, folder: Path) -> None:
    """Make the missing folders of ``folder`` and remove them again: a UserError if that fails."""
    missing = []
    parent = folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    made = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
    except OSError as e:
        raise UserError(f"{shown} cannot be created ({e.strerror or type(e).__name__}): give a folder you "
                        "can write to") from None
    finally:
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass


def run_marker(folder: Path) -> str | None:
    """What marks ``folder`` as a run (.hydra, checkpoints, event files, ...), or None."""
    if not folder.is_dir():
        return None
    for name in RUN_MARKERS:
        if (folder / name).exists():
            return name
    event = next(folder.glob("events.out.tfevents.*"), None)
    return event.name if event is not None else None


def check_output_folder(cfg: DictConfig, multirun: bool) -> tuple[str, Path]:
    """The resolved run (or sweep) folder: not a file, not a run already; returns (its key=value, it)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except Exception as e:
        raise UserError(f"{key}: {first_line(e)}") from None
    if not value or not str(value).strip():
        raise UserError(f"{key} is empty: give a new folder")
    if str(value).startswith("~"):  # Hydra expands no ~: it would make a folder named ~ here (rm -rf ~ ...)
        raise UserError(f"{key}={str(value)!r}: Hydra does not expand ~ (it would make a folder named '~' in "
                        f"this one); write the path out, e.g. {key}=$HOME{str(value)[1:]}")
    folder = Path(str(value)).absolute()  # as Hydra makes it: no ~ or $VAR expanded (~/x is ./~/x)
    NEW_FOLDERS.update(d.resolve() for d in (folder, *folder.parents) if not d.exists())  # outputs/DATE/TIME, ...
    shown = f"{key}={str(folder)!r}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{shown} is a file: give a new folder")
    taken = run_marker(folder)
    if taken is None and multirun and folder.is_dir():
        taken = next((f"{p.name}/{m}" for p in folder.iterdir() if (m := run_marker(p))), None)
    if taken is not None:
        raise UserError(f"{shown} holds a run already ({taken}): choose a new folder"
                        + ("" if multirun else f" (or continue it with resume={shlex.quote(str(folder))})"))
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{shown} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{shown} cannot be created: {str(parent)!r} is not writable")
    return shown, folder
