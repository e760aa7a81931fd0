"""Helpers for tests that run infllm as a real process and interrupt it."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """preexec_fn for such processes: a job started in the background (a CI runner, `make test &`) inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt; the tests need what an interactive user gets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
