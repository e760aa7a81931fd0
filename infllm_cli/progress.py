"""What the user sees on stderr while infllm works: phases, a live reading display, and one summary line.

Animated only when stderr is a terminal; otherwise one plain line per phase, so logs stay readable. `quiet`
silences everything but errors and what the user asked for (citations).

Whether stderr counts as a terminal is rich's call (`Console.is_terminal`), so its environment switches apply:
TTY_COMPATIBLE=1 or a non-empty FORCE_COLOR forces the live display (e.g. under a CI log viewer that renders
escapes), TTY_COMPATIBLE=0 forces plain lines. tests/test_display.py relies on these.

NO_COLOR (set and not empty, as no-color.org and rich read it) means no escape code at all: rich's own NO_COLOR
mode still writes dim text and moves the cursor, so here rich gets no colour system and, in a terminal, the
reading line is redrawn with a carriage return instead of rich's live bar.

A stream (stdin) has no known length: its display shows tokens read and the rate, never a total or an ETA.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from infllm.reporting import Reporter, memory_line

STREAM_LINE_TOKENS = 1_000_000  # in a log, a stream's line comes at 2x the tokens of the last, at most this apart


def reading_status(done: int, total: int | None, rate: float, memory: str) -> str:
    """One line of reading progress; with no total (a stream), no share read and no ETA."""
    if total is None:
        text = f"read {done:,} tokens, {rate:,.0f} tok/s"
    else:
        eta = (total - done) / max(rate, 1e-9)
        text = f"read {done:,}/{total:,} tokens, {rate:,.0f} tok/s, ETA {eta:,.0f} s"
    return f"{text}, {memory}" if memory else text


def for_terminal(text: str) -> str:
    """Text as it may reach a terminal: every character that is not printable (an escape sequence's ESC, a newline,
    a right-to-left override, the undecodable bytes of a file name) written as its Python escape, so a name can
    neither drive the terminal nor break a line in two."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def discard(stream) -> None:
    """Point a stream's file descriptor at /dev/null: what is still written to it (the last error line, Python's
    flush at exit) goes nowhere instead of failing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's buffer): nothing to redirect
        pass


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """The reader of stderr went away (`2>&1 | head -1`): show nothing more, and let the run go on, since its
        answer may still be wanted on stdout (where a reader gone ends the run quietly). rich would exit 1."""
        self.quiet = True
        discard(self.file)


class Display(Reporter):
    """Every line goes through rich as plain text (never parsed as markup: a file named `notes [draft].txt` shows as
    it is) and through for_terminal."""

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.no_color = os.environ.get("NO_COLOR", "") != ""
        self.console = _Console(file=self.stream, highlight=False, color_system=None if self.no_color else "auto")
        self.live = self.console.is_terminal and not quiet

    def phase(self, text: str) -> None:
        if not self.quiet:
            self._line(text, "infllm:", "dim")

    def always(self, text: str) -> None:
        """Output the user asked for on stderr (citations): shown even with -q."""
        self._line(text)

    def error(self, text: str) -> None:
        """A failure the run goes on after (one source of --each): shown even with -q, as guarded shows the last."""
        self._line(text, "infllm: error:")

    def warn(self, text: str) -> None:
        self._line(text, "infllm: warning:", "yellow")

    def _line(self, text: str, label: str = "", style: str = "") -> None:
        line = Text(for_terminal(text))
        if label:
            line = Text.assemble((label, style), " ", line)
        self.console.print(line, soft_wrap=True)

    @contextmanager
    def reading(self, total: int | None, block_store_bytes: Callable[[], int]) -> Iterator[Callable[[int], None]]:
        """Yields update(done): live in a terminal; in a log, a line every ~10% (a stream: at doubling counts).
        total is None for a stream."""
        start = time.perf_counter()

        def status(done: int) -> str:
            rate = done / max(time.perf_counter() - start, 1e-9)
            return reading_status(done, total, rate, memory_line(block_store_bytes()))

        if self.live and not self.no_color:
            with self._bar(total, start, block_store_bytes) as update:
                yield update
        elif self.live:
            with self._redrawn_line(status) as update:
                yield update
        else:
            yield self._log_lines(total, status)

    @contextmanager
    def _bar(self, total: int | None, start: float, block_store_bytes) -> Iterator[Callable[[int], None]]:
        count = "{task.completed:,} tok" if total is None else "{task.completed:,}/{task.total:,} tok"
        columns = [TextColumn("reading"), BarColumn(), TextColumn(count), TextColumn("{task.fields[rate]}"),
                   TextColumn("{task.fields[mem]}")]
        if total is not None:
            columns.insert(4, TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("read", total=total, rate="", mem="")

            def update(done: int) -> None:
                rate = done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=done, rate=f"{rate:,.0f} tok/s", mem=memory_line(block_store_bytes()))

            yield update

    @contextmanager
    def _redrawn_line(self, status: Callable[[int], str]) -> Iterator[Callable[[int], None]]:
        shown = [0]
        width = max(20, self.console.width - 1)  # a wrapped line could not be redrawn in place

        def update(done: int) -> None:
            line = status(done)[:width]
            self.stream.write("\r" + line.ljust(shown[0]))
            self.stream.flush()
            shown[0] = len(line)

        try:
            yield update
        finally:
            if shown[0]:  # clear it, as rich's transient bar does
                self.stream.write("\r" + " " * shown[0] + "\r")
                self.stream.flush()

    def _log_lines(self, total: int | None, status: Callable[[int], str]) -> Callable[[int], None]:
        next_mark = [0.1 * total if total is not None else 0]

        def update(done: int) -> None:
            if self.quiet or done < next_mark[0]:
                return
            next_mark[0] = done + (0.1 * total if total is not None else min(max(done, 1), STREAM_LINE_TOKENS))
            self.phase(status(done))

        return update
