"""One generic validator for every setting, derived from the typed code that uses it.

A config is a tree of plain values (``OmegaConf.to_container(cfg, resolve=True)``). Its top level
is described by the command's settings class (a pydantic ``BaseModel`` next to the command's code:
``TrainSettings`` in train.py, ``SampleSettings`` in pictures.py, ...). A node with ``_target_``
is described by what it builds:

* the target must be in ``TARGETS`` (vae-cli's own classes and functions; torch.optim classes for
  checkpoints of 0.1.0, checked against vae_cli.optim's typed factories);
* its keys are the keyword arguments of the target's typed signature (``inspect.signature`` and
  ``typing.Annotated`` constraints, turned into a pydantic model: unknown keys refused, strict
  types, finite numbers), or of a pydantic model standing for it (``TARGETS`` maps the target to
  its description);
* an argument annotated with a class pydantic cannot check (``encoder: nn.Module``) is a nested
  node, validated the same way, whose target must build that class;
* an argument annotated ``X | None = None`` with such a class is an optional node (absent: None);
* ``_partial_: true`` nodes may leave required arguments out (given later, e.g. params);
* cross-field rules live on the class too: an optional ``check_settings(cls, args: dict)``
  classmethod (or staticmethod) is called with the validated arguments and raises ValueError with
  a message that starts with the argument's name (``"shape=[1,32,32] is not allowed: ..."``);
  a description model with ``extra="allow"`` lists the extra keys it accepts in
  ``extra_keys(cls) -> set[str]`` (the Trainer's other arguments).

Every problem is one ``UserError`` line: ``KEY=VALUE is not allowed: expected ...``,
``unknown setting 'KEY': did you mean OTHER.KEY?``, ``KEY is missing: expected ...``.

Adding a setting: add a typed argument to the class (or a field to the command's settings class)
and the key to its yaml; nothing else.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import types
import typing
from functools import lru_cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from vae_cli.errors import NewRunsOnly, SettingsClash, UserError
from vae_cli.typed import STRICT, Builds

# target -> the dotted name of its description (None: the target's own signature). Only these may
# be named by a config: instantiate on an untrusted config could otherwise call any function.
TARGETS: dict[str, str | None] = {
    "vae_cli.model.VAE": None,
    "vae_cli.ladder.LadderVAE": None,
    "vae_cli.networks.MLPEncoder": None,
    "vae_cli.networks.MLPDecoder": None,
    "vae_cli.networks.ConvEncoder": None,
    "vae_cli.networks.ConvDecoder": None,
    "vae_cli.networks.ResNetEncoder": None,
    "vae_cli.networks.ResNetDecoder": None,
    "vae_cli.likelihoods.Bernoulli": None,
    "vae_cli.likelihoods.Gaussian": None,
    "vae_cli.priors.StandardNormal": None,
    "vae_cli.priors.VampPrior": None,
    "vae_cli.posteriors.GaussianPosterior": None,
    "vae_cli.posteriors.IAFPosterior": None,
    # described without Lightning, so commands that only read a checkpoint start fast
    "vae_cli.datamodule.ImageData": "vae_cli.dataset_settings.DatasetSettings",
    "vae_cli.objectives.ELBO": None,
    "vae_cli.objectives.IWAE": None,
    "vae_cli.optim.adam": None,
    "vae_cli.optim.adamw": None,
    "vae_cli.optim.sgd": None,
    "vae_cli.optim.cosine": None,
    # checkpoints of 0.1.0 name torch's classes: the same arguments as the factories
    "torch.optim.Adam": "vae_cli.optim.adam",
    "torch.optim.AdamW": "vae_cli.optim.adamw",
    "torch.optim.SGD": "vae_cli.optim.sgd",
    # read as keyword arguments by `vae train`, never instantiated through Hydra
    "pytorch_lightning.Trainer": "vae_cli.run_config.TrainerSettings",
}
HYDRA_KEYS = ("_target_", "_partial_")
MAX_DEPTH = 32


def register_resolvers() -> None:
    """Resolvers the configs use: where a run goes (a resumed run stays in its own folder)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("vae_run_dir"):
        OmegaConf.register_new_resolver("vae_run_dir", lambda resume, new: new if resume is None else str(resume))
        OmegaConf.register_new_resolver("vae_output_subdir", lambda resume: ".hydra" if resume is None else None)
    if not OmegaConf.has_resolver("vae_sweep_subdir"):  # a sweep's job: its number, or the resumed run's folder
        OmegaConf.register_new_resolver("vae_sweep_subdir", lambda resume, num: str(num) if resume is None else
                                        os.path.abspath(os.path.expanduser(str(resume))))


