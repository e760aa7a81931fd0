"""The disk tier: block-store pages past the RAM budget live in memory-mapped spill files, with the same values."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import threading
import weakref

import pytest
import torch

from infllm.config import EngineConfig
from infllm.engine.engine import Engine
from infllm.engine import hostpages
from infllm.engine.hostpages import SLAB_BYTES, HostPages, pinned_slab
from infllm.errors import ResourceError, UsageError
from infllm.runtime.resources import SPILL_LIMIT_ENV, check_memory, spill_limit_bytes, spill_room
from tiny_models import tiny_model

MB = 2**20
GIB = 1024 * MB
CPU = torch.device("cpu")


def _mapped_files(tensor: torch.Tensor) -> list[str]:
    """The /proc/self/maps entries (the file column) whose range holds the tensor's first byte."""
    address = tensor.data_ptr()
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                found.append(fields[5].strip() if len(fields) == 6 else "")
    return found


def test_pages_stay_in_ram_within_the_budget_then_go_to_unlinked_spill_files(tmp_path):
    host = HostPages(pin=False, budget=3 * 4096, spill_dir=tmp_path / "spill")
    in_ram = [host.page((1024,), torch.float32, CPU) for _ in range(3)]  # 4 KB each: the budget exactly
    spilled = [host.page((16, 64), torch.int8, CPU), host.page((256,), torch.float32, CPU)]
    assert host.ram_bytes == 3 * 4096 and host.spilled_bytes == 1024 + 1024  # a RAM slab as large as the budget
    for page in in_ram:
        assert not any("infllm-spill-" in f for f in _mapped_files(page))
    for page in spilled:
        (mapped,) = _mapped_files(page)
        assert "infllm-spill-" in mapped and mapped.endswith("(deleted)")  # unlinked as soon as it was mapped
    assert os.listdir(tmp_path / "spill") == []  # nothing left to clean up, however the process ends
    spilled[0].copy_(torch.arange(16 * 64).view(16, 64).to(torch.int8))
    spilled[1].fill_(2.5)
    assert spilled[0].flatten()[300].item() == 300 - 256 and spilled[1].sum().item() == 640  # no page overlaps
    assert spilled[1].data_ptr() % 4096 == 0


def test_pages_share_slabs_and_a_page_larger_than_a_slab_gets_its_own(tmp_path):
    for budget, spill_dir in ((None, None), (0, tmp_path)):  # RAM slabs, spill-file slabs
        host = HostPages(pin=False, budget=budget, spill_dir=spill_dir)
        first, second = host.page((4096,), torch.uint8, CPU), host.page((100,), torch.float32, CPU)
        assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # one slab
        assert second.data_ptr() - first.data_ptr() == 4096  # aligned to the OS page, no overlap
        big = host.page((SLAB_BYTES + 1,), torch.uint8, CPU)
        big[-1] = 7
        assert big[-1].item() == 7 and big.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()


