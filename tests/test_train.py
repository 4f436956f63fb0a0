"""`vae train` end to end on tiny data: the run folder, checkpoints, TensorBoard read back, resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, run_main, vae


def scalars(run: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_folder_holds_config_checkpoints_and_events(trained_run):
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((trained_run / "checkpoints").glob("best-epoch=*-step=*.ckpt"))) == 1
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    out = (trained_run / "stdout.txt").read_text().replace(str(trained_run.resolve()), str(trained_run))
    assert f"run folder:    {trained_run}\n" in out
    assert f"TensorBoard:   tensorboard --logdir {trained_run / 'tensorboard'}\n" in out


# What Lightning prints unasked: device banners, a tip for another product, the model summary.
NOISE = ("GPU available", "TPU available", "HPU available", "litlogger", "Tip:", "FLOPs", "Total params",
         "Tensor Cores", "Trainer.fit` stopped")


def test_the_run_ends_in_one_summary_block(trained_run):
    lines = (trained_run / "stdout.txt").read_text().strip().splitlines()
    assert lines[0] == "test evaluation: IWAE k=8 on 32 examples"   # said before it starts
    labels = [line.split(":")[0] for line in lines[1:]]
    assert labels == ["run folder", "trained", "val ELBO", "test ELBO", "test log p(x)", "test gap", "bits/dim",
                      "TensorBoard"], lines
    metrics = json.loads((trained_run / "metrics.json").read_text())
    block = "\n".join(lines)
    assert "trained:       2 epochs, 8 steps\n" in block
    assert f"test log p(x): {metrics['test_log_px']:.2f} nats/example (IWAE, k=8)" in block
    assert f"bits/dim:      {metrics['test_bits_per_dim']:.3f} (of log p(x))" in block
    # binarized pixels: bits per pixel of -log p(x)
    assert abs(metrics["test_bits_per_dim"] - -metrics["test_log_px"] / (784 * math.log(2))) < 1e-9


def test_a_default_run_prints_no_banners_tips_or_summary_table(trained_run):
    shown = (trained_run / "stdout.txt").read_text() + (trained_run / "stderr.txt").read_text()
    assert not [word for word in NOISE if word in shown], shown
    log = (trained_run / "train.log").read_text()
    assert "GPU available" in log and "litlogger" in log      # kept in the run's log


def test_verbose_shows_lightning_and_the_bar_shows_one_decimal(tmp_path, data_dir):
    run = tmp_path / "loud"
    args = [f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "trainer.enable_progress_bar=true"]
    r = vae("train", *args, "verbose=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    shown = r.stdout + r.stderr
    assert "GPU available" in shown and "Total params" in shown        # the summary table, asked for
    # the bars on stderr (they were on stdout, every redrawn frame around the summary block)
    assert re.search(r"val/elbo=-\d+\.\d[,\]]", r.stderr), r.stderr[-1000:]  # -542.5, not -542.
    assert re.search(r"train/elbo_step=-\d+\.\d[,\]]", r.stderr), r.stderr[-1000:]  # VAEModule.bar_metrics, one decimal
    assert "it/s" not in r.stdout and "\r" not in r.stdout, r.stdout[-1000:]
    assert "test evaluation: IWAE k=8 on 32 examples" in r.stdout
    assert "iwae k=8" in r.stderr and "32/32" in r.stderr               # the test evaluation's own bar
    # a finished run resumed: the same block, the same numbers, and quiet again without verbose
    first = json.loads((run / "metrics.json").read_text())
    r = vae("train", f"resume={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [word for word in NOISE if word in r.stdout + r.stderr], r.stdout + r.stderr
    assert "trained:       1 epoch, 4 steps (nothing left to train: it had finished)" in r.stdout
    assert f"val ELBO:      {first['val_elbo']:.2f} nats/example" in r.stdout
    assert f"test log p(x): {first['test_log_px']:.2f}" in r.stdout
    assert "exists and is not empty" not in r.stderr
    # and nothing logged twice: the test figures and the KL histogram (never the sanity check's
    # untrained model, step 0) once each
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/elbo")] == [4]
    assert [e.step for e in acc.Histograms("val/kl_per_dim")] == [4]


def test_the_summary_says_when_the_test_evaluation_was_skipped(tmp_path, capsys):
    from vae_cli.train import report

    report(tmp_path, {"val_elbo": -100.04, "step": 4, "epoch": 1})
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "val ELBO:    -100.04 nats/example (last validation)"
    assert out[3] == f"test:        skipped (eval.k=0); measure it with: vae evaluate run={tmp_path}"
    assert out[-1].startswith("TensorBoard: tensorboard --logdir")


def test_a_run_that_ends_before_validation_says_so_without_lightnings_hint(tmp_path, data_dir, capsys):
    import warnings

    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert run_main("train", f"data_dir={data_dir}", *TINY, "+trainer.max_steps=2", "eval.k=0",
                        f"hydra.run.dir={run}") == 0
    assert not [w for w in seen if "could not find the monitored key" in str(w.message)]
    out = capsys.readouterr().out
    assert "val ELBO:    none (no validation epoch, so no best checkpoint; last.ckpt is kept)" in out
    # 2 of an epoch's 4 batches: half an epoch (Lightning's current_epoch said 1)
    assert "trained:     0.5 epochs, 2 steps" in out and json.loads((run / "metrics.json").read_text())["epoch"] == 0.5
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]


def test_the_trainer_keeps_lightnings_hooks_and_checkpoint_keys_at_less_cost(tmp_path):
    """vae train's Trainer: no profiler at the cost of a shared context (a configured one is kept);
    its ModelCheckpoints store their state under Lightning's own keys, so older runs resume."""
    from pytorch_lightning.callbacks import ModelCheckpoint as LightningCheckpoint
    from pytorch_lightning.profilers import SimpleProfiler

    from vae_cli.callbacks import ModelCheckpoint, NoProfiler
    from vae_cli.module import VAEModule
    from vae_cli.train import build_trainer

    args = dict(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer, best = build_trainer(args, tmp_path, logger=False)
    assert isinstance(trainer.profiler, NoProfiler) and isinstance(best, ModelCheckpoint)
    with trainer.profiler.profile("a"), trainer.profiler.profile("b"):  # nested and reused
        pass
    assert isinstance(build_trainer({**args, "profiler": "simple"}, tmp_path, logger=False)[0].profiler, SimpleProfiler)
    checkpoints = [c for c in trainer.callbacks if isinstance(c, LightningCheckpoint)]
    assert len(checkpoints) == 2
    for c in checkpoints:
        ref = LightningCheckpoint(dirpath=c.dirpath, monitor=c.monitor, mode=c.mode)
        assert c.state_key == c.state_key == ref.state_key and c.state_key.startswith("ModelCheckpoint{")
    # VAEModule sets Lightning's hook name as a plain attribute; modules and parameters still register
    module = VAEModule.__new__(VAEModule)
    torch.nn.Module.__init__(module)
    module._current_fx_name = "training_step"
    module.extra = torch.nn.Linear(2, 2)
    assert module._current_fx_name == "training_step" and "extra" in module._modules


def test_gradient_clipping_and_step_checkpoints_still_work_where_they_are_set(tmp_path, data_dir, monkeypatch):
    """VAEModule skips Lightning's clipping call and the checkpoints their batch-end check where
    nothing is set; trainer.gradient_clip_val and every_n_train_steps still do what Lightning does."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint as LightningCheckpoint

    clipped, checked = [], []
    real_clip, real_end = pl.LightningModule.clip_gradients, LightningCheckpoint.on_train_batch_end
    monkeypatch.setattr(pl.LightningModule, "clip_gradients", lambda self, opt, gradient_clip_val=None, gradient_clip_algorithm=None:
                        clipped.append(gradient_clip_val) or real_clip(self, opt, gradient_clip_val, gradient_clip_algorithm))
    monkeypatch.setattr(LightningCheckpoint, "on_train_batch_end", lambda self, *a: checked.append(1) or real_end(self, *a))
    args = [f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1"]
    assert run_main("train", *args, "eval.k=0", f"hydra.run.dir={tmp_path / 'plain'}") == 0
    assert clipped == [] and checked == []                      # 4 steps: nothing to clip, nothing to save
    assert run_main("train", *args, "eval.k=0", "trainer.gradient_clip_val=0.5",
                    f"hydra.run.dir={tmp_path / 'clipped'}") == 0
    assert clipped == [0.5] * 4

    from vae_cli.callbacks import ModelCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, x, i):
            return (self.w * x).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    every = ModelCheckpoint(dirpath=tmp_path / "every", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[every], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.ones(4, 3), batch_size=1))
    assert sorted(p.name for p in (tmp_path / "every").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]


def test_batches_already_on_the_device_are_not_walked_again():
    import pytorch_lightning as pl

    from vae_cli.datamodule import ImageData

    data = ImageData.__new__(ImageData)
    pl.LightningDataModule.__init__(data)
    x = torch.zeros(2, 1, 4, 4)
    assert data.transfer_batch_to_device(x, torch.device("cpu"), 0) is x
    got = data.transfer_batch_to_device([x, {"y": x}], torch.device("cpu"), 0)  # anything else: Lightning's
    assert torch.equal(got[0], x) and torch.equal(got[1]["y"], x)


def test_a_run_prints_no_warnings(tmp_path, data_dir):
    """Python's default warning filters, as a user has them (the other tests run with PYTHONWARNINGS=ignore):
    nothing on stderr, e.g. not Lightning's warning about a batch hook on both the module and the datamodule."""
    r = vae("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
            cwd=tmp_path, env={"PYTHONWARNINGS": ""})
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]


