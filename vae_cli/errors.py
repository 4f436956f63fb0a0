"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message on one line and exits with 2.

    The message names the bad value and what is allowed, e.g.
    ``model.latent_dim=-3 is not allowed: expected a positive integer``.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
