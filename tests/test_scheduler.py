"""scheduler=cosine: the learning rate decays over the run, whichever limit ends it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import Timer

from conftest import TINY, run_main, vae
from test_train import scalars
from vae_cli.errors import UserError
from vae_cli.module import VAEModule
from vae_cli.objectives import ELBO
from vae_cli.optim import cosine


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_follows_the_formula_at_every_progress(final):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    t = {"now": 0.0}
    schedule = cosine(opt, lambda: t["now"], final=final)
    for now in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):   # past the end the lr stays at final
        t["now"] = now
        schedule.step()
        want = 0.5 * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(now, 1.0))))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, abs=1e-12)


def module_at(step: int, planned: float, elapsed: float | None = None, duration: float = 100.0) -> VAEModule:
    """A VAEModule whose progress() sees a trainer at `step` of `planned`, and a max_time clock."""
    m = VAEModule.__new__(VAEModule)
    torch.nn.Module.__init__(m)
    timer = None
    if elapsed is not None:
        timer = Timer(duration={"seconds": duration})
        timer.time_elapsed = lambda stage="train": elapsed
    object.__setattr__(m, "_trainer", SimpleNamespace(global_step=step))
    m._planned_steps, m._timer = planned, timer
    m.scheduler, m.objective = cosine, ELBO()   # a cosine run on the ELBO
    return m


def test_progress_is_the_larger_of_steps_and_time():
    assert module_at(25, 100).progress() == 0.25
    assert module_at(25, math.inf, elapsed=60).progress() == 0.6        # max_time alone (max_epochs=-1)
    assert module_at(80, 100, elapsed=60).progress() == 0.8             # the steps run out first
    assert module_at(10, 100, elapsed=99).progress() == 0.99            # the clock runs out first
    assert module_at(500, 100).progress() == 1.0


def test_a_cosine_run_logs_its_lr_down_to_final(tmp_path, data_dir):
    run = tmp_path / "cos"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=3", "eval.k=0", "scheduler=cosine",
                    "scheduler.final=0.1", "optimizer.lr=0.01", f"hydra.run.dir={run}") == 0
    lr = scalars(run)["train/lr"]          # the lr of every step (log_every_n_steps=1): 3 epochs x 4 batches
    want = [0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 12))) for i in range(12)]
    assert lr == pytest.approx(want, rel=1e-5)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.001)  # after the last step: final * lr
    assert ckpt["lr_schedulers"] and ckpt["vae_cli"]["config"]["scheduler"]["final"] == 0.1


def test_a_time_bounded_run_decays_on_its_clock(tmp_path, data_dir):
    """max_epochs=-1 and trainer.max_time: progress is Lightning's Timer, so the lr ends near final."""
    run = tmp_path / "timed"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=-1", "+trainer.max_time={seconds: 4}",
                    "eval.k=0", "scheduler=cosine", f"hydra.run.dir={run}") == 0
    lr = scalars(run)["train/lr"]
    assert len(lr) > 4 and all(a >= b for a, b in zip(lr, lr[1:]))
    assert lr[0] == pytest.approx(1e-3, rel=1e-3) and lr[-1] < 0.3 * lr[0], lr   # its last step: past 2/3 of the time


def test_the_default_lr_is_constant(trained_run):
    assert "train/lr" not in scalars(trained_run)
    assert not torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["lr_schedulers"]


def test_a_run_with_no_end_is_refused_in_one_line(tmp_path, data_dir):
    r = vae("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=-1", "scheduler=cosine",
            f"hydra.run.dir={tmp_path / 'endless'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vae: error: scheduler needs the run's end") and "trainer.max_time" in last, last
    assert not (tmp_path / "endless" / "checkpoints").exists()   # refused before fit


def test_progress_counts_an_endless_loader_as_no_step_limit():
    """estimated_stepping_batches is max_steps (-1) for a loader without a length: no step limit,
    so progress comes from the clock alone (not 1 after the first step)."""
    m = module_at(3, math.inf, elapsed=10)
    trainer = SimpleNamespace(estimated_stepping_batches=-1, world_size=1, global_step=3,
                              callbacks=[Timer(duration={"seconds": 100})])
    object.__setattr__(m, "_trainer", trainer)
    m._plan_schedule()
    assert m._planned_steps == math.inf and m.progress() < 0.01


def test_max_time_with_several_processes_is_refused():
    m = module_at(0, math.inf)
    object.__setattr__(m, "_trainer", SimpleNamespace(estimated_stepping_batches=100, world_size=2, global_step=0,
                                                      callbacks=[Timer(duration={"seconds": 100})]))
    with pytest.raises(UserError, match="several processes"):
        m._plan_schedule()