def test_progress_bar_numbers():
    from vae_cli.callbacks import short_number

    assert [short_number(v) for v in (-104.25, -1876.24, 0.01234, -0.5, 12.0)] == \
        ["-104.2", "-1876.2", "0.0123", "-0.5", "12.0"]


def test_matmul_precision_is_applied(trained_run, tmp_path):
    before = torch.get_float32_matmul_precision()
    try:
        assert run_main("sample", f"run={trained_run}", "n=4", "matmul_precision=medium",
                        f"out={tmp_path / 's.png'}") == 0
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_commands_that_read_a_model_default_to_the_gpu_when_there_is_one():
    from vae_cli.runs import FromRunSettings, pick_device

    assert FromRunSettings().device == "auto" and FromRunSettings().matmul_precision == "highest"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tensorboard_scalars_are_the_elbo_terms_in_nats(trained_run):
    s = scalars(trained_run)
    for split in ("train", "val"):
        for term in ("elbo", "recon", "kl"):
            assert len(s[f"{split}/{term}"]) == 2, sorted(s)
    # ELBO = recon - KL, per example in nats (784 pixels: values in the hundreds, not per-pixel means)
    for e, r, k in zip(s["val/elbo"], s["val/recon"], s["val/kl"]):
        assert abs(e - (r - k)) < 1e-3 and k >= 0 and e < -10
    assert s["train/elbo"][-1] > s["train/elbo"][0]  # it learns
    assert len(s["train/elbo_step"]) == 8           # log_every_n_steps=1: one point a step
    for tag in ("test/elbo", "test/log_px", "test/gap"):
        assert len(s[tag]) == 1
    assert s["test/log_px"][0] >= s["test/elbo"][0] - 1.0   # IWAE with k=8 sits above the ELBO
    assert abs(s["test/gap"][0] - (s["test/log_px"][0] - s["test/elbo"][0])) < 1e-3


