"""The project's messages: one ``vae_cli`` logger, a line on the terminal and a record in the run's log.

Run events (data fetched, files skipped, caches rebuilt, the final report) go through
``logging.getLogger("vae_cli")``. Its own handler prints them as the command always has,
``vae: message`` on stderr (or a plain line on stdout for records logged with
``extra=STDOUT``); they also propagate to the root logger, where Hydra's job logging keeps its
file handler (``RUN/train.log`` for ``vae train``). ``attach_run_log`` makes Lightning's loggers
reach that file as well. On the terminal Lightning shows its warnings and errors only: its INFO
lines (the GPU/TPU banner, tips, the model summary) go to the log file, or also to the terminal
with ``vae train verbose=true`` (``lightning_verbose``).
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings

log = logging.getLogger("vae_cli")

# Lightning's loggers (both package names, and Fabric's): they print through handlers of their own.
LIGHTNING = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")
STDOUT = {"stdout": True}           # extra=STDOUT: a plain line on stdout (the final report)
FILE_ONLY = {"terminal": False}     # extra=FILE_ONLY: the log file only (the terminal has it already)


def shell(path: object) -> str:
    """A path as a command line pasted into a shell needs it (a folder with a space in its name)."""
    return shlex.quote(str(path))


def say(line: str, stream=None) -> None:
    """One line on stderr (or ``stream``) in a single write: print() writes the text and its newline
    separately (stderr to a pipe is write-through), and a Ctrl-C between the two left
    ``vae: interrupted`` at the end of the half-written line."""
    stream = stream or sys.stderr
    if not line.isprintable():  # a file name that is no UTF-8 ('bad\udcff.png'): escaped, as Python's stderr does
        line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    stream.write(line + "\n")
    stream.flush()


class _Terminal(logging.Handler):
    """Prints vae_cli records on the terminal: ``vae: message`` on stderr, or plain on stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "terminal", True) is False:
            return
        try:
            if getattr(record, "stdout", False):
                say(record.getMessage(), sys.stdout)
            else:
                say(f"vae: {record.getMessage()}")
        except Exception:  # a closed stream must not end the run
            self.handleError(record)


class _Drop(logging.Filter):
    """Keeps records from the named loggers off a terminal handler (they reach the terminal their own way)."""

    def __init__(self, names: tuple[str, ...], words: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.names, self.words = names, words

    def filter(self, record: logging.LogRecord) -> bool:
        if any(record.name == n or record.name.startswith(n + ".") for n in self.names):
            return False
        return not (self.words and any(w in record.getMessage() for w in self.words))


class _Quiet(logging.Filter):
    """On a terminal handler of Lightning's: its INFO lines only when verbose.

    They are banners ("GPU available: ...", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES"), a tip
    advertising another logging product, the model summary and "`Trainer.fit` stopped": what the
    user did not ask for. The log file keeps them (file handlers get no such filter). The Tensor
    Cores advice never shows: vae-cli's answer to it is a setting (matmul_precision), not the
    torch call it names.
    """

    def __init__(self) -> None:
        super().__init__()
        self.verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Tensor Cores" in record.getMessage():
            return False
        # the summary table when asked for (verbose, or trainer.enable_model_summary=true): show_model_summary
        asked = _summary["show"] and record.name.endswith("model_summary")
        return self.verbose or asked or record.levelno >= logging.WARNING


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is at the time of each record."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _terminal_handler() -> _Terminal:
    for h in log.handlers:
        if isinstance(h, _Terminal):
            return h
    h = _Terminal()
    log.addHandler(h)
    return h


def _is_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler)


