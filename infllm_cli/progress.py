"""What the user sees on stderr while infllm works: phases, a live reading display, and one summary line.

Animated only when stderr is a terminal that can move its cursor (not TERM=dumb); otherwise plain lines, one per
phase and, while reading or answering, one at most every LOG_INTERVAL_S, so logs stay readable. Progress is drawn
by time, not by count: the first update shows at once, the rate and the ETA from the next one on. `quiet`
silences everything but errors and what the user asked for (citations).

Whether stderr counts as a terminal is rich's call (`Console.is_terminal`), so its environment switches apply:
TTY_COMPATIBLE=1 or a non-empty FORCE_COLOR forces the live display (e.g. under a CI log viewer that renders
escapes), TTY_COMPATIBLE=0 forces plain lines. tests/test_display.py relies on these.

NO_COLOR (set and not empty, as no-color.org and rich read it) means no escape code at all: rich's own NO_COLOR
mode still writes dim text and moves the cursor, so here rich gets no colour system and, in a terminal, the
reading line is redrawn with a carriage return instead of rich's live bar.

A stream (stdin) has no known length: its display shows tokens read and the rate, never a total or an ETA.

While answering, the answer streaming to a terminal is its own progress; when it does not (stdout redirected, or
held for --json), the tokens generated so far are counted on stderr instead.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.text import Text

from infllm.reporting import Reporter

LIVE_INTERVAL_S = 0.5  # a live display is redrawn at most this often
LOG_INTERVAL_S = 5.0  # in a log (or TERM=dumb), a progress line at most this often


def reading_status(done: int, total: int | None, rate: float | None, memory: str) -> str:
    """One line of reading progress: the rate and the ETA once a rate is known (rate None: not yet); with no total
    (a stream), no share read and no ETA."""
    parts = [f"read {done:,} tokens" if total is None else f"read {done:,}/{total:,} tokens"]
    if rate:
        parts.append(f"{rate:,.0f} tok/s")
        if total is not None:
            parts.append(f"ETA {max(total - done, 0) / rate:,.0f} s")
    return ", ".join(parts + ([memory] if memory else []))


def answering_status(tokens: int, rate: float | None) -> str:
    text = f"answering: {tokens:,} token{'s' if tokens != 1 else ''}"
    return f"{text}, {rate:,.1f} tok/s" if rate else text


class Rate:
    """Units a second since the first update, None until a second one comes. Not since the start: the first
    update comes after one-off costs (kernel set-up, the prompt's opening, the first token) that would skew a
    mean, and so the ETA, for a long while."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.first: tuple[float, int] | None = None

    def __call__(self, done: int) -> float | None:
        now = self.clock()
        if self.first is None:
            self.first = (now, done)
            return None
        since, start = self.first
        return (done - start) / (now - since) if now > since and done > start else None


class Ticker:
    """Whether a progress update is shown: the first always, then one at most every `interval` seconds."""

    def __init__(self, clock: Callable[[], float], interval: float):
        self.clock, self.interval = clock, interval
        self.last: float | None = None

    def due(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        return True


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
    it is) and through for_terminal.

    answer_shown: the answer streams to a terminal as it is generated, so it is its own progress; otherwise (stdout
    redirected, or the answer held for --json) the count of tokens generated is shown while answering.
    clock: where rates and the timing of updates come from (tests pass a fake one)."""

    def __init__(self, quiet: bool = False, stream=None, *, answer_shown: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.answer_shown = answer_shown
        self.clock = clock
        self.no_color = os.environ.get("NO_COLOR", "") != ""
        self.console = _Console(file=self.stream, highlight=False, color_system=None if self.no_color else "auto")
        # TERM=dumb cannot move the cursor: rich would draw nothing until the end there, so it gets plain lines.
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal and not quiet

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
        if not self.quiet:
            self._line(text, "infllm: warning:", "yellow")

    def _line(self, text: str, label: str = "", style: str = "") -> None:
        line = Text(for_terminal(text))
        if label:
            line = Text.assemble((label, style), " ", line)
        self.console.print(line, soft_wrap=True)

    @contextmanager
    def reading_with(self, total: int | None, memory: Callable[[], str]) -> Iterator[Callable[[int], None]]:
        """Yields update(done); total is None for a stream."""
        rate = Rate(self.clock)

        def status(done: int) -> str:
            return reading_status(done, total, rate(done), memory())

        with self._progress(status, "reading", total) as update:
            yield update

    @contextmanager
    def answering(self) -> Iterator[Callable[[int], None]]:
        """Yields update(tokens generated): shown only when the answer itself is not (answer_shown)."""
        if self.answer_shown:
            yield lambda tokens: None
            return
        rate = Rate(self.clock)
        with self._progress(lambda tokens: answering_status(tokens, rate(tokens))) as update:
            yield update

    @contextmanager
    def _progress(self, status: Callable[[int], str], label: str = "", total: int | None = None,
                  ) -> Iterator[Callable[[int], None]]:
        """Yields update(done), drawn by time, not by count: the first update at once (the first call of `status`,
        which a Rate relies on), then at most every LIVE_INTERVAL_S in a terminal (rich's bar; with NO_COLOR a line
        redrawn in place) or LOG_INTERVAL_S as plain lines elsewhere. With a label, the terminal's display is a bar
        (moving even with no total, for a stream)."""
        if self.quiet:
            yield lambda done: None
            return
        ticker = Ticker(self.clock, LIVE_INTERVAL_S if self.live else LOG_INTERVAL_S)

        def when_due(draw: Callable[[int], None]) -> Callable[[int], None]:
            def update(done: int) -> None:
                if ticker.due():
                    draw(done)
            return update

        if self.live and not self.no_color:
            with self._bar(label, total) as bar:
                yield when_due(lambda done: bar(done, status(done)))
        elif self.live:
            with self._redrawn_line() as line:
                yield when_due(lambda done: line(status(done)))
        else:
            yield when_due(lambda done: self.phase(status(done)))

    @contextmanager
    def _bar(self, label: str, total: int | None) -> Iterator[Callable[[int, str], None]]:
        columns = [TextColumn("{task.fields[status]}", markup=False)]
        if label:
            columns[:0] = [TextColumn(label, markup=False), BarColumn()]
        # rich would catch what is written to stdout meanwhile (the answer) and print it on stderr, above the bar.
        with Progress(*columns, console=self.console, transient=True, redirect_stdout=False,
                      redirect_stderr=False) as bar:
            task = bar.add_task(label, total=total, status="")
            yield lambda done, status: bar.update(task, completed=done, status=for_terminal(status), refresh=True)

    @contextmanager
    def _redrawn_line(self) -> Iterator[Callable[[str], None]]:
        shown = [0]
        width = max(20, self.console.width - 1)  # a wrapped line could not be redrawn in place

        def draw(status: str) -> None:
            line = status[:width]
            self.stream.write("\r" + line.ljust(shown[0]))
            self.stream.flush()
            shown[0] = len(line)

        try:
            yield draw
        finally:
            if shown[0]:  # clear it, as rich's transient bar does
                self.stream.write("\r" + " " * shown[0] + "\r")
                self.stream.flush()
