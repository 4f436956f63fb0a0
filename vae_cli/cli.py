"""The ``vae`` command: one Hydra app per sub-command over one ``conf/`` tree.

Hydra has no sub-commands, so ``main`` takes the first word, then hands the rest of the command line
to a Hydra app whose primary config is ``conf/<command>.yaml``: ``key=value`` overrides, ``--help``,
``--cfg job``, ``-m`` and ``hydra.run.dir=...`` all work as in any Hydra app.

Before Hydra writes anything, the command line is composed once here and checked (``checks.py``,
against the description ``settings.py`` reads from the typed code):
a user mistake becomes one line naming the value and what is allowed, exit code 2, no traceback.
``VAE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from vae_cli.errors import UserError, first_line

# command -> (function that does the work, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vae_cli.train:train", "train a VAE; checkpoints, TensorBoard events and the config go to outputs/"),
    "evaluate": ("vae_cli.evaluate:evaluate", "ELBO, log p(x) by importance sampling (IWAE, k samples) and the gap"),
    "sample": ("vae_cli.pictures:sample", "decode z ~ p(z) into an image grid"),
    "interpolate": ("vae_cli.pictures:interpolate", "walk the latent space between two inputs (or prior draws)"),
    "reconstruct": ("vae_cli.pictures:reconstruct", "test inputs above their reconstructions"),
    "traverse": ("vae_cli.pictures:traverse", "vary one latent dimension at a time (rows sorted by KL)"),
    "manifold": ("vae_cli.pictures:manifold", "decode a grid over a 2-d latent plane"),
}

# Hydra flags that take a value (the value is not an override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version"}


def config_dir() -> str:
    """The conf/ tree: shipped inside the package as vae_cli.conf, or the repository's conf/."""
    try:
        from importlib.resources import files

        path = Path(str(files("vae_cli.conf")))
        if (path / "train.yaml").is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    return str(Path(__file__).resolve().parent.parent / "conf")


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vae COMMAND [key=value ...] [hydra flags: --help, --cfg job, -m, ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`vae COMMAND --help` lists that command's settings. VAE_DEBUG=1 shows tracebacks."]
    return "\n".join(lines)


def _close_bars() -> None:
    """End half-drawn progress bars' lines, so that a last message starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:
            pass


def fail(message: str) -> NoReturn:
    """Print one line and exit 2: the end of every user mistake."""
    _close_bars()
    print(f"vae: error: {message}", file=sys.stderr)
    if "vae_cli.runs" in sys.modules:  # a folder claimed for this run, nothing written there yet: it goes
        sys.modules["vae_cli.runs"].drop_claims()
    sys.exit(2)


# Settings whose value is a path. A path may hold characters Hydra's override grammar does not take
# unquoted, such as '=' in Lightning's checkpoint names (best-epoch=2-step=90.ckpt): quoted for it.
PATH_KEYS = {"ckpt", "run", "resume", "out", "data_dir", "dataset.path", "hydra.run.dir", "hydra.sweep.dir"}


def quote_paths(args: list[str]) -> list[str]:
    """args with each path setting that Hydra could not read as given, and can read quoted, quoted:
    `ckpt=RUN/checkpoints/best-epoch=2-step=90.ckpt` works as the training printed it; with -m, a
    comma between such paths still separates a sweep's values."""
    sweep = bool({"-m", "--multirun"} & set(args))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = None, []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+~") in PATH_KEYS and value and value[0] not in "'\"":
            parser = parser or OverridesParser.create()
            if not _parses(parser, a):
                # with -m, a sweep (ckpt=A,B) quoted path by path first; else the value is one path
                each = [f"{key}={','.join(map(_quoted, value.split(',')))}"] if sweep and "," in value else []
                for quoted in [*each, f"{key}={_quoted(value)}"]:
                    if _parses(parser, quoted):
                        a = quoted
                        break
        out.append(a)
    return out


def _quoted(value: str) -> str:
    """value in Hydra's single quotes: a quote escaped, and the backslashes before a quote or the end
    doubled (Hydra reads an escaped backslash there as one)."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def _parses(parser, override: str) -> bool:
    try:
        parser.parse_overrides([override])
        return True
    except Exception:  # Hydra's grammar errors
        return False


_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info's optional value


def _takes_value(args: list[str], i: int) -> bool:
    """Whether the flag args[i] takes the argument after it as its value (--info's is optional)."""
    a = args[i]
    return a in _FLAGS_WITH_VALUE or (a in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in _INFO_CHOICES)


def split_overrides(args: list[str]) -> tuple[list[str], bool]:
    """The key=value overrides among Hydra's arguments, and whether a flag asks only for information."""
    overrides, info, skip = [], False, False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a.startswith("-"):
            info = info or a in _INFO_FLAGS
            skip = _takes_value(args, i)
        else:
            overrides.append(a)
    return overrides, info


def flags_first(args: list[str]) -> list[str]:
    """Hydra's flags (with their values) before the key=value overrides, each kept in its order:
    Hydra's parser takes the overrides only before the first flag, and `vae sample run=R --cfg job
    n=2` was refused as "unrecognized arguments: n=2", a setting that was right."""
    flags, overrides, last, i = [], [], [], 0
    while i < len(args):
        a = args[i]
        takes = _takes_value(args, i)
        if a.startswith("-"):
            if (takes and i + 1 == len(args)) or (a in ("--info", "-i") and not takes):
                last = [a]  # its value missing (Hydra's parser names it), or --info's optional one not given
            else:
                flags += args[i:i + 2] if takes else [a]
            i += 2 if takes else 1
        else:
            overrides.append(a)
            i += 1
    return flags + overrides + last


def _task(command: str):
    module_name, fn_name = COMMANDS[command][0].split(":")

    def task(cfg) -> None:
        from vae_cli.logs import attach_run_log, file_only, quiet_warnings

        _sweep["jobs"] += 1

        quiet_warnings()  # again: a launcher's worker process (joblib) never ran _main
        attach_run_log()  # Hydra has just configured logging: the run's log file is on the root logger
        _paths_from_launch_folder(cfg)
        resume = _resume_hint(command, cfg)
        _stop["message"] = _stop_message(resume)  # for a shutdown cut short (_exit_now)
        try:
            raise_if_stopped()
            fn = getattr(importlib.import_module(module_name), fn_name)
            if cfg.get("matmul_precision"):  # train and every command that reads a model
                from vae_cli.runs import set_matmul_precision

                set_matmul_precision(cfg.matmul_precision)
            try:
                fn(cfg)
            except (MemoryError, RuntimeError, OSError) as e:  # a size too large, a disk too full, no access: one line
                from vae_cli.errors import (access_message, disk_full, disk_message, memory_message, no_access,
                                            out_of_memory)

                if not (out_of_memory(e) or disk_full(e) or no_access(e)):
                    raise
                file_only(f"error: {first_line(e)}", logging.ERROR)
                raise UserError(memory_message(e, _task_overrides()) if out_of_memory(e) else
                                disk_message(e) if disk_full(e) else access_message(e, _paths_given(cfg))) from None
        except UserError as e:
            file_only(f"error: {e}", logging.ERROR)  # a run that stops early says why in its train.log
            if debugging():
                raise
            if _in_sweep():  # one failed job must not end the sweep: note it, go on, report at the end
                from vae_cli.sweep import record_failure

                print(f"vae: error: {e}", file=sys.stderr)
                record_failure(str(e))
                _sweep["failed"] += 1
                return
            fail(str(e))
        except KeyboardInterrupt:
            interrupted(resume)
        except Exception as e:
            from vae_cli.logs import FILE_ONLY, log

            log.error(f"error: {first_line(e)}", exc_info=True, extra=FILE_ONLY)  # Hydra prints it on the terminal
            raise
        finally:
            _stop["message"] = "interrupted"  # a sweep's next job sets its own

    return task


PATH_SETTINGS = ("run", "ckpt", "out", "data_dir", "resume")  # read from where the command ran


def _paths_given(cfg) -> dict[str, str]:
    """setting -> the path it gives, among PATH_SETTINGS and the run folder (hydra.run.dir) of a training."""
    from hydra.core.hydra_config import HydraConfig

    paths = {key: str(cfg[key]) for key in PATH_SETTINGS if cfg.get(key)}
    try:
        if HydraConfig.get().mode.name == "RUN" and "trainer" in cfg:
            paths.setdefault("hydra.run.dir", HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - outside Hydra (a command called directly)
        pass
    return paths


def _paths_from_launch_folder(cfg) -> None:
    """With hydra.job.chdir=true the job runs in its own output folder; a relative path given on the
    command line means the folder the command ran in, as Hydra's to_absolute_path reads it (a
    relative data_dir had fetched the dataset again into every run's folder)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path
    from omegaconf import open_dict

    try:
        if not HydraConfig.get().job.chdir:
            return
    except Exception:  # noqa: BLE001 - outside Hydra (a command called directly)
        return
    for key in PATH_SETTINGS:
        value = cfg.get(key)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            with open_dict(cfg):
                cfg[key] = to_absolute_path(os.path.expanduser(value))


def _task_overrides() -> list[str]:
    """The command line's key=value settings of the job that runs (a sweep's job: its own values)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # outside Hydra (tests calling a command directly)
        return []


def _resume_hint(command: str, cfg) -> str | None:
    """For an interrupted `vae train`: the command that continues the run."""
    if command != "train":
        return None
    try:
        from vae_cli.logs import shell

        if cfg.get("resume"):
            return f"vae train resume={shell(cfg.resume)}"
        from hydra.core.hydra_config import HydraConfig

        return f"vae train resume={shell(HydraConfig.get().runtime.output_dir)}"
    except Exception:  # no run folder known: nothing to suggest
        return None


def _stop_message(resume: str | None) -> str:
    return f"interrupted; continue the run with: {resume}" if resume else "interrupted"


def interrupted(resume: str | None = None) -> NoReturn:
    """Ctrl-C: one line on stderr (and in the run's log), exit code 130 as a shell reports SIGINT, no traceback."""
    _stop["stopping"] = True  # from here a signal ends the process at once (_on_signal), never with a traceback
    try:
        if signal.getsignal(signal.SIGINT) is not _on_signal:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # outside main(): a second Ctrl-C must not print a traceback
    except ValueError:  # not the main thread
        pass
    _close_bars()
    # Only modules already imported: a Ctrl-C in the first second lands inside torch's import, and
    # importing vae_cli.runs here imported torch again, half made (a segfault, an abort, or a
    # RecursionError). A folder is claimed and a sweep run only through these modules.
    for name, tidy in (("vae_cli.runs", "drop_claims"), ("vae_cli.sweep", "tidy_pending"),
                       ("vae_cli.sweep", "summarize_pending")):
        try:
            getattr(sys.modules[name], tidy)()
        except Exception:  # noqa: BLE001 - not imported (nothing claimed or swept), or interrupted while importing
            pass
    message = _stop_message(resume)
    with _report_lock:  # the watchdog (below) prints the line only if this has not
        if not _quiet_rank():
            # written here, not through the logger: after the command (Hydra's teardown) its
            # terminal handler may be gone, and the process ended with 130 and no word
            try:
                sys.stderr.write(f"vae: {message}\n")  # one write (logs.say)
                sys.stderr.flush()
            except Exception:  # noqa: BLE001 - a closed stream: the exit code says it
                pass
        try:
            from vae_cli.logs import FILE_ONLY, log

            log.warning(message, extra=FILE_ONLY)  # the run's log file
        except Exception:  # noqa: BLE001 - interrupted while importing: the terminal has the line
            pass
        _stop["reported"] = True
    sys.exit(130)


def _quiet_rank() -> bool:
    # Ctrl-C reaches every process of the terminal's group: the processes Lightning started for
    # the other devices (LOCAL_RANK >= 1) stop quietly, so the line is printed once.
    return os.environ.get("LOCAL_RANK", "0") not in ("", "0")


# Hydra's flags that pick another config than the command's own (or rerun a pickled one)
CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--experimental-rerun")


def debugging() -> bool:
    """VAE_DEBUG set to anything but empty, 0, false or no: tracebacks instead of one line."""
    return os.environ.get("VAE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


# The jobs of a sweep run in this process (Hydra's basic launcher): how many ran, how many failed.
_sweep = {"jobs": 0, "failed": 0}


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# Ctrl-C and SIGTERM: the first raises KeyboardInterrupt (during fit, at the next batch boundary:
# defer), so that the command removes what it had half made and reports (interrupted()). A
# shutdown that cannot finish (an interrupt that landed while a lock was held, say) must not keep
# the process for ever: a second signal, or a shutdown still under way GRACE_S seconds after the
# first, ends the process at once with the same line.
GRACE_S = 30.0
# A first signal during fit waits for the step under way; one that takes longer than this (a
# compile=true compilation, 15 to 50 s the first time; a large model's step) is told it was heard.
NOTICE_S = 2.0
_stop: dict = {"message": "interrupted", "signalled": False, "stopping": False, "reported": False, "sigint": False,
              "deferred": False, "pending": False, "generation": 0, "after_import": False, "resent": False}
_report_lock = threading.Lock()


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM (kill, a batch scheduler's pre-emption) stop a command as Ctrl-C does: half-made
    outputs are removed and a run can be resumed (SIGTERM's default action would leave them behind)."""
    if _stop["resent"]:  # _resend's check: raise once the import under way has ended
        _stop["resent"] = False
        if not _stop["after_import"] or _importing(frame):  # raised already (raise_if_stopped), or not yet
            return
        _stop["after_import"] = False
        if _stop["deferred"]:  # fit began meanwhile: at its next batch boundary, as a first signal there
            _stop["pending"] = True
            return
        raise KeyboardInterrupt
    if _stop["signalled"] or _stop["stopping"]:
        _exit_now()
    _stop["signalled"] = _stop["stopping"] = True
    threading.Thread(target=_watchdog, args=(_stop["generation"],), name="vae-stop-watchdog", daemon=True).start()
    if _stop["deferred"]:
        _stop["pending"] = True  # raised at the next batch boundary (raise_pending)
        return
    if _importing(frame):
        # Raised inside an import (a Ctrl-C in a command's first second lands in torch's, numpy's or
        # Lightning's), a KeyboardInterrupt left modules half made: a library that caught it went on
        # to a RecursionError, and importing torch again segfaulted. It is raised once the import ends.
        _stop["after_import"] = True
        threading.Thread(target=_resend, args=(signum,), name="vae-stop-after-import", daemon=True).start()
        return
    raise KeyboardInterrupt


def _importing(frame: object) -> bool:
    """Whether the main thread is inside an import (a frame of importlib's bootstrap below it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _resend(signum: int) -> None:
    """Signal the main thread again every 20 ms until the handler has raised the interrupt outside any
    import (a real signal, which also ends a sleep or a wait there, as the first one would have)."""
    import time

    main = threading.main_thread().ident
    while _stop["after_import"]:
        time.sleep(0.02)
        if _stop["after_import"] and not _stop["resent"] and main is not None:
            _stop["resent"] = True
            signal.pthread_kill(main, signum)


def defer(on: bool) -> None:
    """While on (Lightning's fit loop, vae_cli.callbacks.SafeInterrupt), a first signal is raised at
    the next batch boundary, not at whatever instruction it lands on: a KeyboardInterrupt raised
    inside queue.put (TensorBoard's event writer), say, leaves that queue's lock taken, and the
    shutdown then waits for it for ever."""
    _stop["deferred"] = on


def raise_if_stopped() -> None:
    """At a point of vae's own (a command's start, the start of training): the interrupt of a signal
    that arrived before, if nothing has stopped the command yet. Raised inside Hydra's composition
    of the config, a KeyboardInterrupt vanished (1 run in 15 with a Ctrl-C 1 to 3 s after the start),
    and the command ran on to its end with exit code 0."""
    if _stop["signalled"] and not _stop["pending"]:
        _stop["after_import"] = False
        raise KeyboardInterrupt


def raise_pending() -> None:
    """Raise the KeyboardInterrupt of a signal that arrived while deferred."""
    if _stop["pending"]:
        _stop["pending"] = False
        raise KeyboardInterrupt


def _watchdog(generation: int) -> None:
    wait, grace = threading.Event().wait, GRACE_S  # read now: a test sets them for its own signal
    notice = min(NOTICE_S, grace)
    wait(notice)
    if _stop["generation"] == generation and _stop["pending"] and not _quiet_rank():  # still in that step
        os.write(2, b"\nvae: stopping at the end of the step under way (Ctrl-C again stops at once)\n")
    wait(grace - notice)
    if _stop["generation"] == generation:  # not a later command of the same process (tests call main in-process)
        _exit_now()


def _exit_now() -> NoReturn:
    """End the process without the rest of its shutdown, with interrupted()'s line unless it was printed."""
    if debugging():  # where the shutdown was stuck
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)
    held = _report_lock.acquire(timeout=2.0)  # not while interrupted() prints; nor for ever, if that is what hangs
    if not _stop["reported"] and not _quiet_rank():
        os.write(2, f"\nvae: {_stop['message']}\n".encode())
    if held:
        _report_lock.release()
    os._exit(130)


def rearm() -> None:
    """Give Ctrl-C back to the handler above after a signal stopped the command: Lightning ignores
    SIGINT while it shuts down after one (pytorch_lightning/trainer/call.py), and a shutdown that
    hangs there should still end at a second Ctrl-C."""
    if _stop["signalled"] and _stop["sigint"] and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)


@contextmanager
def stop_on_signals():
    """Within: SIGINT and SIGTERM raise KeyboardInterrupt once, then force the exit (above)."""
    _stop.update(message="interrupted", signalled=False, stopping=False, reported=False, sigint=False,
                 deferred=False, pending=False, after_import=False, resent=False, generation=_stop["generation"] + 1)
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # An ignored SIGINT (a background job) stays ignored, as Python leaves it.
            if sig != signal.SIGINT or signal.getsignal(sig) is signal.default_int_handler:
                previous[sig] = signal.signal(sig, _on_signal)
        _stop["sigint"] = signal.SIGINT in previous
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        # After a signal the process is on its way out: the handlers stay, so that another signal
        # during the interpreter's exit ends it at once (130) too. Otherwise they go back (tests and
        # notebooks call main in-process).
        if not _stop["signalled"]:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_collector = {"paused": False}  # console() paused Python's garbage collector for the start-up


def console() -> None:
    """The ``vae`` console script: main() in a process of its own, without the garbage collector's
    start-up and exit costs.

    The start-up (Hydra, pydantic, torch and, for train, Lightning) makes some 500k objects that
    live until the process ends. Python's collector traverses every one of them in each full
    collection: 7 of them took 0.55 s of `vae train`'s start-up, and the one at the interpreter's
    exit about 1 s. So the collector pauses until the command line is checked; then what exists
    is frozen (never traversed again) and the collector resumes, before Hydra runs the command or
    a sweep's jobs. Whatever is left at the end is frozen too, so the exit skips it. `vae train` of
    2 batches went from 7.2 to 5.2 s (README, Speed). The price: the start-up's cyclic garbage,
    some 30k objects (about 10 MB), is never freed. Only here, not in main(): tests and notebooks
    call main() in their own process, which goes on afterwards, with its collector as it was.
    """
    gc.disable()
    _collector["paused"] = True
    try:
        try:
            main()
        except BrokenPipeError:  # `vae --help | head`: the reader left; no traceback (Python's own recipe)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as e:  # `vae --help > /dev/full`: printing failed outside a command's task
            from vae_cli.errors import disk_full

            if not disk_full(e):
                raise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush fails no more
            print(f"vae: error: could not write the output: {e.strerror}", file=sys.stderr)
            sys.exit(1)
        # Done, its outputs written: a Ctrl-C from here on would only interrupt the interpreter's
        # exit (a traceback from an atexit callback), so it is ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        if _collector["paused"]:  # main() ended before the command ran: the collector as it was
            _collector["paused"] = False
            gc.enable()
        gc.freeze()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vae`` console script. Ctrl-C or SIGTERM anywhere ends in one line and exit code 130."""
    with stop_on_signals():
        try:
            _main(argv)
        except KeyboardInterrupt:  # outside a command's task: while starting, composing or importing
            interrupted()


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *argv]  # what a re-run of this process (DDP) executes
    from vae_cli.logs import quiet_warnings

    quiet_warnings()  # Lightning's chatter that is not the user's business
    if argv and argv[0] in ("-h", "--help", "help") and len(argv) > 1 and argv[1] in COMMANDS:
        argv = [argv[1], "--help"]  # vae help train, vae --help train: that command's settings (sys.argv set below)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if "--version" in argv:  # Hydra's own flag would print Hydra's version
        from vae_cli import __version__

        print(f"vae-cli {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        fail(f"unknown command {command!r}: " + (f"did you mean {close[0]}? " if close else "")
             + f"choose one of {', '.join(COMMANDS)}")
    rest = flags_first(quote_paths(rest))
    if "--hydra-help" in rest:  # Hydra's own help, the same whatever the settings (with them it raised)
        rest = ["--hydra-help"]
    sys.argv = [sys.argv[0], command, *rest]
    overrides, info = split_overrides(rest)
    multirun = bool({"-m", "--multirun"} & set(rest))
    shown = sorted({"--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"} & set(rest))
    if multirun and shown:  # Hydra would raise a ValueError with a traceback
        fail(f"-m and {shown[0]} together: {shown[0]} shows one run's config, so drop -m (a sweep's runs "
             f"differ only by the swept values) or {shown[0]}")
    if {"--shell-completion", "-sc"} & set(rest):  # Hydra's completion reads the sub-command as an override
        fail("shell completion is not supported by vae: `vae COMMAND --help` lists the settings")
    config_flag = next((a for a in rest if a.split("=", 1)[0] in CONFIG_FLAGS), None)
    if config_flag is not None:
        # another command's config (-cn evaluate) failed inside the run with a traceback; a missing
        # --experimental-rerun file started a default training
        fail(f"{config_flag.split('=', 1)[0]} is not supported by vae: each command has its own config "
             "(conf/COMMAND.yaml); change it with key=value settings (`vae COMMAND --help` lists them)")
    # checked also under --help, --info and --cfg: they show the config these overrides make
    from vae_cli.checks import check_command_line

    try:
        # --help or --info alone: nothing to check (the values are the config's own); quick, no torch
        folders = [] if info and not overrides else \
            check_command_line(config_dir(), command, overrides, multirun=multirun, values_only=info)
    except UserError as e:
        if debugging():
            raise
        fail(str(e))
    except OSError as e:  # a folder or file named on the command line that may not be read or written
        from vae_cli.errors import access_message, no_access

        if debugging() or not no_access(e):
            raise
        fail(access_message(e))

    from hydra._internal.utils import _run_hydra, get_args_parser

    from vae_cli.settings import register_resolvers

    register_resolvers()
    # Hydra reads the arguments after the sub-command; sys.argv stays `vae COMMAND ...`, so a
    # process that re-runs it (Lightning's DDP launcher starts one per device this way) runs the
    # same sub-command. hydra.main would parse sys.argv[1:] itself and see COMMAND as an override.
    parser = get_args_parser()
    parser.error = lambda message: fail(f"{message} (see `vae {command} --help`)")  # argparse's usage block, as one line
    args = parser.parse_args(rest)
    runs_job = not (args.help or args.hydra_help or args.info or args.cfg or multirun)  # not only shown
    if command == "train" and runs_job and any(o.startswith("hydra.run.dir=") and "${" not in o for o in overrides):
        # a folder named by hand, which another command may name too: held before Hydra writes there
        # (a default folder is new to the microsecond, and stamped by Hydra itself)
        from vae_cli.runs import claim_run_folder

        try:
            for shown_as, folder in folders:
                claim_run_folder(folder, shown_as)
        except UserError as e:
            fail(str(e))
    if _collector["paused"]:  # by console(), for the start-up: what exists now stays for the run
        _collector["paused"] = False
        gc.freeze()
        gc.enable()
    _sweep.update(jobs=0, failed=0)
    _run_hydra(args=args, args_parser=parser, task_function=_task(command), config_path=config_dir(),
               config_name=command)
    failed, jobs = _sweep["failed"], _sweep["jobs"]
    if multirun:
        from vae_cli.checks import sweep_jobs
        from vae_cli.sweep import failed_jobs

        in_folders = failed_jobs()  # read, so that no later sweep of this process reads this one's
        if jobs == 0:  # the jobs ran in a launcher's own processes (joblib): their folders say
            failed, jobs = in_folders, sweep_jobs(overrides, str(config_dir()))
    if failed:  # vae train's sweep summary says so itself (and exits 2) before this
        fail(f"{failed} of {jobs} sweep jobs failed (their errors are above)")

if __name__ == "__main__":
    console()
