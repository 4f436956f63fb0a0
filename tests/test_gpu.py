"""Checks that need a CUDA GPU; skipped where there is none (CI has none: they run when one is lent)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch

from conftest import TINY, run_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = [a for a in TINY if not a.startswith(("trainer.accelerator", "trainer.log_every_n_steps"))]
GPU += ["trainer.accelerator=gpu", "trainer.log_every_n_steps=1000"]


class SyncCounter(pl.Callback):
    """Counts host synchronisations inside training steps (torch's sync debug mode), skipping the
    steps that read the KL or the loss on purpose (every 50th, for the collapse monitor)."""

    def __init__(self) -> None:
        self.syncs: list[str] = []   # where each synchronising call was made
        self.steps = 0
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % 50 == 0:
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        # set_sync_debug_mode's own notice is not a sync; "called a synchronizing CUDA operation" is
        self.syncs += [f"{w.filename}:{w.lineno}" for w in self._caught
                       if "called a synchronizing" in str(w.message)]
        self.steps += 1
        self._catcher = None


def test_a_training_step_never_waits_for_the_gpu(tmp_path, data_dir, monkeypatch):
    counter = SyncCounter()
    real_trainer = pl.Trainer

    def trainer_with_counter(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), counter]
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_with_counter)
    assert run_main("train", f"data_dir={data_dir}", *GPU, "trainer.max_epochs=2", "eval.k=0",
                    f"hydra.run.dir={tmp_path / 'gpu'}") == 0
    assert counter.steps >= 6 and not counter.syncs, f"host syncs in {counter.steps} steps at {counter.syncs[:5]}"


def test_evaluation_agrees_on_gpu_and_cpu(tmp_path, data_dir):
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *GPU, "eval.k=0", f"hydra.run.dir={run}") == 0
    out = {}
    for device in ("cpu", "cuda"):
        assert run_main("evaluate", f"run={run}", f"device={device}", "k=500", "estimators=[iwae]",
                        f"out={tmp_path / device}.json", f"data_dir={data_dir}") == 0
        out[device] = json.loads((tmp_path / f"{device}.json").read_text())["estimators"]["iwae"]
    cpu, gpu = out["cpu"], out["cuda"]
    # Different random draws on each device: agreement within Monte Carlo error (4 combined s.e.).
    assert cpu["n"] == gpu["n"] == 32
    assert abs(cpu["log_px"] - gpu["log_px"]) < 4 * math.hypot(cpu["log_px_se"], gpu["log_px_se"]), (cpu, gpu)
