"""The settings description: one validator derived from the typed code, for command lines and checkpoints."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
from pydantic import Field

from conftest import run_main, vae
from vae_cli.errors import UserError
from vae_cli.run_config import TrainSettings
from vae_cli.runs import check_config
from vae_cli.settings import TARGETS, Validator, describe, suggest

PACKAGE = Path(__file__).resolve().parent.parent / "vae_cli"


# --------------------------------------------------------------------------- the validator itself


def test_descriptions_in_plain_words():
    assert describe(Annotated[int, Field(gt=0)]) == "an integer > 0"
    assert describe(Annotated[int, Field(ge=0, le=9)]) == "an integer from 0 to 9"
    assert describe(Annotated[float, Field(gt=0)] | None) == "a finite number > 0 or null"
    assert suggest("max_epochs", ["trainer.max_epochs", "seed"]) == ": did you mean trainer.max_epochs?"
    assert suggest("zzz", ["trainer.max_epochs", "seed"]) == "; the settings at the top level are seed"
    assert suggest("a.zzz", ["trainer", "trainer.max_epochs"]) == "; the settings at the top level are trainer"
    assert suggest("zzz", []) == ""


def test_every_allowed_target_has_a_description():
    from pydantic import BaseModel

    from vae_cli.settings import description

    for target in TARGETS:
        assert issubclass(description(target, partial=target.startswith(("vae_cli.optim", "torch.optim"))), BaseModel)


def _config(trained_run) -> dict:
    return torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["vae_cli"]["config"]


def _set(config: dict, key: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()

MALFORMED = [
    ("model._target_", ["vae_cli.model.VAE"], "names ['vae_cli.model.VAE'] as _target_ at model: refused"),
    ("model._target_", "os.system", "names 'os.system' as _target_ at model: refused"),
    ("model._recursive_", False, "uses '_recursive_' at model: refused"),
    ("dataset.binarize", _DELETE, None),       # the default applies: still a valid config
    ("dataset.name", _DELETE, "dataset.name is missing: expected one of mnist, fashion_mnist, cifar10, folder"),
    ("model", _DELETE, "model is missing"),
    ("model.latent_dim", "4", "model.latent_dim='4' is not allowed: expected an integer > 0"),
    ("model.latent_dim", 4.0, "model.latent_dim=4.0 is not allowed"),
    ("model.encoder.hidden", [32, "x"], "model.encoder.hidden=[32, 'x'] is not allowed"),
    ("optimizer.lr", float("inf"), "optimizer.lr=inf is not allowed: expected a finite number > 0"),
    ("beta", float("nan"), "beta=nan is not allowed"),
    ("seed", 2**70, "is not allowed: expected an integer from 0 to 4294967295"),
    ("dataset.shape", [1, 32, 32], "dataset.shape=[1, 32, 32] is not allowed: mnist images are [1, 28, 28]"),
    ("dataset.shape", "${oc.env:HOME}", "has an interpolation at dataset.shape: refused"),
    ("trainer.devices", 0, "trainer.devices=0 is not allowed"),
    ("model.encoder", {"_target_": "vae_cli.optim.adam"}, "model.encoder._target_='vae_cli.optim.adam' is not allowed: it does not build torch.nn.modules.module.Module"),
    ("model.encoder", 3, "model.encoder=3 is not allowed: expected a config node with _target_"),
    ("extra", 1, "unknown setting 'extra'"),
    ("model.encoder.extra", 1, "unknown setting 'model.encoder.extra'"),
]


@pytest.mark.parametrize("key,value,message", MALFORMED, ids=[f"{m[0]}={'<deleted>' if m[1] is _DELETE else repr(m[1])}"[:40] for m in MALFORMED])
def test_malformed_checkpoint_configs_are_one_line(trained_run, key, value, message):
    config = _set(_config(trained_run), key, value)
    if message is None:
        check_config(config, "ckpt='x.ckpt'")
        return
    with pytest.raises(UserError) as e:
        check_config(config, "ckpt='x.ckpt'")
    assert str(e.value).startswith("ckpt='x.ckpt'") and message in str(e.value) and "\n" not in str(e.value)


def test_deep_nesting_is_refused_without_recursion(trained_run):
    deep: dict = {}
    node = deep
    for _ in range(3000):
        node["a"] = {}
        node = node["a"]
    for bad in (_set(_config(trained_run), "model.encoder.hidden", deep), deep, [deep]):
        with pytest.raises(UserError, match="nested deeper than|not a vae-cli checkpoint"):
            check_config(bad, "ckpt='x.ckpt'")


def test_a_config_that_is_not_a_mapping_is_refused():
    for bad in (None, [], "text", 3):
        with pytest.raises(UserError, match="holds no config"):
            check_config(bad, "ckpt='x.ckpt'")


def test_a_checkpoint_of_0_1_0_naming_torch_optimizers_still_loads(trained_run, tmp_path):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["vae_cli"]["config"]["optimizer"]["_target_"] = "torch.optim.Adam"
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert run_main("sample", f"ckpt={old}", "n=4", f"out={tmp_path / 's.png'}") == 0
    bad = _set(ckpt["vae_cli"]["config"], "optimizer.lr", -1.0)
    with pytest.raises(UserError, match="optimizer.lr=-1.0 is not allowed"):
        check_config(bad, "ckpt")


def test_malformed_checkpoint_files_end_in_one_line(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    deep: dict = {}
    node = deep
    for _ in range(3000):
        node["a"] = {}
        node = node["a"]
    cases = [("model._target_", ["vae_cli.model.VAE"]), ("model.latent_dim", "4"), ("dataset.binarize", "maybe"),
             ("model.encoder.hidden", deep)]
    limit = sys.getrecursionlimit()
    for i, (key, value) in enumerate(cases):
        bad = {**ckpt, "vae_cli": {**ckpt["vae_cli"], "config": _set(ckpt["vae_cli"]["config"], key, value)}}
        path = tmp_path / f"bad{i}.ckpt"
        sys.setrecursionlimit(20000)   # pickling 3000 levels needs it; loading must not
        try:
            torch.save(bad, path)
        finally:
            sys.setrecursionlimit(limit)
        assert run_main("sample", f"ckpt={path}", f"out={tmp_path / 'x.png'}") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vae: error: ckpt={str(path)!r}") and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


def test_resume_checks_a_saved_config_too(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model:\n  _target_: [a, b]\n")
    r = vae("train", f"resume={run}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "refused" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("args,message", [
    (["max_epochs=1"], "unknown setting 'max_epochs': did you mean trainer.max_epochs?"),
    (["+max_epochs=1"], "unknown setting 'max_epochs': did you mean trainer.max_epochs?"),
    (["seed=-1"], "seed=-1 is not allowed"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is not allowed"),
    (["trainer.devices=99"], "trainer.devices=99 is not allowed"),
    (["dataset.shape=[1,32,32]"], "mnist images are [1, 28, 28]"),
    (["optimizer=adamw", "optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is not allowed"),
    (["hydra.run.dir=${oc.env:PWD}/RUN"], "hydra.run.dir="),
])
def test_train_mistakes_end_to_end(tmp_path, args, message):
    (tmp_path / "RUN" / ".hydra").mkdir(parents=True)   # a run killed before its first checkpoint
    (tmp_path / "RUN" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    r = vae("train", *args, cwd=tmp_path, env={"PWD": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RUN"]                      # nothing written
    assert (tmp_path / "RUN" / ".hydra" / "config.yaml").read_text() == "seed: 0\n"  # the old run is untouched


def test_sample_temperature_inf_end_to_end(tmp_path):
    r = vae("sample", "temperature=inf", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "vae: error: temperature=inf is not allowed: expected a finite number > 0")


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = vae("train", f"hydra.run.dir={tmp_path / 'afile'}", cwd=tmp_path)
    assert r.returncode == 2 and "is a file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- structure


def _imports(path: Path) -> set[str]:
    """Every vae_cli module a module imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vae_cli"):
            if node.module == "vae_cli":
                out |= {f"vae_cli.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vae_cli.")}
    return out