# --------------------------------------------------------------------------- descriptions


def load(dotted: str) -> Any:
    """The object named ``module.attr`` (only ever called with names from TARGETS or the code)."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _fields_of(fn: Any) -> tuple[dict[str, tuple[Any, Any]], bool, list[str]]:
    """(name -> (annotation, default), takes **kwargs, positional names) of a typed callable."""
    init = fn.__init__ if inspect.isclass(fn) else fn
    hints = typing.get_type_hints(init, include_extras=True)
    fields, var_kw, positional = {}, False, []
    for p in list(inspect.signature(init).parameters.values())[(1 if inspect.isclass(fn) else 0):]:
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            ann = hints.get(p.name, Any)
            if not _checkable(ann):  # a node; ``X | None = None``: an optional node building X
                ann = Annotated[dict, Builds(_without_none(ann))]
            fields[p.name] = (ann, ... if p.default is p.empty else p.default)
            if p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty):
                positional.append(p.name)
    return fields, var_kw, positional


def _without_none(ann: Any) -> Any:
    """X for an annotation X | None (an optional node), else the annotation itself."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _checkable(ann: Any) -> bool:
    """Whether pydantic can check a value of this annotation (a class like nn.Module: no, it is a node)."""
    from pydantic import TypeAdapter

    try:
        TypeAdapter(ann)
        return True
    except Exception:
        return False


@lru_cache(maxsize=None)
def description(target: str, partial: bool = False) -> type[BaseModel]:
    """The pydantic model that describes the keyword arguments of an allowed target."""
    spec = load(TARGETS[target] or target)
    if inspect.isclass(spec) and issubclass(spec, BaseModel):
        return spec
    fields, var_kw, positional = _fields_of(spec)
    if partial:  # the positional arguments come later (the optimizer's params)
        fields = {k: (a, None if d is ... and k in positional else d) for k, (a, d) in fields.items()}
    config = ConfigDict(**{**STRICT, "extra": "allow" if var_kw else "forbid"})
    model = create_model(f"{spec.__name__}Settings", __config__=config, **fields)
    model.check_settings = getattr(spec, "check_settings", None)  # type: ignore[attr-defined]
    return model


def built_type(target: str) -> Any:
    """What a target builds: the class, or a function's return annotation."""
    obj = load(target)
    if inspect.isclass(obj):
        return obj
    return typing.get_type_hints(obj).get("return", object)


def _builds(target: str, expected: str | type) -> bool:
    if isinstance(expected, str) and expected == target:
        return True
    try:
        want = load(expected) if isinstance(expected, str) else expected
        got = built_type(target)
        return inspect.isclass(got) and issubclass(got, want)
    except Exception:
        return False


def _name(t: str | type) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


# --------------------------------------------------------------------------- plain words


