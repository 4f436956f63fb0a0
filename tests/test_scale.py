"""Scaling out through Lightning and Hydra: DDP on two CPU processes, sweeps with a summary table."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import TINY, vae


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])  # spawn: fit runs in children, the parent counted 0 steps
def test_ddp_on_two_cpu_processes(tmp_path, data_dir, strategy):
    run = tmp_path / "ddp"
    r = vae("train", f"data_dir={data_dir}", *TINY, "trainer.devices=2", f"trainer.strategy={strategy}",
            "trainer.accelerator=cpu", f"hydra.run.dir={run}", cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * 2            # 4 batches an epoch, split over 2 ranks, 2 epochs
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2   # last + best, written once (rank 0)
    assert json.loads((run / "metrics.json").read_text())["step"] == 4
    assert "trained:       2 epochs, 4 steps" in r.stdout, r.stdout
    assert r.stdout.count("run folder:") == 1      # one report, from rank 0
    assert "sync_dist" not in r.stderr             # the logged sums are reduced already: no advice to sync them
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [".hydra", "checkpoints", "tensorboard"]


def test_sweep_runs_every_combination_and_writes_a_summary(tmp_path, data_dir):
    sweep, work = tmp_path / "sweep", tmp_path / "work"
    work.mkdir()  # the sweep folder given as ../sweep: one row a job all the same
    r = vae("train", "-m", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=4",
            "model.latent_dim=2,3", "likelihood=bernoulli,gaussian", "hydra.sweep.dir=../sweep", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    combos = {tuple(sorted(row["overrides"].split())) for row in rows}
    assert combos == {(f"likelihood={lik}", f"model.latent_dim={d}") for d in (2, 3) for lik in ("bernoulli", "gaussian")}
    assert all(float(row["test_log_px"]) >= float(row["test_elbo"]) - 5 for row in rows)
    md = (sweep / "summary.md").read_text()
    assert md.startswith("| job | overrides | val_elbo |") and md.count("\n") == 6
    assert "sweep summary:" in r.stdout


def test_a_sweep_of_resumes_logs_in_each_run_and_summarises_them(tmp_path, trained_run):
    """-m resume=A,B: each job trains and logs in its own run's folder (not in a new sweep job folder),
    and the sweep's summary has a row for each, with the resume= that tells them apart."""
    import shutil

    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    (runs[0] / "error.txt").write_text("an earlier sweep's failure")
    lines = [len((run / "train.log").read_text().splitlines()) for run in runs]
    sweep = tmp_path / "sweep"
    r = vae("train", "-m", f"resume={runs[0]},{runs[1]}", "hydra.sweep.dir=sweep", "hydra.job.chdir=true",
            cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    assert "Callback" not in r.stderr, r.stderr[-3000:]   # Hydra's warning that a callback raised
    assert r.returncode == 0, r.stderr[-3000:]
    for run, n in zip(runs, lines):
        log = (run / "train.log").read_text().splitlines()
        assert len(log) > n and any("run folder:" in line for line in log[n:])
    assert not (runs[0] / "error.txt").exists() and not [p for p in sweep.iterdir() if p.name.isdigit()]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(row["job"], row["overrides"], row["folder"], row["error"]) for row in rows] == [
        ("0", f"resume={runs[0]}", str(runs[0]), ""), ("1", f"resume={runs[1]}", str(runs[1]), "")]
    assert all(row["val_elbo"] for row in rows)


def test_resume_refuses_other_overrides(tmp_path, trained_run):
    r = vae("train", f"resume={trained_run}", "model.latent_dim=8", cwd=tmp_path)
    assert r.returncode == 2 and "drop 'model.latent_dim=8'" in r.stderr


def test_a_failed_sweep_job_does_not_stop_the_others(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    r = vae("train", "-m", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0", "optimizer=sgd",
            "optimizer.lr=1e30,0.01", "trainer.limit_train_batches=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 2 and "1 of 2 sweep jobs failed (job 0" in r.stderr
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [bool(row["error"]) for row in rows] == [True, False] and rows[1]["val_elbo"]


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "joblib"
    r = vae("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"data_dir={data_dir}", *TINY,
            "trainer.max_epochs=1", "eval.k=0", "model.latent_dim=2,3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 2


def test_a_picture_sweep_on_joblib_leaves_no_hydra_folder(tmp_path, trained_run):
    """The tidy-up runs in the launching process (a Hydra callback), whichever process ran the jobs."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    work = tmp_path / "work"
    work.mkdir()
    r = vae("sample", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"run={run}", "n=4", "temperature=0.5,1",
            cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((run / "samples").glob("sample-*.png"))) == 2 and list(work.iterdir()) == []


def test_a_picture_sweep_on_joblib_with_a_failed_job_exits_2(tmp_path, trained_run):
    """The failures were counted in the workers' processes: the sweep ended with exit 0."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    r = vae("sample", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "n=4",
            f"run={trained_run},{tmp_path / 'nope'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "vae: error: 1 of 2 sweep jobs failed (their errors are above)"


def test_submitit_local_executor(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "submitit"
    r = vae("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"data_dir={data_dir}",
            *TINY, "trainer.max_epochs=1", "eval.k=0", "model.latent_dim=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 1


def test_an_interrupted_train_sweep_summarises_its_finished_jobs(tmp_path, capsys):
    """A Ctrl-C during job 1 of a `vae train` sweep: Hydra ends it with no callback, and job 0's
    results were in its metrics.json only (the summary was written at the sweep's end)."""
    from omegaconf import OmegaConf

    from vae_cli import cli
    from vae_cli.sweep import SweepSummary

    config = OmegaConf.create({"hydra": {"runtime": {"cwd": str(tmp_path)}, "sweep": {"dir": "sweep"}}})
    SweepSummary().on_multirun_start(config)
    for job, latent in ((0, 2), (1, 3)):
        (tmp_path / "sweep" / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / "sweep" / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model.latent_dim={latent}\n")
    (tmp_path / "sweep" / "0" / "metrics.json").write_text(json.dumps({"val_elbo": -100.5, "step": 40}))
    with cli.stop_on_signals(), pytest.raises(SystemExit) as e:  # the process's own handlers, restored after
        cli.interrupted("vae train resume=sweep/1")
    assert e.value.code == 130
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert [(r["job"], r["val_elbo"], r["step"]) for r in rows] == [("0", "-100.5", "40")]  # job 1 never finished
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"vae: the sweep's 1 ended job(s): {tmp_path / 'sweep' / 'summary.md'}",
                        "vae: interrupted; continue the run with: vae train resume=sweep/1"], err
