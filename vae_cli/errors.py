"""The one exception type that means "the user asked for something we cannot do"."""

import os
import re


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message on one line and exits with 2.

    The message names the bad value and what is allowed, e.g.
    ``model.latent_dim=-3 is not allowed: expected a positive integer``.
    """


class SettingsClash(ValueError):
    """A ``check_settings`` refusal whose message names the command line's own settings (e.g.
    ``posterior=iaf is not allowed with model=ladder``), so it is not put under the node's key."""


class NewRunsOnly(ValueError):
    """A ``check_settings`` refusal that guards the settings of a new run (a folder's settings with
    a named dataset, a run that trains nothing, ...). A saved config that breaks it was trained by an
    earlier version, which ignored the setting, so that checkpoint still loads."""


class NewRunsOnlyClash(SettingsClash, NewRunsOnly):
    """Both: names the command line's own settings, and guards new runs only."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type;
    with ``limit``, at most that many characters, cut at a word and marked with "..."."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if limit is None or len(line) <= limit:
        return line
    cut = line[: limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:") + "..."


def all_lines(error: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (lines joined by " / ", spaces collapsed), at most
    ``limit`` characters: for messages whose first line is a heading ("Error downloading x.gz:")."""
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    text = " / ".join(line for line in lines if line) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def raised_in(error: BaseException, function: str) -> bool:
    """Whether the error was raised in a function of that name (the innermost frame of its traceback)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == function


_ALLOCATE = re.compile(r"allocate ([0-9.]+) (bytes|[KMGT]i?B)", re.IGNORECASE)


def out_of_memory(error: BaseException) -> bool:
    """True for torch's (and Python's) failures to allocate memory, on a CPU or a GPU."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def memory_message(error: BaseException, settings: list[str]) -> str:
    """One line for an allocation that failed: how much was asked for, and the numeric settings given."""
    found = _ALLOCATE.search(str(error))
    size = ""
    if found:
        amount, unit = float(found.group(1)), found.group(2)
        size = f" (tried to allocate {amount / 1e9:.1f} GB)" if unit == "bytes" else \
            f" (tried to allocate {amount:g} {unit})"
    given = sizes_given(settings)
    where = f" with {' '.join(given)}" if given else ""
    return (f"out of memory{size}{where}: lower the sizes (n, steps, pairs, k, chunk, chains, samples, "
            "batch sizes, the model's widths)")


def disk_full(error: BaseException) -> bool:
    """True for a write that found no room: a full disk or a used-up quota. (The checkpoints and
    caches are serialized in memory before they are written, so this is an OSError there too.)"""
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_message(error: OSError) -> str:
    """One line for a write that found no room, naming the file where the error does."""
    what = (error.strerror or "no space left on device").lower()
    where = f" writing {error.filename}" if error.filename else ""
    return f"{what}{where}: free some space, or write elsewhere (hydra.run.dir=..., out=...)"


def no_access(error: BaseException) -> bool:
    """True for a file or folder the user may not read or write: permissions, a read-only file system."""
    import errno

    return isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def access_message(error: OSError, paths: dict[str, str] | None = None) -> str:
    """One line for a file or folder that could not be read or written, naming it where the error
    does, and the setting it lies under among ``paths`` (setting -> the path it gives), if any."""
    import errno
    from pathlib import Path

    what = (error.strerror or "permission denied").lower()
    where = f": {error.filename}" if error.filename else ""
    fix = "" if error.errno == errno.EROFS else "give yourself access to it, or "
    if error.filename:
        file = Path(os.fsdecode(error.filename)).absolute()
        for key, path in (paths or {}).items():
            if file == Path(path).absolute() or Path(path).absolute() in file.parents:
                return f"{what}{where}: {fix}choose another {key}="
    return f"{what}{where}: {fix}work elsewhere (hydra.run.dir=..., out=..., run=..., data_dir=...)"


def sizes_given(settings: list[str]) -> list[str]:
    """The settings that hold a large whole number (10000 or more, also inside a list such as
    model.encoder.channels=[1000000,64]); else every whole-number one (n=64), seeds left out."""
    counts = [s for s in settings if "seed" not in s.partition("=")[0] and re.search(r"\d", s.partition("=")[2])
              and re.fullmatch(r"[\d\s,\[\]]+", s.partition("=")[2])]
    large = [s for s in counts if re.search(r"\d{5,}", s.partition("=")[2])]
    return large or counts


def available_memory(device: object = None) -> int | None:
    """Bytes free for a new allocation: a GPU's total memory, or the host's available memory
    (MemAvailable, else its physical memory); None where it cannot be read."""
    import os

    import torch

    try:
        if getattr(device, "type", None) == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


