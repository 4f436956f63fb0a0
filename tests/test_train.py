"""`vae train` end to end on tiny data: the run folder, checkpoints, TensorBoard read back, resume."""

from __future__ import annotations

import json
import os
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
    out = (trained_run / "stdout.txt").read_text()
    assert f"run folder: {trained_run}" in out.replace(str(trained_run.resolve()), str(trained_run))
    assert "final val ELBO:" in out and f"tensorboard --logdir {trained_run / 'tensorboard'}" in out


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


def test_nan_loss_stops_with_one_line(tmp_path, data_dir):
    r = vae("train", f"data_dir={data_dir}", *TINY, "optimizer=sgd", "optimizer.lr=1e30", "trainer.max_epochs=3",
            f"hydra.run.dir={tmp_path / 'nan'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vae: error: training stopped at step ") and "learning rate" in last
    assert "Traceback" not in r.stderr


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
    assert r.returncode == 2 and "not finite" in r.stderr.strip().splitlines()[-1] or "the loss is" in r.stderr
    for ckpt in (run / "checkpoints").glob("*.ckpt") if (run / "checkpoints").exists() else []:
        c = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in c["state_dict"].values())


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
