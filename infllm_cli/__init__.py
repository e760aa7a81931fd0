"""The `infllm` command line.

Starting takes seconds (torch and transformers import). A Ctrl-C then would come before any of infllm's code
can catch it and print Python's traceback, so when this package is imported by the `infllm` program itself
(`infllm ...` or `python -m infllm_cli ...`) a Ctrl-C until a command starts gives the usual line and exit
code at once. `guarded` (infllm_cli/app.py) hands SIGINT back to Python as the command starts. Imported by
anything else (tests, other programs), this changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130  # infllm.errors.EXIT_INTERRUPTED; not imported, to keep this module free of imports


def _interrupted_while_starting(signum, frame) -> None:
    try:
        sys.stderr.write("infllm: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_INTERRUPTED)


def _started_as_the_program() -> bool:
    # `python -m infllm_cli`: argv[0] is "-m" while the package is imported; the script: its path, ".../infllm".
    program = sys.argv[0] if sys.argv else ""
    return program == "-m" or os.path.basename(program) == "infllm"


def restore_interrupts() -> None:
    """From now on Ctrl-C raises KeyboardInterrupt again (for `guarded` to report)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


AS_PROGRAM = _started_as_the_program()  # known only now: runpy sets argv[0] to the module's path next

if AS_PROGRAM and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    try:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    except ValueError:  # not the main thread: leave SIGINT alone
        pass
