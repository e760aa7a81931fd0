"""How fast host memory for the block store can be had, and whether pinning it can overlap the compute.

The block store of an 8B model grows by 128 KB per token: at 25K tokens/s that is 3.3 GB/s of new host memory.
Rows: allocating pinned pages (torch.empty(pin_memory=True)), allocating and touching pageable pages, and the
device-to-host copy into each. The last line pins pages from the allocator on a background thread while the main
thread keeps launching GPU work, and reports how much the main thread was slowed: ~1.0x means pinning releases the
interpreter lock and runs beside the compute. A second table locks memory the way the block store
does (core/engine/hostpages.py, `pinned_slab`): anonymous mappings, touched, then registered with CUDA in place,
with 4 KB pages and with 2 MB pages asked for, and the device-to-host copy into them.

  python benchmarks/host_memory.py --page-mb 2 --pages 256 --arena-mb 512 --arenas 4
"""

from __future__ import annotations

import argparse
import mmap
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def _rate(mb: float, seconds: float) -> str:
    return f"{mb / 1024 / seconds:.2f}"


def _register(nbytes: int, huge: bool) -> tuple[float, float, torch.Tensor]:
    """An anonymous mapping of `nbytes`, touched, then page-locked in place (cudaHostRegister): the seconds to map
    and touch, the seconds to register, and the tensor over it. `huge` asks the kernel for 2 MB pages first
    (transparent huge pages): locking then walks 512x fewer pages."""
    t = time.perf_counter()
    area = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        area.madvise(mmap.MADV_HUGEPAGE)
    tensor = torch.frombuffer(area, dtype=torch.uint8)
    tensor.fill_(0)
    touch_s = time.perf_counter() - t
    t = time.perf_counter()
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    register_s = time.perf_counter() - t
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    return touch_s, register_s, tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page-mb", type=int, default=8)
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--arena-mb", type=int, default=512, help="size of each registered mapping")
    ap.add_argument("--arenas", type=int, default=4)
    args = ap.parse_args()
    n = args.page_mb * 2**20
    total_mb = args.page_mb * args.pages
    src = torch.ones(n, dtype=torch.uint8, device="cuda")

    t = time.perf_counter()
    pinned = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(args.pages)]
    pin_s = time.perf_counter() - t
    t = time.perf_counter()
    pageable = [torch.empty(n, dtype=torch.uint8) for _ in range(args.pages)]
    for p in pageable:
        p.fill_(0)  # first touch: the kernel maps the pages
    page_s = time.perf_counter() - t
    copies = {}
    for name, pages in (("pinned", pinned), ("pageable", pageable)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for p in pages:
            p.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        copies[name] = time.perf_counter() - t

    # Main-thread GPU launches alone, then with pinning on a background thread.
    x = torch.randn(256, 256, device="cuda")

    def launches(count: int = 20000) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(count):
            x.add_(1e-6)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    alone = launches()
    with ThreadPoolExecutor(1) as pool:
        t = time.perf_counter()
        futures = [pool.submit(torch.empty, n, dtype=torch.uint8, pin_memory=True) for _ in range(args.pages)]
        beside = launches()
        for f in futures:
            f.result()
        both = time.perf_counter() - t

    registered = {}
    for huge in (False, True):
        parts = [_register(args.arena_mb * 2**20, huge) for _ in range(args.arenas)]
        touch_s, register_s = sum(p[0] for p in parts), sum(p[1] for p in parts)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _, _, arena in parts:
            for off in range(0, arena.numel() - n + 1, n):
                arena[off : off + n].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        copy_s = time.perf_counter() - t
        registered[huge] = (touch_s, register_s, copy_s, all(p[2].is_pinned() for p in parts))
    arena_total = args.arena_mb * args.arenas
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()

    print(f"\nhost memory for the block store: {args.pages} pages of {args.page_mb} MB\n")
    print("| what | GB/s |")
    print("|---|---|")
    print(f"| allocate pinned | {_rate(total_mb, pin_s)} |")
    print(f"| allocate + touch pageable | {_rate(total_mb, page_s)} |")
    print(f"| device-to-host copy into pinned | {_rate(total_mb, copies['pinned'])} |")
    print(f"| device-to-host copy into pageable | {_rate(total_mb, copies['pageable'])} |")
    print(f"\nregistered mappings: {args.arenas} of {args.arena_mb} MB (transparent huge pages: {thp})\n")
    print("| pages | map + touch GB/s | register GB/s | both GB/s | device-to-host copy GB/s | is_pinned |")
    print("|---|---|---|---|---|---|")
    for huge, (touch_s, register_s, copy_s, pinned_flag) in registered.items():
        print(f"| {'2 MB (madvise)' if huge else '4 KB'} | {_rate(arena_total, touch_s)} | "
              f"{_rate(arena_total, register_s)} | {_rate(arena_total, touch_s + register_s)} | "
              f"{_rate(arena_total, copy_s)} | {pinned_flag} |")
    print(f"\nmain thread: {alone:.2f} s of kernel launches alone, {beside:.2f} s while a background thread pins "
          f"({beside / alone:.2f}x); pinning and launches together {both:.2f} s (pinning alone {pin_s:.2f} s)")


if __name__ == "__main__":
    main()
