"""Faults from outside: a checkpoint naming a data folder, bad output paths, Ctrl-C, the run's log."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_main, vae
from vae_cli import pictures, runs, sources
from vae_cli.data import run_split
from vae_cli.errors import UserError

# --------------------------------------------------------------------------- a checkpoint's data_dir


def _config_with_data_dir(trained_run: Path, data_dir: str) -> dict:
    config = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["vae_cli"]["config"]
    return {**config, "dataset": {**config["dataset"], "data_dir": data_dir}}


def _watch_downloads(monkeypatch, fixture_data: Path) -> list[Path]:
    """Stand-ins for the two download paths: torchvision writes into its root (as it would), then
    fails; the package index serves the fixture's data. Returns the roots torchvision was given."""
    roots = []

    def torchvision(name, root):
        roots.append(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "partial-download").write_text("")
        raise OSError("offline")

    monkeypatch.setattr(sources, "from_torchvision", torchvision)
    monkeypatch.setattr(sources, "mnist_from_package_index",
                        lambda: torch.load(fixture_data / "mnist.pt", weights_only=True))
    return roots


def test_nothing_is_downloaded_into_a_folder_a_checkpoint_names(trained_run, data_dir, tmp_path, monkeypatch):
    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    theirs.mkdir()
    monkeypatch.setenv("VAE_DATA_DIR", str(mine))
    roots = _watch_downloads(monkeypatch, data_dir)
    config = _config_with_data_dir(trained_run, str(theirs))

    images, _ = run_split(config, "test")                       # nothing there: fetched into the user's folder
    assert len(images) == 32 and list(theirs.iterdir()) == []
    assert (mine / "mnist.pt").is_file() and roots and all(mine in r.parents for r in roots)

    (theirs / "mnist.pt").write_bytes(b"junk")                  # an invalid cache there is ignored, left alone
    shutil.rmtree(mine)
    run_split(config, "test")
    assert sorted(p.name for p in theirs.iterdir()) == ["mnist.pt"] and (theirs / "mnist.pt").read_bytes() == b"junk"

    shutil.copy(data_dir / "mnist.pt", theirs / "mnist.pt")     # a valid cache there is read, nothing fetched
    shutil.rmtree(mine)
    n = len(roots)
    run_split(config, "test")
    assert len(roots) == n and not mine.exists()

    explicit = tmp_path / "explicit"                             # data_dir= on the command line: only that folder
    run_split(config, "test", str(explicit))
    assert (explicit / "mnist.pt").is_file()


def test_evaluate_and_pictures_never_write_into_the_checkpoints_data_dir(trained_run, data_dir, tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path / "mine"))
    _watch_downloads(monkeypatch, data_dir)
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["vae_cli"]["config"]["dataset"]["data_dir"] = str(theirs)
    path = tmp_path / "copied.ckpt"
    torch.save(ckpt, path)
    assert run_main("reconstruct", f"ckpt={path}", "n=2", f"out={tmp_path / 'r.png'}") == 0
    assert run_main("evaluate", f"ckpt={path}", "k=2", "limit=4", f"out={tmp_path / 'e.json'}") == 0
    assert list(theirs.iterdir()) == [] and (tmp_path / "mine" / "mnist.pt").is_file()


# --------------------------------------------------------------------------- output paths