def show(value: Any) -> str:
    """A value as the user would type it."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict) and "_target_" in value:
        return f"<{value['_target_']}>"
    if isinstance(value, bool) or value is None:  # YAML's spelling, not Python's
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


_SINGULAR_TO_PLURAL = {"an integer": "integers", "a finite number": "finite numbers", "text": "texts",
                       "true or false": "true or false values"}


def describe(ann: Any, plural: bool = False) -> str:
    """An annotation in plain words: Annotated[int, Field(gt=0)] -> 'an integer > 0'."""
    origin = get_origin(ann)
    if origin is Annotated:
        base, *meta = get_args(ann)
        bounds, lengths = [], []
        for m in meta:
            if isinstance(m, Builds):
                return f"a config node with _target_ building {_name(m.type_name)}"
            if isinstance(m, FieldInfo):
                if m.description:
                    return m.description
                meta_items = m.metadata
            else:
                meta_items = [m]
            for c in meta_items:
                for attr, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                    if getattr(c, attr, None) is not None:
                        bounds.append((word, getattr(c, attr)))
                for attr in ("min_length", "max_length"):
                    if getattr(c, attr, None) is not None:
                        lengths.append((attr, getattr(c, attr)))
        text = describe(base, plural)
        if base is str and dict(lengths).get("min_length") == 1 and len(lengths) == 1:
            return "non-empty text"
        if len(bounds) == 2 and bounds[0][0] == ">=" and bounds[1][0] == "<=":
            text += f" from {bounds[0][1]} to {bounds[1][1]}"
        else:
            text += "".join(f" {w} {v}" if i == 0 else f" and {w} {v}" for i, (w, v) in enumerate(bounds))
        lo = dict(lengths).get("min_length")
        hi = dict(lengths).get("max_length")
        if lo is not None and lo == hi:
            text = text.replace("a list of", f"a list of {lo}", 1)
        elif lo and hi is not None:
            text += f" ({lo} to {hi} of them)"
        elif lo:
            text += f" (at least {lo})"
        elif hi is not None:
            text += f" (at most {hi})"
        return text
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        text = " or ".join(describe(a, plural) for a in args)
        return text + (" or null" if len(args) < len(get_args(ann)) else "")
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(str(a) for a in get_args(ann)))
    if origin in (list, tuple):
        item = get_args(ann)[0] if get_args(ann) else Any
        return f"a list of {describe(item, plural=True)}"
    if isinstance(ann, type) and issubclass(ann, BaseModel):  # a group of settings: its keys, not the class
        return f"a mapping of {', '.join(ann.model_fields)}"
    words = {int: "an integer", float: "a finite number", bool: "true or false", str: "text", dict: "a mapping"}
    text = words.get(ann, getattr(ann, "__name__", str(ann)))
    return _SINGULAR_TO_PLURAL.get(text, text) if plural else text


def suggest(key: str, candidates: list[str]) -> str:
    """': did you mean X?' for the nearest candidate: first a key whose last part is the key's
    (max_epochs -> trainer.max_epochs), then a sibling spelled alike, then any key spelled alike."""
    candidates = [c for c in candidates if c != key and not key.startswith(c + ".")]
    parent, _, last = key.rpartition(".")
    same_last = [c for c in candidates if c.rsplit(".", 1)[-1] == last]
    if same_last:
        return f": did you mean {min(same_last, key=len)}?"
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    near = difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.6)
    if near:
        return f": did you mean {siblings[near[0]]}?"
    lasts = {c.rsplit(".", 1)[-1]: c for c in sorted(candidates, key=len, reverse=True)}
    near = difflib.get_close_matches(last, list(lasts), n=1, cutoff=0.75)
    return f": did you mean {lasts[near[0]]}?" if near else settings_here(key, candidates)


def settings_here(key: str, candidates: list[str], most: int = 24) -> str:
    """'; the settings under P are a, b, ...' for the nearest parent of ``key`` that has settings
    (the top level at the last), so that a key with no look-alike still shows what is allowed."""
    parent = key
    while parent:
        parent = parent.rpartition(".")[0]
        names = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == parent]
        if names:
            shown = ", ".join(names[:most]) + (", ..." if len(names) > most else "")
            return f"; the settings {f'under {parent}' if parent else 'at the top level'} are {shown}"
    return ""


def known_argument(config: Any, key: str) -> bool:
    """Whether ``key`` (dotted) is an argument the description of its parent node accepts."""
    parent, _, name = key.rpartition(".")
    return name in arguments(config, parent)


def arguments(config: Any, parent: str) -> list[str]:
    """The arguments that the class built by the node at ``parent`` (dotted) accepts, whether the
    config sets them or not; [] where the node builds none of vae-cli's known classes."""
    node = config
    for p in parent.split(".") if parent else []:
        node = node.get(p) if isinstance(node, dict) else None
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str) or target not in TARGETS:
        return []
    try:
        partial = bool(node.get("_partial_"))
        model = description(target, partial)
        extra = list(model.extra_keys()) if hasattr(model, "extra_keys") else []
        later = given_later(target, partial)
        return [n for n in [*model.model_fields, *extra] if n not in later]
    except Exception:
        return []


