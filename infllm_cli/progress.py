"""What the user sees on stderr while infllm works: phases, a live reading bar, and one summary line.

Animated (rich) only when stderr is a terminal; otherwise one plain line per phase, so logs stay readable.
`quiet` silences everything but errors. rich honours NO_COLOR by itself.

Whether stderr counts as a terminal is rich's call (`Console.is_terminal`), so its environment switches apply:
TTY_COMPATIBLE=1 or a non-empty FORCE_COLOR forces the live display (e.g. under a CI log viewer that renders
escapes), TTY_COMPATIBLE=0 forces plain lines. tests/test_display.py relies on these.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def memory_line(block_store_bytes: int = 0) -> str:
    parts = [f"RSS {_rss_mb():,.0f} MB"]
    if torch.cuda.is_available():
        used = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))  # all GPUs of a map
        parts.append(f"GPU {used / 2**20:,.0f} MB")
    if block_store_bytes:
        parts.append(f"memory {block_store_bytes / 2**20:,.0f} MB")
    return ", ".join(parts)


class Display:
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.console = Console(file=self.stream, highlight=False)
        self.live = self.console.is_terminal and not quiet

    def phase(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]infllm:[/dim] {text}", soft_wrap=True)

    def always(self, text: str) -> None:
        """Output the user asked for on stderr (citations): shown even with -q."""
        self.console.print(text, soft_wrap=True, markup=False)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]infllm: warning:[/yellow] {text}", soft_wrap=True)

    @contextmanager
    def reading(self, total: int, block_store_bytes):
        """Yields update(done): a live bar with tokens/s, ETA and memory; plain lines every ~10% otherwise."""
        start = time.perf_counter()
        if self.live:
            columns = (TextColumn("reading"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} tok"),
                       TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[mem]}"))
            with Progress(*columns, console=self.console, transient=True) as bar:
                task = bar.add_task("read", total=total, rate="", mem="")

                def update(done: int) -> None:
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=done, rate=f"{rate:,.0f} tok/s", mem=memory_line(block_store_bytes()))

                yield update
            return
        next_mark = [0.1]

        def update_plain(done: int) -> None:
            if self.quiet or done < next_mark[0] * total:
                return
            next_mark[0] = done / total + 0.1
            rate = done / max(time.perf_counter() - start, 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            self.phase(f"read {done:,}/{total:,} tokens, {rate:,.0f} tok/s, ETA {eta:,.0f} s, "
                       f"{memory_line(block_store_bytes())}")

        yield update_plain
