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


class Display(Reporter):
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.no_color = os.environ.get("NO_COLOR", "") != ""
        self.console = Console(file=self.stream, highlight=False, color_system=None if self.no_color else "auto")
        self.live = self.console.is_terminal and not quiet

    def phase(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]infllm:[/dim] {text}", soft_wrap=True)

    def always(self, text: str) -> None:
        """Output the user asked for on stderr (citations): shown even with -q."""
        self.console.print(text, soft_wrap=True, markup=False)

    def error(self, text: str) -> None:
        """A failure the run goes on after (one source of --each): shown even with -q, as guarded shows the last."""
        print(f"infllm: error: {text}", file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]infllm: warning:[/yellow] {text}", soft_wrap=True)

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
