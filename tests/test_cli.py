"""The `vae` command itself: sub-commands, Hydra's flags, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_main, vae
from vae_cli.cli import COMMANDS


def test_vae_alone_and_help_list_the_commands():
    for args in ([], ["--help"]):
        r = vae(*args)
        assert r.returncode == 0
        for name in COMMANDS:
            assert f"  {name}" in r.stdout


def test_unknown_command_lists_the_commands_and_exits_2():
    r = vae("trian")
    assert r.returncode == 2
    assert "unknown command 'trian'" in r.stderr and "train" in r.stderr and "Traceback" not in r.stderr


def test_hydra_help_and_cfg_job(tmp_path):
    r = vae("train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "dataset: cifar10, fashion_mnist, folder, mnist" in r.stdout
    r = vae("train", "--cfg", "job", "model=conv", "model.latent_dim=7", cwd=tmp_path)
    assert r.returncode == 0
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"]["latent_dim"] == 7 and cfg["model"]["encoder"]["_target_"].endswith("ConvEncoder")
    assert not (tmp_path / "outputs").exists()   # --cfg runs nothing and writes nothing


def test_user_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path):
    r = vae("train", "model.latent_dim=-1", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "vae: error: model.latent_dim=-1 is not allowed: expected an integer > 0"
    r = vae("train", "dataset=imagenet", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "mnist" in r.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["model=ladder", "posterior=iaf"], "vae: error: posterior=iaf is not allowed with model=ladder: it has "
                                        "its own hierarchical posterior; use the default posterior (posterior=gaussian)"),
    # rules that cannot read an unresolved value leave the resolution error as it was
    (["dataset.shape=${nope}"], "vae: error: dataset.shape=${nope}: Interpolation key 'nope' not found"),
    (["likelihood=gaussian", "likelihood.sigma=${nope}"],
     "vae: error: likelihood.sigma=${nope}: Interpolation key 'nope' not found"),
])
def test_a_config_that_does_not_resolve_is_one_line(tmp_path, capsys, overrides, expected):
    """A class's own rule explains what broke the resolution where it can (posterior=iaf asks the
    model for a key a ladder lacks); otherwise the resolution error stands."""
    assert run_main("train", *overrides, f"hydra.run.dir={tmp_path / 'run'}") == 2
    assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "run").exists()


def test_debug_switch_shows_the_traceback(tmp_path, monkeypatch, capsys):
    r = vae("sample", "run=/no/such/run", cwd=tmp_path, env={"VAE_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr
    for off in ("0", "false", ""):  # VAE_DEBUG=0 turned it on
        monkeypatch.setenv("VAE_DEBUG", off)
        assert run_main("sample", "run=/no/such/run") == 2
        assert capsys.readouterr().err.startswith("vae: error: run='/no/such/run' is not a folder")


def test_evaluate_prints_the_table_and_writes_json(trained_run, tmp_path, capsys):
    out = tmp_path / "e.json"
    # the default estimators (IWAE, refined, AIS), each with fewer steps than its default: the same path, in seconds
    assert run_main("evaluate", f"run={trained_run}", "k=16", "limit=20", "ais.steps=20", "refined.steps=10",
                    "refined.search=64", f"out={out}") == 0
    printed = capsys.readouterr().out
    assert "log p(x)" in printed and "gap" in printed and "KL(q(z|x) || p(z|x))" in printed
    r = json.loads(out.read_text())
    for key in ("elbo", "log_px", "gap", "recon", "kl", "k", "n", "split", "bits_per_dim", "elbo_se", "log_px_se",
                "gap_se", "checkpoint"):
        assert key in r
    assert r["k"] == 16 and r["n"] == 20 and r["split"] == "test"
    assert abs(r["gap"] - (r["log_px"] - r["elbo"])) < 1e-9 and abs(r["elbo"] - (r["recon"] - r["kl"])) < 1e-9
    assert r["log_px"] > r["elbo"] and r["gap"] > 0
    assert abs(r["bits_per_dim"]["log_px"] + r["log_px"] / (784 * 0.6931471805599453)) < 1e-9
    # the default name goes in the run folder and never overwrites
    assert run_main("evaluate", f"run={trained_run}", "k=2", "limit=4", "estimators=iwae") == 0
    assert run_main("evaluate", f"run={trained_run}", "k=2", "limit=4", "estimators=iwae") == 0
    assert len(list((trained_run / "eval").glob("test-k2-*.json"))) == 2
    assert run_main("evaluate", f"run={trained_run}", "k=2", f"out={out}") == 2   # exists: refused


def test_evaluate_is_repeatable_with_a_seed(trained_run, tmp_path):
    outs = []
    for i in range(2):
        assert run_main("evaluate", f"run={trained_run}", "k=4", "limit=8", "seed=3", f"out={tmp_path / f'{i}.json'}") == 0
        outs.append(json.loads((tmp_path / f"{i}.json").read_text()))
    assert outs[0]["log_px"] == outs[1]["log_px"]


def test_python_dash_m_vae_cli_is_the_vae_command(trained_run, tmp_path):
    """`python -m vae_cli` for an environment whose scripts folder is not on PATH: the same commands."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vae_cli"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "  train" in r.stdout
    out = tmp_path / "s.png"
    r = subprocess.run([sys.executable, "-m", "vae_cli", "sample", f"run={trained_run}", "n=4", f"out={out}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size[0] > 28


def test_an_unknown_flag_is_one_line(tmp_path):
    r = vae("train", "--frobnicate", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--frobnicate" in r.stderr


def test_the_console_script_pauses_the_collector_for_the_start_up_only(trained_run, tmp_path, monkeypatch):
    """console() (the `vae` script) runs main with Python's collector paused; the command's task
    resumes it, the start-up's objects frozen; what is left at the end is frozen too (a fast exit)."""
    import gc
    import sys

    from vae_cli import cli, pictures

    seen = []
    real = pictures.sample

    def sample(cfg):
        seen.append(gc.isenabled())
        return real(cfg)

    monkeypatch.setattr(pictures, "sample", sample)
    monkeypatch.setattr(sys, "argv", ["vae", "sample", f"run={trained_run}", f"out={tmp_path / 's.png'}"])
    before = gc.get_freeze_count()
    try:
        cli.console()
        frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    finally:
        gc.unfreeze()  # this test process goes on: its objects are collected as before
        gc.enable()
    assert seen == [True] and enabled and frozen > before and (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("enabled", [True, False])
def test_main_in_process_leaves_the_collector_alone(trained_run, tmp_path, enabled):
    import gc

    if not enabled:  # e.g. a benchmark harness that turned it off
        gc.disable()
    try:
        assert run_main("sample", f"run={trained_run}", f"out={tmp_path / 's.png'}") == 0
        assert gc.isenabled() == enabled and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_hydra_flags_that_ended_in_tracebacks(capsys, tmp_path):
    """--help and --info with a bad override went straight to Hydra (a traceback); shell completion
    read the sub-command as an override; --version printed Hydra's version."""
    assert run_main("train", "--help", "model=bogus") == 2
    assert capsys.readouterr().err.strip() == "vae: error: model='bogus' does not exist: choose one of conv, ladder, mlp, resnet"
    assert run_main("train", "--info", "config", "bogus=3") == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err
    assert run_main("train", "--shell-completion") == 2
    assert "shell completion is not supported by vae" in capsys.readouterr().err
    # another command's config failed inside the run; a missing rerun file started a default training
    for flag in (["-cn", "evaluate"], ["--config-name=evaluate"], ["-cp", "/tmp"], ["--experimental-rerun", "/no/x.pickle"]):
        assert run_main("train", *flag) == 2, flag
        assert capsys.readouterr().err.startswith(f"vae: error: {flag[0].split('=')[0]} is not supported by vae"), flag
    for args in (["--version"], ["train", "--version"]):
        assert run_main(*args) == 0
        assert capsys.readouterr().out.startswith("vae-cli ")
    # --cfg shows the config of a named run folder without making it
    assert run_main("train", "--cfg", "job", f"hydra.run.dir={tmp_path / 'shown'}") == 0
    assert not (tmp_path / "shown").exists()


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    import subprocess
    import sys

    code = "import sys; sys.argv = ['vae', '--help']; from vae_cli import cli; cli.console()"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # as `vae --help | head -0` leaves
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 1) and "Traceback" not in err, err


def test_torchs_no_cuda_runtime_line_is_kept_off_the_terminal():
    """torch.compile on a CPU machine with nvcc on its PATH logged "No CUDA runtime is found, using
    CUDA_HOME=...": true, and nothing the user asked about. Other lines of that logger still pass."""
    import logging

    from vae_cli.logs import quiet_warnings

    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(catcher)
    try:
        quiet_warnings()
        quiet_warnings()                                      # once per command and sweep job: one filter
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("something else")
    finally:
        logger.removeHandler(catcher)
    assert [r.getMessage() for r in records] == ["something else"]
    assert len(logger.filters) == 1


def test_a_file_name_that_is_no_utf8_is_logged_escaped(tmp_path, capsys):
    """A folder image named b'bad\\xff.png' (os.fsdecode: 'bad\\udcff.png'): the run log's handler raised
    UnicodeEncodeError ("--- Logging error ---" and a traceback on stderr) and lost the line."""
    import logging

    from vae_cli.logs import attach_run_log, log

    handler = logging.FileHandler(tmp_path / "train.log")   # as Hydra's job logging makes it
    root = logging.getLogger()
    kept = root.handlers[:]
    root.handlers = [handler]  # pytest's own capture alone: it cannot send such text to an xdist controller
    try:
        attach_run_log()
        log.warning("skipping %s: not a readable image", "/data/bad\udcff.png")
    finally:
        root.handlers = kept
        handler.close()
    assert "skipping /data/bad\\udcff.png: not a readable image" in (tmp_path / "train.log").read_text()
    assert "Logging error" not in capsys.readouterr().err


def test_flags_may_come_after_settings(trained_run, capsys):
    """Hydra's parser takes the key=value settings only before its first flag: `vae sample run=R
    --cfg job n=2` was refused as "unrecognized arguments: n=2", a setting that was right."""
    from vae_cli.cli import flags_first

    assert flags_first(["run=R", "--cfg", "job", "n=2"]) == ["--cfg", "job", "run=R", "n=2"]
    assert flags_first(["a=1", "-m", "b=1,2", "--info", "config", "c=3"]) == ["-m", "--info", "config", "a=1",
                                                                             "b=1,2", "c=3"]
    assert flags_first(["n=2", "--info", "x=1"]) == ["n=2", "x=1", "--info"]  # --info's value is optional
    assert flags_first(["n=2", "--cfg"]) == ["n=2", "--cfg"]  # no value: Hydra's parser names it
    capsys.readouterr()
    assert run_main("sample", f"run={trained_run}", "--cfg", "job", "n=2", "nrow=3") == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["n"] == 2 and shown["nrow"] == 3
    for flag in ("--info", "--hydra-help"):  # --info alone took the first setting for its value; --hydra-help raised
        assert run_main("sample", f"run={trained_run}", "n=2", flag) == 0
        assert capsys.readouterr().out
    assert run_main("sample", f"run={trained_run}", "--hydra-help", "n=2") == 0
    assert "Hydra (" in capsys.readouterr().out
