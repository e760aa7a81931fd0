"""Where the block stores' K/V pages live on the host: RAM up to a budget, then memory-mapped files (the disk tier).

The block store grows with the text and is what outgrows a machine's RAM (an 8-bit default-model store is ~20 GB
at 1M tokens). One `HostPages` serves every layer of an engine: pages are allocated in RAM (pinned for a GPU
run) while the RAM they take stays within `budget`; later pages are carved out of files in a spill directory,
mapped shared, so the kernel writes them back to disk and drops them from RAM under pressure and reads them
again when a block is gathered. Blocks are read through the same views either way (and through the GPU's block
cache on a GPU run), so the tier changes speed, never values.

The budget is set before each read (`infllm.runtime.resources` computes it from the RAM available and
INFLLM_MEMORY_LIMIT_MB). Spill files are unlinked as soon as they are mapped: nothing is left on disk when the
process ends, however it ends, and the space returns once the pages are dropped. Their space is allocated before
they are mapped: a write into a mapped hole on a full disk kills the process (SIGBUS), where a failed allocation
is one error line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from infllm.errors import ResourceError

SEGMENT_BYTES = 64 * 2**20  # one spill file, allocated whole: pages are carved from it
_ALIGN = 4096  # page offsets inside a segment: the OS page, so a block page never shares one with another


class SpillFiles:
    """Pages carved out of memory-mapped, already unlinked files in `directory`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.segments: list[torch.Tensor] = []  # uint8 [bytes] per file mapped, the last being carved
        self._used = 0  # bytes of it handed out
        self.nbytes = 0  # bytes handed out in all

    def take(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes], backed by a file on disk."""
        if not self.segments or self._used + nbytes > self.segments[-1].numel():
            self.segments.append(self._map(max(SEGMENT_BYTES, nbytes)))
            self._used = 0
        out = self.segments[-1][self._used : self._used + nbytes]
        self._used += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes += nbytes
        return out

    def _map(self, nbytes: int) -> torch.Tensor:
        path = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="infllm-spill-", dir=self.directory)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
            # shared: writes go to the file, so its pages can leave RAM (a private mapping would be anonymous memory)
            return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        except OSError as err:
            raise ResourceError(f"the disk tier cannot grow in {self.directory} ({err.strerror or err}): the memory "
                                "passed the RAM budget; free space there, set INFLLM_SPILL_DIR to another disk, or "
                                "read less") from None
        finally:
            if path is not None:
                os.unlink(path)  # the mapping keeps the file alive until its pages are dropped


class HostPages:
    """K/V pages for the block stores of one engine: in RAM while `budget` allows, then in `SpillFiles`.

    budget: bytes of RAM the pages may take (None: no limit, nothing spilled); it may change between reads.
    Pages on another device than the CPU (a store kept on the compute device) are never budgeted.
    """

    def __init__(self, pin: bool, budget: int | None = None, spill_dir: Path | None = None):
        self.pin = pin
        self.budget = budget
        self.spill_dir = spill_dir
        self.ram_bytes = 0
        self._spill: SpillFiles | None = None

    @property
    def spilled_bytes(self) -> int:
        return self._spill.nbytes if self._spill is not None else 0

    def page(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized page [*shape] of `dtype`: on `device`, in host RAM or in a spill file."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        if self.budget is None or self.spill_dir is None or self.ram_bytes + nbytes <= self.budget:
            self.ram_bytes += nbytes
            # Pinning was measured at ~2 GB/s on a GPU host and holds the driver lock, so a background thread does
            # not hide it (benchmarks/host_memory.py; docs/benchmarks.md).
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        if self._spill is None:
            self._spill = SpillFiles(self.spill_dir)
        return self._spill.take(nbytes).view(dtype).view(shape)
