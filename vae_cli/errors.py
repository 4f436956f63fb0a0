"""The one exception type that means "the user asked for something we cannot do"."""

import re


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message on one line and exits with 2.

    The message names the bad value and what is allowed, e.g.
    ``model.latent_dim=-3 is not allowed: expected a positive integer``.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    numbers = [s for s in settings if _is_count(s.partition("=")[2]) and "seed" not in s.partition("=")[0]]
    where = f" with {' '.join(numbers)}" if numbers else ""
    return (f"out of memory{size}{where}: lower the sizes (n, steps, pairs, k, chunk, chains, samples, "
            f"dataset.batch_size) or the model's")


def _is_count(text: str) -> bool:
    """A whole number as sizes are given (n=64, k=5000), not a rate or a flag."""
    return text.isdigit()