def test_tensorboard_images_and_hparams(trained_run):
    acc = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    assert {"val/reconstructions", "val/samples", "val/interpolation"} <= set(images)
    recon = acc.Images("val/reconstructions")[-1]
    assert (recon.width, recon.height) == (8 * 30 + 2, 2 * 30 + 2)  # 8 inputs above 8 reconstructions
    plugins = set(acc.PluginTagToContent("hparams"))
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= plugins
    assert "hparams/val_elbo" in acc.Tags()["scalars"] and "hparams/test_log_px" in acc.Tags()["scalars"]


def test_checkpoint_loads_safely_and_rebuilds_the_model(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    config = ckpt["vae_cli"]["config"]
    assert config["model"]["latent_dim"] == 4 and ckpt["global_step"] == 2 * 4  # 2 epochs x 128/32 batches
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["test_k"] == 8


def test_same_seed_same_numbers(tmp_path, data_dir):
    runs = []
    for name in ("a", "b"):
        assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / name}") == 0
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0] == runs[1]


def finite_checkpoints(run: Path) -> bool:
    """Every checkpoint the run saved holds finite weights only."""
    return all(torch.isfinite(v).all() for ckpt in run.glob("checkpoints/*.ckpt")
               for v in torch.load(ckpt, weights_only=True)["state_dict"].values())


