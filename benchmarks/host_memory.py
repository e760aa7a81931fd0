"""How fast host memory for the block store can be had, and whether pinning it can overlap the compute.

The block store of an 8B model grows by 128 KB per token: at 25K tokens/s that is 3.3 GB/s of new host memory.
Rows: allocating pinned pages (torch.empty(pin_memory=True)), allocating and touching pageable pages, and the
device-to-host copy into each. The last row pins pages on a background thread (core/engine/blockstore.py pins
on demand instead) while the main thread keeps launching GPU work, and reports how much the main thread was slowed: ~1.0x means pinning
releases the interpreter lock and runs beside the compute.

  python benchmarks/host_memory.py --page-mb 8 --pages 64
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def _rate(mb: float, seconds: float) -> str:
    return f"{mb / 1024 / seconds:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page-mb", type=int, default=8)
    ap.add_argument("--pages", type=int, default=64)
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

    print(f"\nhost memory for the block store: {args.pages} pages of {args.page_mb} MB\n")
    print("| what | GB/s |")
    print("|---|---|")
    print(f"| allocate pinned | {_rate(total_mb, pin_s)} |")
    print(f"| allocate + touch pageable | {_rate(total_mb, page_s)} |")
    print(f"| device-to-host copy into pinned | {_rate(total_mb, copies['pinned'])} |")
    print(f"| device-to-host copy into pageable | {_rate(total_mb, copies['pageable'])} |")
    print(f"\nmain thread: {alone:.2f} s of kernel launches alone, {beside:.2f} s while a background thread pins "
          f"({beside / alone:.2f}x); pinning and launches together {both:.2f} s (pinning alone {pin_s:.2f} s)")


if __name__ == "__main__":
    main()