def attach_run_log() -> None:
    """Route the project's and Lightning's records to the file handlers Hydra put on the root logger.

    Called at the start of every command, after Hydra configured logging. The terminal is not
    made noisier: root's non-file handlers (Hydra's console) drop these records, and Lightning's
    own stderr handler drops its "Detected KeyboardInterrupt" line (the CLI prints one line of its own).
    """
    log.disabled = False  # a dictConfig with disable_existing_loggers would have switched it off
    log.setLevel(logging.INFO)
    log.propagate = True
    _terminal_handler()
    ours = ("vae_cli", *LIGHTNING)
    for h in logging.getLogger().handlers:
        if _is_file(h):  # a file name that is no UTF-8 (bad\xff.png, skipped): written escaped, as on stderr,
            h.errors = "backslashreplace"  # not a "--- Logging error ---" traceback and a lost line
            if h.stream is not None and hasattr(h.stream, "reconfigure"):
                h.stream.reconfigure(errors="backslashreplace")
        # Hydra's console handler is a plain StreamHandler; other handlers on root (a file, pytest's
        # capture, a notebook's) keep seeing every record.
        if type(h) is logging.StreamHandler and not any(isinstance(f, _Drop) for f in h.filters):
            h.addFilter(_Drop(ours))
    for name in LIGHTNING:
        lg = logging.getLogger(name)
        lg.disabled = False
        lg.propagate = True  # Lightning sets it False when it installs its own stderr handler
        if not any(not _is_file(h) for h in lg.handlers):
            # Lightning installs that handler only when it is imported before Hydra configures
            # logging; otherwise its lines went to Hydra's console, which now drops them.
            lg.addHandler(_Stderr())
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.INFO)
        for h in lg.handlers:
            if not _is_file(h) and not any(isinstance(f, _Drop) for f in h.filters):
                h.addFilter(_Drop((), words=("KeyboardInterrupt",)))
    lightning_verbose(False)


_summary = {"show": False}


def show_model_summary(show: bool) -> None:
    """Whether Lightning's model summary table reaches the terminal (the log file always gets it)."""
    _summary["show"] = show


def lightning_verbose(verbose: bool) -> None:
    """Whether Lightning's INFO lines reach the terminal (they always reach the log file)."""
    for name in LIGHTNING:
        for h in logging.getLogger(name).handlers:
            if _is_file(h):
                continue
            quiet = next((f for f in h.filters if isinstance(f, _Quiet)), None)
            if quiet is None:
                quiet = _Quiet()
                h.addFilter(quiet)
            quiet.verbose = verbose


def _no_cuda_runtime_line(record: logging.LogRecord) -> bool:
    # torch's C++ builder (torch.compile on a CPU) says it found no CUDA runtime where CUDA_HOME is
    # set: true on a CPU machine, and nothing the user asked about
    return "No CUDA runtime is found" not in record.getMessage()


def quiet_warnings() -> None:
    """Python warnings of Lightning's (and a line of torch's) that are not the user's business, in this process."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_no_cuda_runtime_line)  # added once
    # Lightning's own deprecation chatter
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    # resume=RUN writes into its own checkpoints/ again: that is the point, not a hazard
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # a run that ends before its first validation has no val/elbo to pick a best checkpoint by: the
    # summary says so (val ELBO: none), in place of Lightning's hint to log the key
    warnings.filterwarnings("ignore", message=r".*\(monitor='val/elbo'\)` could not find the monitored key.*")
    # the model summary goes to train.log; its size estimate under mixed precision is Lightning's concern
    warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")
    # under DDP the epoch's sums are added up across processes before they are logged (VAEModule._log_epoch):
    # Lightning's advice to pass sync_dist=True would average values that are already the whole data's
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
    # torch.load(weights_only=True) of a file that is no checkpoint (a plain pickle given as ckpt=):
    # the one-line refusal says what it is
    warnings.filterwarnings("ignore", message=".*Detected pickle protocol .* in the checkpoint.*")


def join_run_log(log_file: str, verbose: bool, summary: bool) -> None:
    """In a process that ddp_spawn started (it unpickles the Trainer and never runs the command line,
    which sets these): the same warnings filtered, records to the run's log file, Lightning's INFO
    lines off the terminal unless verbose, the model summary there only when asked for."""
    quiet_warnings()
    handler = logging.FileHandler(log_file, errors="backslashreplace")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    attach_run_log()
    lightning_verbose(verbose)
    show_model_summary(summary)


def file_only(message: str, level: int = logging.INFO) -> None:
    """A record for the log file alone (the terminal shows the same thing its own way)."""
    log.log(level, message, extra=FILE_ONLY)


log.setLevel(logging.INFO)
_terminal_handler()