def test_no_import_circle():
    graph = {f"vae_cli.{p.stem}": _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


# One interpreter imports the third-party packages (torch's import is most of the time: an interpreter
# per module cost 34 of them, a minute of both cores), then forks one child per vae_cli module, which
# imports that module alone: no vae_cli module is loaded before it, so an import cycle or a missing
# import inside the package still fails.
IMPORT_EACH_ALONE = """
import importlib, os, signal, sys, traceback
for package in sys.argv[1].split(","):  # third-party packages to load first
    importlib.import_module(package)
assert not [m for m in sys.modules if m.split(".")[0] == "vae_cli"]
children = {}
for name in sys.argv[2:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        signal.alarm(120)  # a child that hangs dies (SIGALRM: a non-zero status), not orphaned by the timeout
        try:
            importlib.import_module("vae_cli." + name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc()[-3000:].encode())
            os._exit(1)
    os.close(write)
    children[name] = (pid, read)
failed = []
for name, (pid, read) in children.items():
    with os.fdopen(read, "rb") as f:
        err = f.read().decode()
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name + ": " + err)
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
PRELOAD = "torch,torchvision,pytorch_lightning,hydra,omegaconf,pydantic"


def test_every_module_imports_alone():
    """Each module imported with no other vae_cli module loaded before it (IMPORT_EACH_ALONE)."""
    names = [p.stem for p in sorted(PACKAGE.glob("*.py"))]
    assert len(names) > 30
    if not hasattr(os, "fork"):  # an interpreter per module
        for name in names:
            r = subprocess.run([sys.executable, "-c", f"import vae_cli.{name}"], capture_output=True, text=True)
            assert r.returncode == 0, (name, r.stderr)
        return
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, PRELOAD, *names], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_the_import_check_catches_a_broken_module(tmp_path):
    """IMPORT_EACH_ALONE fails, naming the module, when one cannot be imported alone."""
    package = tmp_path / "vae_cli"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text("import json\n")
    (package / "cycle_a.py").write_text("from vae_cli.cycle_b import B\nA = 1\n")
    (package / "cycle_b.py").write_text("from vae_cli.cycle_a import A\nB = 2\n")
    r = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, "json", "good", "cycle_a"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and "cycle_a: " in r.stdout and "ImportError" in r.stdout, r.stdout + r.stderr
    assert "good: " not in r.stdout


def test_checks_has_no_rule_list():
    text = (PACKAGE / "checks.py").read_text()
    assert "_need(" not in text and "latent_dim" not in text
