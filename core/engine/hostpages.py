"""Where the block stores' K/V pages live on the host: RAM up to a budget, then memory-mapped files (the disk tier).

The block store grows with the text and is what outgrows a machine's RAM (an 8-bit default-model store is ~13 GB
at 1M tokens). One `HostPages` serves every layer of an engine: pages are carved out of RAM slabs (page-locked on a
GPU run, `pinned_slab`) while the RAM they take stays within `budget`; later pages are carved out of
files in a spill directory, mapped shared, so the kernel writes them back to disk and drops them from RAM under
pressure and reads them again when a block is gathered. Blocks are read through the same views either way (and
through the GPU's block cache on a GPU run), so the tier changes speed, never values.

The budget is set before each read (`infllm.runtime.resources` computes it from the RAM available and
INFLLM_MEMORY_LIMIT_MB). Spill files are unlinked as soon as they are mapped: nothing is left on disk when the
process ends, however it ends, and the space returns once the pages are dropped. Their space is allocated before
they are mapped: a write into a mapped hole on a full disk kills the process (SIGBUS), where a failed allocation
is one error line.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import tempfile
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from infllm.errors import ResourceError

SLAB_BYTES = 64 * 2**20  # pages are carved from slabs of this size: RAM allocations, or spill files allocated whole
_ALIGN = 4096  # page offsets inside a slab: the OS page, so a block page never shares one with another


class Slabs:
    """Pages carved one after another out of large uint8 slabs that `make(nbytes)` allocates.

    Unpinned RAM pages come from slabs too: allocated one by one, a read's 16-block pages were interleaved on the
    heap with its temporaries, and the heap kept the freed temporaries' memory resident between them (a 32K read
    added ~1,000 MB of anonymous memory with pages allocated one by one, ~740 with slabs: docs/benchmarks.md "The
    disk tier"); a slab is one allocation of its own.

    `make_ahead` starts the next slab on a thread of its own while the current one is carved: a pinned slab is
    touched and registered (0.90 s of an 8B shape's 12 s read at 128K, docs/benchmarks.md "Where an 8B read's host
    time goes"), work the thread that launches the kernels need not wait for."""

    def __init__(self, make: Callable[[int], torch.Tensor]):
        self.make = make
        self.slabs: list[torch.Tensor] = []  # uint8 [bytes] each, the last being carved
        self._used = 0  # bytes of the last slab handed out (aligned)
        self._ahead: tuple[int, Future] | None = None  # (bytes, the slab being made on the slab thread)
        self.reserved = 0  # bytes of all slabs, the one being made ahead included
        self.given = 0  # bytes of all pages handed out

    def room(self) -> int:
        """Bytes the last slab can still hand out without a new one."""
        return self.slabs[-1].numel() - self._used if self.slabs else 0

    def take(self, nbytes: int, slab_bytes: int) -> torch.Tensor:
        """uint8 [nbytes] from the last slab, or from a new one: the slab made ahead if it is large enough, else
        one of max(slab_bytes, nbytes)."""
        if not self.slabs or nbytes > self.room():
            if self._ahead is not None and self._ahead[0] >= nbytes:
                slab = self._ahead[1].result()
                self._ahead = None
            else:
                slab = self.make(max(slab_bytes, nbytes))
                self.reserved += slab.numel()
            self.slabs.append(slab)
            self._used = 0
        out = self.slabs[-1][self._used : self._used + nbytes]
        self.given += nbytes
        self._used = min(self.slabs[-1].numel(), self._used + -(-nbytes // _ALIGN) * _ALIGN)
        return out

    def make_ahead(self, nbytes: int) -> None:
        """Start making a slab of `nbytes` on the slab thread, unless one is already on its way; the next `take`
        that needs a new slab takes it. Its bytes count as reserved from now on."""
        if self._ahead is None:
            self._ahead = (nbytes, _slab_thread().submit(self.make, nbytes))
            self.reserved += nbytes


@functools.cache
def _slab_thread() -> ThreadPoolExecutor:
    """The one thread that makes slabs ahead, for every engine of the process (slabs come seconds apart)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="infllm-slabs")


def spill_file(directory: Path, nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] backed by a new file in `directory`: allocated whole, mapped shared, already unlinked."""
    path = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="infllm-spill-", dir=directory)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        # shared: writes go to the file, so its pages can leave RAM (a private mapping would be anonymous memory)
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    except OSError as err:
        raise ResourceError(f"the disk tier cannot grow in {directory} ({err.strerror or err}): the memory passed "
                            "the RAM budget; free space there, set INFLLM_SPILL_DIR to another disk, or read less"
                            ) from None
    finally:
        if path is not None:
            os.unlink(path)  # the mapping keeps the file alive until its pages are dropped


def pinned_slab(nbytes: int, devices: Sequence[torch.device] = ()) -> torch.Tensor:
    """uint8 [nbytes] of page-locked host memory for a GPU run: an anonymous mapping asked for 2 MB pages, touched,
    then registered with CUDA in place. The CUDA host allocator's pinned memory came at 1.3-2.1 GB/s on an H100 host
    and held the driver meanwhile; mapped, touched and registered it came at 15-23 GB/s with 2 MB pages, 8-9 with
    4 KB pages (benchmarks/host_memory.py). Falls back to the allocator where mapping or registering fails.

    The registration is undone when the last view of the slab is gone, before the mapping is released: the ctypes
    array the tensor is made over keeps the mapping alive, and a finalizer on that array unregisters it after
    `devices` (those its pages are copied to and from; none: the current one) have done their queued work."""
    allocated = lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # noqa: E731 (the fallback)
    try:
        area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = type("PinnedArea", (ctypes.c_uint8 * nbytes,), {}).from_buffer(area)
    except (OSError, AttributeError, ValueError):  # no anonymous mappings here (not a POSIX system)
        return allocated()
    try:
        area.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # 4 KB pages: registering them is slower, still several times the allocator's speed
    slab = torch.frombuffer(view, dtype=torch.uint8)
    slab.fill_(0)  # touch every page first: registering then only locks them
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(slab.data_ptr(), nbytes, 0)) != 0:
        _take_cuda_error()
        return allocated()
    weakref.finalize(view, _unregister, cudart, slab.data_ptr(), tuple(devices)).atexit = False
    return slab


def _take_cuda_error() -> None:
    """A failed CUDA runtime call is also the runtime's last error, which torch's next kernel launch check would
    report as that kernel's (torch binds no cudaGetLastError): a launch here takes it."""
    try:
        torch.empty(1, device="cuda").fill_(1)  # an elementwise kernel, checked as launched
    except RuntimeError:
        pass


def _unregister(cudart, ptr: int, devices: tuple[torch.device, ...]) -> None:
    """Undo `pinned_slab`'s registration once its devices are done with the slab: unlike the allocator's pinned
    memory, which is only reused after the copies recorded on it finish, a registered slab is unmapped right after
    this, and an asynchronous copy to or from it may still be queued (an engine dropped right after a feed). Only
    the slab's devices: synchronizing another GPU would start a CUDA context there."""
    for device in devices or (None,):
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:  # a stream being captured into a graph: nothing of it has run yet
            pass
    cudart.cudaHostUnregister(ptr)


class HostPages:
    """K/V pages for the block stores of one engine: RAM slabs while `budget` allows, then spill-file slabs.

    budget: bytes of RAM the slabs may take (None: no limit, nothing spilled); it may change between reads. A RAM
    slab is as large as the budget still allows, up to SLAB_BYTES; its untouched tail takes no memory (the OS gives
    pages on first write), except a pinned slab's (a GPU run), which is touched and locked whole. Pages on another
    device than the CPU (a store kept on the compute device) are never budgeted.
    """

    def __init__(self, pin: bool, budget: int | None = None, spill_dir: Path | None = None,
                 devices: Sequence[torch.device] = ()):
        self.pin = pin
        self.budget = budget
        self.spill_dir = spill_dir
        self.devices = tuple(devices)  # the CUDA devices pinned pages are copied to and from
        self._ram = Slabs(functools.partial(pinned_slab, devices=self.devices) if pin
                          else lambda n: torch.empty(n, dtype=torch.uint8))
        # Through a weak reference: a lambda over self would be a reference cycle, and the slabs of a store the
        # engine dropped (a reset: the next text) would stay in RAM, locked on a GPU run, until Python's cycle
        # collector happened to run.
        me = weakref.ref(self)
        self._spill = Slabs(lambda n: spill_file(me().spill_dir, n))

    @property
    def ram_bytes(self) -> int:
        """RAM the slabs reserve (what the budget bounds)."""
        return self._ram.reserved

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the pages in the disk tier."""
        return self._spill.given

    @property
    def spill_slabs(self) -> list[torch.Tensor]:
        """The spill files' mappings, uint8 [bytes] each (benchmarks/disk_tier.py pushes them out of RAM)."""
        return self._spill.slabs

    def page(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized page [*shape] of `dtype`: on `device`, in host RAM or in a spill file."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        unbounded = self.budget is None or self.spill_dir is None
        if unbounded:
            raw = self._ram.take(nbytes, SLAB_BYTES)
        elif nbytes <= self._ram.room() or self._ram.reserved + nbytes <= self.budget:
            raw = self._ram.take(nbytes, min(SLAB_BYTES, self.budget - self._ram.reserved))
        else:
            raw = self._spill.take(nbytes, SLAB_BYTES)
        # Only a pinned slab is worth making ahead (an unpinned one is a mapping whose pages come on first write),
        # and only one the budget has room for.
        if self.pin and (unbounded or self._ram.reserved + SLAB_BYTES <= self.budget):
            self._ram.make_ahead(SLAB_BYTES)
        return raw.view(dtype).view(shape)