def test_a_full_disk_is_one_error_before_the_page_is_mapped(tmp_path, monkeypatch):
    """Space is allocated before mapping: a write into a mapped hole on a full disk would kill the process."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    host = HostPages(pin=False, budget=0, spill_dir=tmp_path)
    with pytest.raises(ResourceError, match=rf"the disk tier cannot grow in {tmp_path} \(No space left on device\)"):
        host.page((1024,), torch.float32, CPU)
    assert os.listdir(tmp_path) == []


def test_a_directory_where_no_file_can_be_made_gives_no_disk_tier(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert spill_room(blocker / "spill", limit=None) == 0


def test_without_a_spill_directory_or_a_budget_pages_stay_in_ram():
    for host in (HostPages(pin=False, budget=0), HostPages(pin=False, budget=None)):
        page = host.page((1024,), torch.float32, CPU)
        assert host.spilled_bytes == 0 and host.ram_bytes == SLAB_BYTES  # one slab, its tail untouched
        assert not any("infllm-spill-" in f for f in _mapped_files(page))


@pytest.mark.parametrize("kv_dtype", ["int8", "model"])
def test_a_spilled_store_gives_the_same_logits_and_snapshot_tensors(kv_dtype, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(6))
    cfg = EngineConfig(sinks=8, window=64, block_size=16, topk=4, query_chunk=16, cache_blocks=6, prefill_chunk=64,
                       kv_dtype=kv_dtype)

    def run(budget):
        engine = Engine(model, cfg)
        engine.place_store(budget, tmp_path)
        logits = engine.feed(ids, all_logits=True)
        decoded = [engine.feed(ids[t : t + 1]) for t in range(5)]
        return logits, decoded, engine.export()[0], engine.memory_report()

    plain = run(None)
    spilled = run(0)  # every page on disk
    mixed = run(plain[3].block_store_bytes // 2)  # some pages in RAM, the rest on disk
    assert plain[3].spilled_bytes == 0 and spilled[3].spilled_bytes > 0
    assert 0 < mixed[3].spilled_bytes < spilled[3].spilled_bytes
    assert plain[3].block_store_bytes == spilled[3].block_store_bytes == mixed[3].block_store_bytes
    for other in (spilled, mixed):
        assert torch.equal(plain[0], other[0]) and all(torch.equal(a, b) for a, b in zip(plain[1], other[1]))
        assert plain[2].keys() == other[2].keys()
        assert all(torch.equal(plain[2][name], other[2][name]) for name in plain[2])


def test_a_reset_keeps_the_budget_and_counts_pages_afresh(tmp_path):
    model = tiny_model("llama")
    cfg = EngineConfig(sinks=8, window=64, block_size=16, topk=4, query_chunk=16, cache_blocks=6, prefill_chunk=64)
    engine = Engine(model, cfg)
    engine.place_store(0, tmp_path)
    engine.feed(torch.arange(300) % 256)
    assert engine.memory_report().spilled_bytes > 0
    engine.reset()
    assert engine.memory_report().spilled_bytes == 0 and engine.host.budget == 0 and engine.host.spill_dir == tmp_path
    engine.feed(torch.arange(300) % 256)
    assert engine.memory_report().spilled_bytes > 0


def test_a_store_past_the_ram_goes_to_the_disk_tier_when_the_disk_has_room():
    """9 GB of store, 7.2 GB of usable RAM: refused without a disk tier, read with one (the RAM budget returned:
    what the pages may take in RAM, the rest spilled)."""
    budget = check_memory(9 * GIB, CPU, tokens=10**6, available_ram=8 * GIB, limit=None, spill=4 * GIB)
    assert budget == int(0.9 * 8 * GIB)
    with_activations = check_memory(9 * GIB, CPU, tokens=10**6, host_extra_bytes=GIB, available_ram=8 * GIB,
                                    limit=None, spill=4 * GIB)
    assert with_activations == budget - GIB  # activations stay in RAM
    with pytest.raises(ResourceError) as caught:
        check_memory(9 * GIB, CPU, tokens=10**6, available_ram=8 * GIB, limit=None, spill=GIB)
    message = str(caught.value)
    assert "but 90% of the 8,192 MB available allows 7,373 MB, and the disk tier 1,024 MB more; try " in message
    assert message.endswith("fewer or shorter sources or INFLLM_SPILL_DIR on a disk with more free space")
    with pytest.raises(ResourceError, match="allows 7,373 MB; try"):
        check_memory(9 * GIB, CPU, tokens=10**6, available_ram=8 * GIB, limit=None, spill=0)
    with pytest.raises(ResourceError):  # activations cannot spill
        check_memory(GIB, CPU, tokens=10**6, host_extra_bytes=8 * GIB, available_ram=8 * GIB, limit=None,
                     spill=64 * GIB)


def test_info_places_a_store_as_a_read_does_with_the_representative_keys_beside_the_pages():
    """7 GB of store in 7.2 GB of usable RAM: all in RAM alone, but with 1 GB of representative keys beside the
    pages (a CPU run) 0.8 GB of it goes to the disk tier, as check_reading places it."""
    from infllm.runtime.resources import storage_tier

    measured = {"available_ram": 8 * GIB, "limit": None, "spill": 4 * GIB}
    assert storage_tier(7 * GIB, CPU, tokens=10**6, **measured) == {"tier": "ram"}
    tier = storage_tier(7 * GIB, CPU, tokens=10**6, host_extra_bytes=GIB, **measured)
    assert tier["tier"] == "disk" and tier["spill_mb"] == round((7 * GIB - (int(0.9 * 8 * GIB) - GIB)) / MB, 1)


def test_the_spill_limit_caps_the_disk_room_and_zero_turns_the_tier_off(tmp_path):
    assert spill_room(tmp_path, limit=0) == 0
    assert spill_room(tmp_path, limit=5 * MB) == 5 * MB
    free = spill_room(tmp_path / "not" / "made" / "yet", limit=None)  # measured where the directory will be made
    assert free > 0 and not (tmp_path / "not").exists()
    assert spill_limit_bytes({SPILL_LIMIT_ENV: "0"}) == 0 and spill_limit_bytes({}) is None
    assert spill_limit_bytes({SPILL_LIMIT_ENV: "1.5"}) == int(1.5 * MB)
    for bad in ("lots", "-1", "nan", "inf"):
        with pytest.raises(UsageError, match=SPILL_LIMIT_ENV):
            spill_limit_bytes({SPILL_LIMIT_ENV: bad})


def test_pinned_pages_are_carved_from_slabs_made_ahead_on_a_thread():
    """A GPU run's pinned pages come from page-locked slabs as unpinned pages do, and the next slab is made on the
    slab thread while the current one is carved (no GPU here: the slab maker is recorded instead)."""
    host = HostPages(pin=True)
    made = []  # (bytes, the thread that made it)

    def make(n):
        made.append((n, threading.current_thread().name))
        return torch.empty(n, dtype=torch.uint8)

    host._ram.make = make
    pages = [host.page((16, 64), torch.int8, CPU), host.page((100,), torch.float32, CPU)]
    assert [p.shape for p in pages] == [(16, 64), (100,)]
    first = pages[0].untyped_storage().data_ptr()
    big = host.page((SLAB_BYTES,), torch.uint8, CPU)  # past the first slab's room: it is carved from the one ahead
    host._ram._ahead[1].result()
    assert [n for n, _ in made] == [SLAB_BYTES, SLAB_BYTES, SLAB_BYTES]
    assert made[0][1] == threading.current_thread().name
    assert all(name.startswith("infllm-slabs") for _, name in made[1:])
    assert big.untyped_storage().data_ptr() != first and host.ram_bytes == 3 * SLAB_BYTES


def test_a_slab_is_made_ahead_only_where_the_budget_has_room_for_it(tmp_path):
    host = HostPages(pin=True, budget=SLAB_BYTES + SLAB_BYTES // 2, spill_dir=tmp_path)
    made = []
    host._ram.make = lambda n: (made.append(n), torch.empty(n, dtype=torch.uint8))[1]
    host.page((1024,), torch.uint8, CPU)
    assert made == [SLAB_BYTES] and host._ram._ahead is None and host.ram_bytes == SLAB_BYTES
    unpinned = HostPages(pin=False)
    unpinned.page((1024,), torch.uint8, CPU)
    assert unpinned._ram._ahead is None  # an unpinned slab costs nothing to make: none ahead


class _FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister; `fail` makes registration return an error."""

    def __init__(self, fail: bool = False):
        self.fail, self.registered, self.unregistered = fail, [], []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.registered.append((ptr, nbytes))
        return 1 if self.fail else 0

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def _no_cuda(monkeypatch, fake: _FakeCudart, synced: list | None = None) -> None:
    """torch.cuda as pinned_slab sees it: the fake cudart, and `synced` recording each device synchronized
    (before or after an unregistration: what `fake.unregistered` holds then)."""
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    record = (lambda d: synced.append((d, list(fake.unregistered)))) if synced is not None else (lambda d: None)
    monkeypatch.setattr(torch.cuda, "synchronize", record)


