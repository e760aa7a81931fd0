"""Errors the engine raises for bad input, each carrying the process exit code the CLI reports.

The CLI turns any `InfllmError` into one line on stderr and `exit_code`; everything else is a bug.
The codes are part of the user-facing contract (README, `infllm --help`), so they never change meaning.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an unexpected exception (traceback only with INFLLM_DEBUG=1)
EXIT_USAGE = 2  # bad flags or arguments (also typer's own usage errors)
EXIT_INPUT = 3  # a source that cannot be read: missing, unreadable, binary, empty, no text layer, encrypted
EXIT_MODEL = 4  # a model that cannot be loaded or is not supported
EXIT_SNAPSHOT = 5  # a snapshot that is not ours, corrupt, or made with another model/settings
EXIT_RESOURCES = 6  # not enough memory (RAM or GPU) for the work asked
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells expect; SIGHUP and SIGTERM likewise give 129 and 143


class InfllmError(Exception):
    """A user-facing failure: `str(err)` is the one line shown, `exit_code` the process status."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:  # a code decided at run time: a batch's first failure, a worker's
            self.exit_code = exit_code


class UsageError(InfllmError):
    exit_code = EXIT_USAGE


class SourceError(InfllmError):
    exit_code = EXIT_INPUT


class ModelError(InfllmError):
    exit_code = EXIT_MODEL


class SnapshotError(InfllmError):
    exit_code = EXIT_SNAPSHOT


class ResourceError(InfllmError):
    exit_code = EXIT_RESOURCES


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (library messages often span several), or its type's name."""
    text = " ".join(str(err).split())
    if not text:
        return type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