def test_bad_output_paths_are_one_line_user_errors(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(UserError, match="a file is in the way") as e:       # RUN/samples exists as a file
        runs.claim_outputs(None, blocker, "sample", (".png",))
    assert str(blocker) in str(e.value)
    with pytest.raises(UserError, match="is a file, not a folder"):         # out= inside a file
        runs.check_out(str(blocker / "x.png"))
    with pytest.raises(UserError, match="cannot create"):                   # the same, found while claiming
        runs.claim_outputs(str(blocker / "x.png"), tmp_path, "s", (".png",))
    with pytest.raises(UserError, match="cannot create the output folder"):  # a parent is a file
        runs.claim_outputs(None, blocker / "deeper" / "samples", "sample", (".png",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            runs.check_out(str(ro / "x.png"))
        with pytest.raises(UserError, match="Permission denied"):
            runs.claim_outputs(str(ro / "x.png"), tmp_path, "s", (".png",))
    finally:
        ro.chmod(0o700)


def test_an_os_error_while_claiming_is_a_user_error(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "s-001.png"))

    monkeypatch.setattr(runs.os, "open", full)
    with pytest.raises(UserError, match="No space left on device"):
        runs.claim_outputs(None, tmp_path, "s", (".png",))


def test_claimed_outputs_are_removed_when_the_work_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with runs.claimed_outputs(None, tmp_path, "s", (".png", ".gif")) as paths:
            assert all(p.is_file() for p in paths)
            raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with runs.claimed_outputs(str(tmp_path / "o.png"), tmp_path, "s", (".png",)):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with runs.claimed_outputs(None, tmp_path, "s", (".png",)) as (path,):
        path.write_text("done")
    assert path.read_text() == "done"


def test_a_failed_command_removes_the_default_folder_it_made_but_no_other(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(KeyboardInterrupt):  # RUN/eval/ made for this command: gone with its claim
        with runs.claimed_outputs(None, run / "eval" / "deeper", "e", (".json", ".png")):
            raise KeyboardInterrupt
    assert list(run.iterdir()) == []
    (run / "eval").mkdir()  # there before: kept, empty or not
    with pytest.raises(RuntimeError):
        with runs.claimed_outputs(None, run / "eval", "e", (".json",)):
            raise RuntimeError
    assert (run / "eval").is_dir()
    with runs.claimed_outputs(None, run / "samples", "s", (".png",)) as (done,):
        done.write_text("done")
    with pytest.raises(RuntimeError):  # another output in the folder keeps it, and the output
        with runs.claimed_outputs(None, run / "samples", "s", (".png",)) as (path,):
            assert path != done
            raise RuntimeError
    assert done.read_text() == "done" and not path.exists()


def test_picture_commands_with_bad_outputs_write_nothing(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("samples", "eval"))
    (run / "samples").write_text("a file where the folder should be")
    assert run_main("sample", f"run={run}", "n=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run / "samples") in err[0], err
    assert run_main("reconstruct", f"run={trained_run}", "n=2", f"out={run / 'samples' / 'x.png'}") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # the work fails after the claim (index past the split): the claimed file goes again
    assert run_main("reconstruct", f"run={trained_run}", "index=31", "n=4", f"out={tmp_path / 'r.png'}") == 2
    assert not (tmp_path / "r.png").exists()


# --------------------------------------------------------------------------- Ctrl-C


def interrupt(args: list[str], ready, timeout: float = 120, sig: int = signal.SIGINT) -> tuple[int, str]:
    """Start `vae ARGS`, send sig (Ctrl-C's SIGINT) once ready(stderr so far) is true; (exit code, stderr)."""
    exe = Path(sys.executable).parent / "vae"
    # SIGINT at its default in the child: a background job, or a pytest-xdist worker, ignores it,
    # and a child inherits an ignored signal (then Python installs no KeyboardInterrupt for it).
    proc = subprocess.Popen([str(exe), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = bytearray()

    def read() -> None:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not ready(err.decode(errors="replace")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted: " + err.decode()[-2000:]
    proc.send_signal(sig)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    return proc.returncode, err.decode(errors="replace")


def assert_one_line(err: str, line: str) -> None:
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    assert lines[-1] == line, err[-2000:]
    assert "Traceback" not in err and sum("interrupt" in x.lower() for x in lines) == 1, err[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, or kill / a scheduler's pre-emption
def test_ctrl_c_during_training_then_resume(tmp_path, data_dir, sig):
    run, epochs = tmp_path / "run", 6
    args = ["train", f"data_dir={data_dir}", *TINY, f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=1",
            "eval.k=0", f"hydra.run.dir={run}"]
    code, err = interrupt(args, lambda _: (run / "checkpoints" / "last.ckpt").exists(), sig=sig)
    assert code == 130
    assert_one_line(err, f"vae: interrupted; continue the run with: vae train resume={run}")
    assert "interrupted; continue the run with" in (run / "train.log").read_text()
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < epochs * 4 and step % 4 == 0          # the last finished epoch
    r = vae("train", f"resume={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == epochs * 4


# A command whose shutdown never ends (an interrupt that lands while a lock is held can do that):
# the process still ends, with the one line and 130, after cli.GRACE_S or at a second signal.
_HANGS = """
import sys, threading, time
from vae_cli import cli
cli.GRACE_S = float(sys.argv[1])
where = sys.argv[2]
if where == "exit":              # the report is made, then the interpreter waits for this thread
    threading.Thread(target=threading.Event().wait).start()
with cli.stop_on_signals():
    try:
        try:
            print("ready", file=sys.stderr, flush=True)
            time.sleep(120)
        finally:
            if where == "cleanup":
                threading.Event().wait()   # a clean-up that never finishes
    except KeyboardInterrupt:
        cli.interrupted()
"""


def _hanging(grace: float, where: str, signals: list[int]) -> tuple[int, str, float]:
    proc = subprocess.Popen([sys.executable, "-c", _HANGS, str(grace), where], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stderr.readline().strip() == "ready"
        start = time.time()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.5)
            proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
        return proc.returncode, err, time.time() - start
    finally:
        proc.kill()  # a broken watchdog must not leave the child behind


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_shutdown_that_hangs_ends_after_the_grace_period(sig):
    code, err, took = _hanging(1.0, "cleanup", [sig])
    assert code == 130 and took < 30
    assert_one_line(err, "vae: interrupted")


def test_a_second_ctrl_c_ends_a_hanging_shutdown_at_once():
    code, err, took = _hanging(120.0, "cleanup", [signal.SIGINT, signal.SIGINT])
    assert code == 130 and took < 30                  # not the 120 s of the grace period
    assert_one_line(err, "vae: interrupted")


def test_an_exit_that_hangs_after_the_report_is_not_reported_twice():
    code, err, took = _hanging(1.0, "exit", [signal.SIGINT])
    assert code == 130 and took < 30
    assert_one_line(err, "vae: interrupted")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_after_the_report_ends_a_hanging_exit_at_once(sig):
    code, err, took = _hanging(120.0, "exit", [signal.SIGINT, sig])
    assert code == 130 and took < 30                  # not SIGTERM's default 143, nor the grace period
    assert_one_line(err, "vae: interrupted")


_IMPORTING = """
import sys, time
sys.path.insert(0, sys.argv[1])
from vae_cli import cli
with cli.stop_on_signals():
    try:
        import signalled_in_its_body
        print("imported", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("whole" if getattr(sys.modules.get("signalled_in_its_body"), "DONE", False) else "half", flush=True)
        cli.interrupted()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_an_import_is_raised_once_the_import_ends(tmp_path, sig):
    """A Ctrl-C in a command's first second lands inside torch's, numpy's or Lightning's import:
    raised there, it left modules half made (a segfault, an abort, a RecursionError)."""
    (tmp_path / "signalled_in_its_body.py").write_text(
        f"import os, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(0.3)\nDONE = True\n")
    r = subprocess.run([sys.executable, "-c", _IMPORTING, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stdout.split() == ["imported", "whole"], (r.stdout, r.stderr)
    assert_one_line(r.stderr, "vae: interrupted")


def test_an_interrupt_that_a_library_swallowed_is_raised_at_vaes_next_point():
    """Raised inside Hydra's composition of the config, a KeyboardInterrupt vanished, and the command
    ran to its end with exit code 0: the command's start and the start of training raise it again."""
    from vae_cli import cli

    with cli.stop_on_signals():
        cli.raise_if_stopped()                        # no signal: nothing
        cli._stop["signalled"] = True                 # as after a signal whose interrupt was swallowed
        with pytest.raises(KeyboardInterrupt):
            cli.raise_if_stopped()
        cli._stop["signalled"] = False


def test_a_signal_during_fit_is_raised_at_the_next_batch_boundary(monkeypatch):
    from vae_cli import callbacks, cli

    monkeypatch.setattr(cli, "GRACE_S", 3600.0)        # the watchdog this arms must outlive the suite
    hook = callbacks.SafeInterrupt()
    with cli.stop_on_signals():
        hook.on_fit_start(None, None)
        os.kill(os.getpid(), signal.SIGINT)            # not raised here, inside whatever runs
        time.sleep(0.05)
        assert cli._stop["pending"]
        with pytest.raises(KeyboardInterrupt):
            hook.on_train_batch_end(None, None, None, None, 0)
        hook.on_exception(None, None, KeyboardInterrupt())
        assert not cli._stop["deferred"] and not cli._stop["pending"]
        cli._stop.update(signalled=False, stopping=False)  # the handlers go back to pytest's on leaving


@pytest.mark.parametrize("step_s, told", [(0.6, True), (0.0, False)])
def test_a_signal_that_waits_for_a_long_step_is_told_it_was_heard(monkeypatch, capfd, step_s, told):
    """A compile=true compilation keeps the first step 15 to 50 s: a Ctrl-C there said nothing until
    the step ended. After cli.NOTICE_S one line says so; a step that ends sooner adds no line."""
    from vae_cli import callbacks, cli

    monkeypatch.setattr(cli, "GRACE_S", 3600.0)        # the watchdog this arms must outlive the suite
    monkeypatch.setattr(cli, "NOTICE_S", 0.3)
    hook = callbacks.SafeInterrupt()
    with cli.stop_on_signals():
        hook.on_fit_start(None, None)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(step_s)                             # the step under way
        with pytest.raises(KeyboardInterrupt):
            hook.on_train_batch_end(None, None, None, None, 0)
        time.sleep(0.6 - step_s)                       # past NOTICE_S either way
        hook.on_exception(None, None, KeyboardInterrupt())
        cli._stop.update(signalled=False, stopping=False)
    err = capfd.readouterr().err
    assert ("vae: stopping at the end of the step under way (Ctrl-C again stops at once)" in err) == told, err


def test_ctrl_c_is_given_back_after_lightning_ignores_it_in_its_shutdown():
    from vae_cli import callbacks, cli

    with cli.stop_on_signals():
        assert signal.getsignal(signal.SIGINT) is cli._on_signal
        cli._stop["signalled"] = True                  # as after a first Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # what Lightning does before its graceful shutdown
        callbacks.SafeInterrupt().on_exception(None, None, KeyboardInterrupt())
        assert signal.getsignal(signal.SIGINT) is cli._on_signal
        cli._stop["signalled"] = False                 # the handlers go back to pytest's on leaving


def test_signals_are_given_back_after_a_command():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    from vae_cli import cli

    with cli.stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) is cli._on_signal
        ours = before[0] is signal.default_int_handler         # an ignored SIGINT stays ignored
        assert signal.getsignal(signal.SIGINT) is (cli._on_signal if ours else before[0])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_ctrl_c_during_the_final_test_evaluation(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ["train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=50000", f"hydra.run.dir={run}"]
    code, err = interrupt(args, lambda _: "`Trainer.fit` stopped" in _read(run / "train.log"))
    assert code == 130
    assert_one_line(err, f"vae: interrupted; continue the run with: vae train resume={run}")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # resumable
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_evaluate(trained_run, tmp_path, sig):
    out = tmp_path / "e.json"
    code, err = interrupt(["evaluate", f"run={trained_run}", "k=500000", f"out={out}"], lambda e: "k=500000" in e, sig=sig)
    assert code == 130
    assert_one_line(err, "vae: interrupted")
    assert not out.exists()


def test_ctrl_c_in_a_picture_command_removes_its_claim(trained_run, tmp_path, monkeypatch, capsys):
    def stop(*args, **kwargs):
        assert (tmp_path / "s.png").exists()                 # claimed before the work
        raise KeyboardInterrupt

    monkeypatch.setattr(pictures, "sample_images", stop)
    assert run_main("sample", f"run={trained_run}", f"out={tmp_path / 's.png'}") == 130
    assert capsys.readouterr().err.strip().splitlines() == ["vae: interrupted"]
    assert not (tmp_path / "s.png").exists()


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# --------------------------------------------------------------------------- the run's log


def test_train_log_holds_the_run(trained_run):
    log = (trained_run / "train.log").read_text()
    assert "[pytorch_lightning" in log and "`Trainer.fit` stopped" in log       # Lightning's lines
    assert f"run folder:    {trained_run}" in log.replace(str(trained_run.resolve()), str(trained_run))
    assert "val ELBO:" in log and "tensorboard --logdir" in log                  # the report
    out = (trained_run / "stdout.txt").read_text()                               # the terminal is as it was:
    assert "[pytorch_lightning" not in out and "[vae_cli]" not in out           # no log-formatted lines
    assert out.count("val ELBO:") == 1


def test_a_run_that_fails_late_says_why_in_its_log(tmp_path, capsys):
    """Files named like images that are not: the pre-check sees images, decoding finds none."""
    run, folder = tmp_path / "run", tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"not a png")
    assert run_main("train", f"data_dir={tmp_path / 'cache'}", *TINY, "dataset=folder", f"dataset.path={folder}",
                    f"hydra.run.dir={run}") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("vae: error: dataset.path=") and "readable image" in line
    assert not run.exists() or line[len("vae: "):] in (run / "train.log").read_text()


def test_a_bad_cache_in_the_users_own_folder_is_reported_once(trained_run, data_dir, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mnist.pt").write_bytes(b"junk")
    monkeypatch.setenv("VAE_DATA_DIR", str(mine))
    _watch_downloads(monkeypatch, data_dir)
    run_split(_config_with_data_dir(trained_run, str(mine)), "test")     # the run's folder is the user's own
    assert len([x for x in capsys.readouterr().err.splitlines() if "is not valid" in x]) == 1
    assert sources.load_cache(mine / "mnist.pt") is not None             # rebuilt there


def test_a_plain_pickle_as_checkpoint_is_one_line(tmp_path):
    """torch.load(weights_only=True) warned about the pickle protocol (two lines) before the refusal."""
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    r = vae("sample", f"ckpt={tmp_path / 'plain.pkl'}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is not a vae-cli checkpoint" in r.stderr


def test_a_ctrl_c_after_the_command_is_done_is_ignored():
    """Once the command has returned (its outputs written), a Ctrl-C could only interrupt the
    interpreter's exit: it printed a traceback from an atexit callback."""
    code = ("import signal, sys; sys.argv = ['vae', '--help']; from vae_cli import cli; cli.console(); "
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stderr