def test_a_pinned_slab_is_registered_until_its_last_view_is_gone(monkeypatch):
    """The slab is registered in place, and unregistered only once no page of it is left (pages outlive the slab
    tensor: the stores hold views), after its devices, and no other, have drained."""
    fake, synced = _FakeCudart(), []
    _no_cuda(monkeypatch, fake, synced)
    slab = pinned_slab(1 << 20, devices=(torch.device("cuda", 0), torch.device("cuda", 2)))
    ptr = slab.data_ptr()
    assert fake.registered == [(ptr, 1 << 20)] and int(slab.sum()) == 0
    page = slab[4096:8192].view(torch.int32)
    page.fill_(7)
    del slab
    gc.collect()
    assert fake.unregistered == [] and int(page.sum()) == 7 * 1024  # the page still reads its memory
    del page
    gc.collect()
    assert fake.unregistered == [ptr]
    # Its devices drained first (a copy to or from it may still be queued); cuda:1 untouched, no context made there.
    assert synced == [(torch.device("cuda", 0), []), (torch.device("cuda", 2), [])]


@pytest.mark.parametrize("huge_pages", ["unknown", "refused"])
def test_a_pinned_slab_is_registered_without_huge_pages(monkeypatch, huge_pages):
    """Where 2 MB pages cannot be asked for, the slab is still registered (4 KB pages), not left to the allocator."""
    fake = _FakeCudart()
    _no_cuda(monkeypatch, fake)
    if huge_pages == "unknown":
        monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    else:
        monkeypatch.setattr(mmap, "MADV_HUGEPAGE", -1, raising=False)  # madvise refuses it (EINVAL)
    slab = pinned_slab(1 << 16)
    assert fake.registered == [(slab.data_ptr(), 1 << 16)]


def test_a_pinned_slab_falls_back_to_the_allocator_when_registration_fails(monkeypatch):
    fake = _FakeCudart(fail=True)
    _no_cuda(monkeypatch, fake)
    made = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        made.append(kwargs.get("pin_memory", False))
        return real_empty(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"})

    monkeypatch.setattr(torch, "empty", empty)
    taken = []
    monkeypatch.setattr(hostpages, "_take_cuda_error", lambda: taken.append(True))
    slab = pinned_slab(1 << 16)
    assert slab.numel() == 1 << 16 and made == [True] and len(fake.registered) == 1
    assert taken == [True]  # the failure is not left for the next kernel launch to report


def test_a_reset_lets_go_of_the_old_texts_pages_at_once():
    """The old text's stores and host pages are freed when the engine resets, not whenever Python's cycle
    collector next runs: on a GPU run they are GBs of locked memory, and a server reads text after text."""
    model = tiny_model("llama")
    cfg = EngineConfig(sinks=16, window=128, block_size=16, topk=4, query_chunk=32, cache_blocks=8, prefill_chunk=64)
    engine = Engine(model, cfg)
    engine.feed(torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(3)))
    assert engine.layers[0].store.count > 0
    gc.collect()
    old = [weakref.ref(engine.host), weakref.ref(engine.layers[0].store), weakref.ref(engine.layers[0])]
    gc.disable()
    try:
        engine.reset()
        assert [r() is None for r in old] == [True, True, True]
    finally:
        gc.enable()