def given_later(target: str, partial: bool = True) -> set[str]:
    """The arguments vae-cli passes itself, so they are not settings: those a description names in its
    GIVEN_BY_VAE (the dataset's likelihood, from likelihood=...), and for a partial the required
    positional arguments of its target (an optimizer's params, a scheduler's optimizer)."""
    spec = load(TARGETS[target] or target)
    own = set(getattr(spec, "GIVEN_BY_VAE", ()))
    if not partial or (inspect.isclass(spec) and issubclass(spec, BaseModel)):
        return own
    fields, _, positional = _fields_of(spec)
    return own | {k for k, (_, d) in fields.items() if d is ... and k in positional}


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a plain config (Hydra's own keys left out)."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str) and k not in HYDRA_KEYS:
                key = f"{prefix}{k}"
                out.append(key)
                out += dotted_keys(v, key + ".")
    return out


# --------------------------------------------------------------------------- the validator


def _field_annotation(model: type[BaseModel], name: str) -> Any:
    f = model.model_fields[name]
    return f.rebuild_annotation() if hasattr(f, "rebuild_annotation") else f.annotation


def _is_model(ann: Any) -> bool:
    return inspect.isclass(ann) and issubclass(ann, BaseModel)


def _builds_marker(ann: Any) -> Builds | None:
    if get_origin(ann) is Annotated:
        return next((m for m in get_args(ann)[1:] if isinstance(m, Builds)), None)
    return None


class Validator:
    """Validates one config; ``keys`` (every dotted key of the whole config) feeds the suggestions."""

    def __init__(self, keys: list[str] | None = None, source: str | None = None) -> None:
        self.keys = keys or []
        self.source = source

    def fail(self, message: str) -> "typing.NoReturn":
        raise UserError(f"{self.source}: {message}" if self.source else message)

    def model(self, schema: type[BaseModel], data: Any, path: str = "") -> None:
        """Validate data against a settings model, then its nested nodes and models."""
        if not isinstance(data, dict):
            self.fail(f"{path or 'the config'}={show(data)} is not allowed: expected a mapping of settings")
        try:
            schema.model_validate(data)
        except ValidationError as e:
            self.fail(self.explain(schema, data, e.errors()[0], path))
        extra_ok = schema.model_config.get("extra") == "allow"
        if extra_ok and hasattr(schema, "extra_keys"):
            extras = [k for k in data if k not in schema.model_fields and k not in HYDRA_KEYS]
            if extras:
                allowed = set(schema.extra_keys())
                for k in extras:
                    if k not in allowed:
                        self.unknown(f"{path}{k}", [f"{path}{n}" for n in sorted(allowed | set(schema.model_fields))])
        for name in schema.model_fields:
            if name not in data:
                continue
            ann = _field_annotation(schema, name)
            marker = _builds_marker(ann)
            if marker is not None:
                self.node(data[name], marker.type_name, f"{path}{name}")
            elif _is_model(ann):
                self.model(ann, data[name], f"{path}{name}.")
        check = getattr(schema, "check_settings", None)
        if check is not None:
            try:
                check({k: v for k, v in data.items() if k not in HYDRA_KEYS})
            except ValueError as e:
                if isinstance(e, NewRunsOnly) and self.source is not None:
                    pass  # a checkpoint's config: trained by an earlier version that ignored the setting
                elif isinstance(e, SettingsClash):
                    self.fail(str(e))
                else:
                    self.fail(f"{path}{e}")

    def node(self, value: Any, expected: str | type, path: str) -> None:
        """Validate a config node with ``_target_`` that must build ``expected``."""
        if not isinstance(value, dict) or "_target_" not in value:
            self.fail(f"{path}={show(value)} is not allowed: expected {describe(Annotated[dict, Builds(expected)])}")
        target = value["_target_"]
        if not isinstance(target, str) or target not in TARGETS:
            self.fail(f"{path}._target_={show(target)} is not allowed: expected one of vae-cli's own classes "
                      f"({', '.join(t for t in TARGETS if _builds(t, expected) and t.startswith('vae_cli'))})")
        if not _builds(target, expected):
            self.fail(f"{path}._target_={target!r} is not allowed: it does not build {_name(expected)}")
        partial = value.get("_partial_", False)
        if not isinstance(partial, bool):
            self.fail(f"{path}._partial_={show(partial)} is not allowed: expected true or false")
        args = {k: v for k, v in value.items() if k not in HYDRA_KEYS}
        later = sorted(set(args) & given_later(target, partial))
        if later:
            self.fail(f"{path}.{later[0]} is not a setting: vae-cli passes it itself when it builds {path}")
        self.model(description(target, partial), args, f"{path}.")

    def unknown(self, key: str, local: list[str]) -> "typing.NoReturn":
        candidates = list(dict.fromkeys(self.keys + local))
        self.fail(f"unknown setting {key!r}{suggest(key, candidates)}")

    def explain(self, schema: type[BaseModel], data: dict, error: dict, path: str) -> str:
        """One pydantic error as one line naming the key, its value and what is allowed."""
        loc = [p for p in error["loc"]]
        model, ann, value, names = schema, None, data, []
        for part in loc:
            if not isinstance(part, str):
                break
            names.append(part)
            if model is None or part not in model.model_fields:
                ann = None
                value = value.get(part) if isinstance(value, dict) else None
                break
            ann = _field_annotation(model, part)
            value = value.get(part) if isinstance(value, dict) else None
            model = ann if _is_model(ann) else None
            if model is None:
                break
        key = path + ".".join(names) if names else path.rstrip(".")
        kind = error["type"]
        if kind == "extra_forbidden":
            local = [path + n for n in schema.model_fields]
            self.unknown(key, local)
        if kind == "missing":
            return f"{key} is missing: expected {describe(ann)}" if ann is not None else f"{key} is missing"
        if kind in ("value_error", "assertion_error"):
            message = str(error.get("ctx", {}).get("error", error["msg"]))
            return f"{key}={show(value)} is not allowed: {message}" if names else f"{key}: {message}"
        if ann is None:
            return f"{key}={show(value)} is not allowed: {error['msg'].lower()}"
        return f"{key}={show(value)} is not allowed: expected {describe(ann)}"


def validate(config: Any, schema: type[BaseModel], source: str | None = None) -> dict[str, Any]:
    """Check a resolved config against a command's settings class; UserError (one line) on the first problem."""
    Validator(dotted_keys(config), source).model(schema, config)
    return config


# --------------------------------------------------------------------------- untrusted input


def check_structure(config: Any, source: str, max_depth: int = MAX_DEPTH) -> None:
    """The shape of an untrusted config, without recursion: plain containers of bounded depth, text
    keys, no interpolations, no Hydra keys but _target_/_partial_, every _target_ allowed."""
    stack: list[tuple[Any, str, int]] = [(config, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        at = where or "the top"
        if depth > max_depth:
            raise UserError(f"{source} has a config nested deeper than {max_depth} levels at {at}: refused")
        if isinstance(node, str):
            if "${" in node:  # instantiate would resolve it: ${oc.create:...} builds nodes
                raise UserError(f"{source} has an interpolation at {at}: refused, a saved config is plain values")
        elif isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str) or "${" in key:
                    raise UserError(f"{source} has a malformed config (a key at {at} is not text)")
                if key.startswith("_") and key not in HYDRA_KEYS:
                    raise UserError(f"{source} uses {key!r} at {at}: refused")
                if key == "_target_" and (not isinstance(value, str) or value not in TARGETS):
                    raise UserError(f"{source} names {show(value)} as _target_ at {at}: refused, a vae-cli run "
                                    "builds only its own models, datasets and optimizers")
                stack.append((value, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(node, (list, tuple)):
            stack.extend((item, where, depth + 1) for item in node)
        elif not (node is None or isinstance(node, (bool, int, float))):  # inf/nan: the validator names the key
            raise UserError(f"{source} has a value of type {type(node).__name__} at {at}: refused")


def check_untrusted(config: Any, schema: type[BaseModel], source: str) -> dict[str, Any]:
    """A config read from a file (checkpoint, run folder): its structure, then the settings description."""
    check_structure(config, source)
    return validate(config, schema, source)
