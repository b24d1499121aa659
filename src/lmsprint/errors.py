"""User-facing errors: one line that says what is wrong and how to fix it.

The CLI prints these without a traceback and exits with code 2. Anything else that escapes is a bug.
"""


class LmsprintError(Exception):
    """An error caused by the user's input (file, config value, checkpoint), not by lmsprint."""


class ConfigError(LmsprintError):
    """A config value or flag is invalid."""


class DataError(LmsprintError):
    """An input corpus, tokenizer or shard is missing, empty or corrupt."""


class CheckpointError(LmsprintError):
    """A run directory or checkpoint is missing, corrupt or does not match the run."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): a refusal quoted in one line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