@pytest.mark.parametrize("check_every", [1, 50])  # every step, or only before each checkpoint
def test_nan_loss_stops_with_one_line(tmp_path, data_dir, check_every):
    run = tmp_path / "nan"
    r = vae("train", f"data_dir={data_dir}", *TINY, "optimizer=sgd", "optimizer.lr=1e30", "trainer.max_epochs=3",
            f"trainer.log_every_n_steps={check_every}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vae: error: training stopped at step ") and "learning rate" in last, last
    assert "NaN or infinite" in last or "not finite" in last, last
    assert "Traceback" not in r.stderr
    assert finite_checkpoints(run)
    kept = any(run.glob("checkpoints/*.ckpt"))  # the line says whether a checkpoint is there to keep
    assert last.endswith("the last good checkpoint is kept" if kept else "no checkpoint had been written yet"), last


def test_with_accumulated_batches_each_step_is_logged_and_checked_once(tmp_path, data_dir):
    """Under trainer.accumulate_grad_batches every batch of a step saw the same global_step: the step's
    ELBO was logged once per batch, and the finiteness check named steps '4-3'."""
    run = tmp_path / "acc"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "+trainer.accumulate_grad_batches=2", "trainer.max_epochs=3",
                    "eval.k=0", f"hydra.run.dir={run}") == 0                          # 4 batches: 2 steps an epoch
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/elbo_step")] == list(range(6))
    r = vae("train", f"data_dir={data_dir}", *TINY, "+trainer.accumulate_grad_batches=2", "optimizer=sgd",
            "optimizer.lr=1e30", f"hydra.run.dir={tmp_path / 'nan'}", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    first, end = map(int, re.search(r"steps (\d+)-(\d+)", last).groups()) if "steps" in last else (1, 1)
    assert r.returncode == 2 and first <= end, last


def test_resume_after_kill_ends_at_the_same_step(tmp_path, data_dir):
    epochs, run = 40, tmp_path / "crash"
    args = [f"data_dir={data_dir}", *TINY, f"trainer.max_epochs={epochs}", "eval.k=0", f"hydra.run.dir={run}"]
    exe = Path(sys.executable).parent / "vae"
    proc = subprocess.Popen([str(exe), "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)   # never half-written
    assert ckpt["global_step"] < epochs * 4, "the run finished before it could be killed"
    r = vae("train", f"resume={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == epochs * 4
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2   # same TensorBoard run folder


def test_a_validation_batch_of_one_trains(tmp_path, data_dir):
    """The interpolation picture needs two inputs; with one it is skipped, not a crash."""
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "dataset.eval_batch_size=1",
                    "trainer.limit_val_batches=2", "eval.k=0", f"hydra.run.dir={tmp_path / 'one'}") == 0


def test_diverged_validation_stops_before_it_is_saved(tmp_path, data_dir):
    run = tmp_path / "div"
    r = vae("train", f"data_dir={data_dir}", *TINY, "optimizer=sgd", "optimizer.lr=1e30", "trainer.max_epochs=3",
            "trainer.limit_train_batches=1", f"hydra.run.dir={run}", cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and ("not finite" in last or "NaN or infinite" in last), r.stderr[-2000:]
    assert finite_checkpoints(run)


def test_resume_a_run_killed_before_its_first_checkpoint(tmp_path, data_dir):
    run = tmp_path / "early"
    (run / ".hydra").mkdir(parents=True)
    r = vae("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0", "--cfg", "job", cwd=tmp_path)
    (run / ".hydra" / "config.yaml").write_text(r.stdout)   # what Hydra saved before the kill
    r = vae("train", f"resume={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    said = [line for line in r.stderr.splitlines() if "starting over from step 0" in line]
    assert len(said) == 1 and said[0].startswith(f"vae: resume={run} has no checkpoints/last.ckpt")
    assert said[0][len("vae: "):] in (run / "train.log").read_text()


def test_last_checkpoint_is_the_last_epoch_even_when_validation_gets_no_better(tmp_path, data_dir):
    run = tmp_path / "flat"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=3", "optimizer.lr=1e-12",
                    "eval.k=0", f"hydra.run.dir={run}") == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3 * 4


@pytest.mark.parametrize("validation", [["+trainer.check_val_every_n_epoch=2"], ["+trainer.check_val_every_n_epoch=5"],
                                        ["+trainer.val_check_interval=0.5", "+trainer.max_steps=9"]])
def test_last_checkpoint_is_the_last_step_wherever_validation_runs(tmp_path, data_dir, validation, capsys):
    """Validation every other epoch, never (5 > 3 epochs), twice an epoch with a stop mid-epoch:
    last.ckpt holds the last step trained, and a resume of the finished run has nothing to train."""
    run = tmp_path / "val"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=3", "eval.k=0", *validation,
                    f"hydra.run.dir={run}") == 0
    steps = json.loads((run / "metrics.json").read_text())["step"]
    assert steps == (9 if "+trainer.max_steps=9" in validation else 3 * 4)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    capsys.readouterr()
    assert run_main("train", f"resume={run}") == 0
    assert "nothing left to train" in capsys.readouterr().out


@pytest.mark.parametrize("setting, said", [
    ("+trainer.val_check_interval=100", "`val_check_interval` (100) must be less than or equal to the number of "
                                        "the training batches (4)"),
    ("trainer.limit_train_batches=0.01", "You requested to check 0.01 of the `train_dataloader` but 0.01 * 4 < 1")])
def test_trainer_settings_lightning_judges_inside_fit_are_one_line(tmp_path, data_dir, setting, said):
    """Settings that Lightning refuses only once it sees the data, before the first step: one line,
    exit 2, and no half-made run left in the folder (the same command again was refused)."""
    run = tmp_path / "run"
    r = vae("train", f"data_dir={data_dir}", *TINY, setting, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"vae: error: trainer settings: {said}")
    assert not run.exists()


def test_lightnings_fast_dev_run_trains_and_reports(tmp_path, data_dir, capsys):
    """Its stand-in logger writes no events: the pictures' writer was None (an AttributeError traceback).
    It saves no checkpoint (Lightning's choice): the summary says so; and its test evaluation is a
    batch, as Lightning's loops are (it was the whole test split)."""
    run = tmp_path / "fast"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "+trainer.fast_dev_run=true", "eval.batch_size=8",
                    f"hydra.run.dir={run}") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 1 and metrics["test_n"] == 8
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "trainer.fast_dev_run saves none" in out, out
    assert run_main("train", f"data_dir={data_dir}", *TINY, "+trainer.fast_dev_run=2", "eval.k=0",
                    f"hydra.run.dir={tmp_path / 'fast2'}") == 0
    out = capsys.readouterr().out
    assert "test:" in out and "skipped (eval.k=0)" in out and "vae evaluate" not in out, out


def test_the_model_summary_alone_when_asked_for(tmp_path, data_dir, capsys):
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0",
                    "trainer.enable_model_summary=true", f"hydra.run.dir={tmp_path / 'table'}") == 0
    shown = "".join(capsys.readouterr())
    assert "Total params" in shown and "GPU available" not in shown and "litlogger" not in shown


def test_validation_every_n_batches_across_epochs(data_dir, tmp_path):
    """trainer.check_val_every_n_epoch=null with val_check_interval counts the batches across epochs,
    as Lightning's own message advises; the null was dropped, so 1 applied and the run was refused."""
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=3", "eval.k=0",  # 4 batches an epoch
                    "+trainer.val_check_interval=6", "+trainer.check_val_every_n_epoch=null",
                    f"hydra.run.dir={run}") == 0
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("val/elbo")]  # 12 batches over 3 epochs: a validation every 6
    assert len(steps) == 2 and steps[1] - steps[0] == 6, steps
