"""Where the library says what it is doing: phases, warnings and reading progress.

The library never prints. A `Reporter` receives what a user might want to see while a long read runs; the default
one keeps quiet, the command line's (`infllm.cli.progress.Display`) draws it on stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Reporter:
    """Says nothing. Subclass it to show progress."""

    def phase(self, text: str) -> None:
        """A step of the run begins (loading the model, extracting text, answering...)."""

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the run."""

    def reading(self, total: int | None, block_store_bytes: Callable[[], int]):
        """A context yielding update(tokens read so far) for the length of a read; total is None for a stream.
        Updates come as each prefill step passes the model's layers, many a second: drawing them is the
        reporter's choice. What it may show of memory is this process's (`memory_line`)."""
        return self.reading_with(total, lambda: memory_line(block_store_bytes()))

    @contextmanager
    def reading_with(self, total: int | None, memory: Callable[[], str]) -> Iterator[Callable[[int], None]]:
        """`reading`, with the memory line given: a client of `infllm serve` shows the server's."""
        yield lambda done: None

    @contextmanager
    def answering(self) -> Iterator[Callable[[int], None]]:
        """Yields update(tokens generated so far) while an answer is generated, once per token."""
        yield lambda tokens: None


def memory_line(block_store_bytes: int = 0) -> str:
    """The process's memory now, for progress lines: RSS, GPU memory allocated, and the block store's size."""
    import torch

    from infllm.runtime.resources import rss_mb

    rss = rss_mb()
    parts = [] if rss is None else [f"RSS {rss:,.0f} MB"]
    if torch.cuda.is_available():
        used = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))  # all GPUs of a map
        parts.append(f"GPU {used / 2**20:,.0f} MB")
    if block_store_bytes:
        parts.append(f"memory {block_store_bytes / 2**20:,.0f} MB")
    return ", ".join(parts)
