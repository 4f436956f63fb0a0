"""Shared fixtures: tiny data made by the tests, the real conf/ tree, a real short training run.

Every run writes under pytest's tmp_path; nothing touches the network or ~/.cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_cli.cli import config_dir, main

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest -n N each worker is one process of N: one thread each (and in the `vae`
    # subprocesses they start), so N workers do not fight over the cores with 2N threads.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The longest modules first (pytest --durations=0, 2026-11-27: 107, 92, 79, 78, 50 and 49 s of the
# suite's 576), the rest after them in their own order. With --dist loadscope each module runs whole
# on one worker, and xdist hands them out in collection order (with --no-loadscope-reorder, as the
# README's test command runs it: xdist's own reorder counts tests, not seconds); starting with the long ones keeps a long module from
# running alone at the end while the other worker idles.
LONGEST_FIRST = ["test_train.py", "test_scale.py", "test_settings.py", "test_robust.py", "test_config.py", "test_cli.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


@pytest.fixture(autouse=True)
def _no_closed_log_streams():
    """A command run in-process leaves Hydra's console handler on the root logger, bound to the
    stream of the test that ran it; capsys closes that stream when its test ends, and a later sweep
    logs through the handler ("Launching 2 jobs locally") before Hydra sets up the job's logging."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
            root.removeHandler(handler)


# Tiny overrides for a real `vae train` that takes seconds on a CPU.
TINY = ["trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "dataset.batch_size=32", "dataset.eval_batch_size=32",
        "model.encoder.hidden=[32]", "model.latent_dim=4", "eval.k=8"]


def make_mnist_like(path: Path, n: tuple[int, int, int] = (128, 32, 32), seed: int = 0) -> Path:
    """A fake MNIST cache (uint8 (N, 1, 28, 28) per split): strokes on black, so images differ."""
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for split, count in zip(("train", "val", "test"), n):
        x = torch.zeros(count, 1, 28, 28)
        rows = torch.randint(4, 24, (count,), generator=g)
        cols = torch.randint(4, 24, (count,), generator=g)
        for i in range(count):
            x[i, 0, rows[i] - 3 : rows[i] + 3, 4:24] = 1.0   # a bar at a random height
            x[i, 0, 4:24, cols[i] - 2 : cols[i] + 2] = 0.7   # and a fainter one at a random column
        splits[split] = (x * 255).to(torch.uint8)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(splits, path / "mnist.pt")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_mnist_like(tmp_path_factory.mktemp("data"))


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is several times faster than two busy ones (the files that use
    it say so with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def conf() -> str:
    return config_dir()


def vae(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `vae` console command in a subprocess."""
    exe = Path(sys.executable).parent / "vae"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vae_cli.cli"]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=600)


def run_main(*args: str, capsys=None) -> int:
    """Run `vae ARGS` in this process; returns the exit code (0 when it returns normally)."""
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """One real short `vae train` (the console command), shared by the tests that read a run."""
    work = tmp_path_factory.mktemp("work")
    r = vae("train", f"data_dir={data_dir}", *TINY, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = list((work / "outputs").glob("*/*/checkpoints/last.ckpt"))
    assert len(runs) == 1, r.stdout
    run = runs[0].parent.parent
    (run / "stdout.txt").write_text(r.stdout)
    (run / "stderr.txt").write_text(r.stderr)
    return run


@pytest.fixture(scope="session")
def trained_run_2d(tmp_path_factory, data_dir) -> Path:
    """A run with a 2-d latent space (for vae manifold), trained in this process."""
    out = tmp_path_factory.mktemp("run2d")
    code = run_main("train", f"data_dir={data_dir}", *TINY, "model.latent_dim=2", "trainer.max_epochs=1",
                    "eval.k=0", f"hydra.run.dir={out}")
    assert code == 0
    return out


class Traced:
    """compile_terms with the aot_eager backend, counting the graphs made and the compiled calls."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs, self.calls, self.aot_eager = 0, [], lookup_backend("aot_eager")

    def backend(self, gm, inputs):
        self.graphs += 1
        return self.aot_eager(gm, inputs)

    def __call__(self, terms):
        compiled = torch.compile(terms, backend=self.backend, dynamic=False)

        def call(model, x, *args):
            self.calls.append(len(x))
            return compiled(model, x, *args)
        return call


@pytest.fixture
def traced(monkeypatch):
    """compile=true's torch.compile with the aot_eager backend (tests/test_compile.py: what it checks)."""
    import vae_cli.module

    torch._dynamo.reset()
    t = Traced()
    monkeypatch.setattr(vae_cli.module, "compile_terms", t)
    yield t
    torch._dynamo.reset()
