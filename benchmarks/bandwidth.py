"""Memory read bandwidth of this machine: streaming reductions over a buffer far larger than the last-level cache.

Each reader reduces a `--gigabytes` buffer (default 1 GiB, allocated and written once before timing so that every
page is resident) and is timed best of `--repeats`; bandwidth = buffer bytes / best time, in GiB/s (2^30 bytes/s).
Readers, with 1 and 2 threads (`--threads`):
- torch: `sum` of fp32, `amax` of uint8 (one compare per byte) and `amax` of int32 viewed on the same bytes (a bf16
  `sum` is left out: torch converts every element first and reaches 0.5 GiB/s, far from memory-bound);
- numpy: `np.add.reduce` of fp32 and `np.max` of uint8. numpy reduces on one thread; with 2 threads the buffer is
  split in two halves reduced by two Python threads (numpy releases the GIL inside the reduction).
A reduction that keeps up with memory reads each byte once; one that is compute-bound reports less than the
bandwidth (compare the readers: the fastest one is the estimate). `read_bandwidth(threads, size_bytes)` returns the
best of the torch readers in bytes/s, for other benchmarks:

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
    from bandwidth import read_bandwidth
    bytes_per_s = read_bandwidth(2, 1 << 30)

    .venv/bin/python benchmarks/bandwidth.py                       # 1 GiB, 1 and 2 threads, best of 5
    .venv/bin/python benchmarks/bandwidth.py --gigabytes 2 --repeats 9 --threads 1,2 --huge-pages
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hf_ptq.evaluation.speed import best_seconds

GIB = 1 << 30


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _buffer(size_bytes: int, huge_pages: bool = False) -> torch.Tensor:
    """uint8 [size_bytes] (rounded down to a multiple of 64), every page written: resident before timing. The bytes
    are 0x3C, so the fp32 view holds small finite values (0.0115) and sums stay finite. `huge_pages`: an anonymous
    mapping advised MADV_HUGEPAGE (transparent 2 MiB pages where the kernel allows them: fewer TLB misses) instead
    of torch's allocator."""
    size = max(64, size_bytes // 64 * 64)
    if not huge_pages:
        return torch.empty(size, dtype=torch.uint8).fill_(0x3C)
    mapping = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(mapping, dtype=torch.uint8).fill_(0x3C)
    buf.mapping = mapping  # the mapping must outlive the tensor that views it
    return buf


def torch_readers(buf: torch.Tensor) -> dict[str, Callable[[], object]]:
    f32 = buf.view(torch.float32)
    return {
        "torch sum fp32": lambda: f32.sum(),
        "torch amax uint8": lambda: buf.amax(),
        "torch amax int32": lambda: buf.view(torch.int32).amax(),
    }


def numpy_readers(buf: torch.Tensor, threads: int) -> dict[str, Callable[[], object]]:
    array = buf.numpy()
    f32 = array.view(np.float32)
    if threads == 1:
        return {"numpy add.reduce fp32": lambda: np.add.reduce(f32), "numpy max uint8": lambda: array.max()}
    pool = ThreadPoolExecutor(threads)
    f32_parts, u8_parts = np.array_split(f32, threads), np.array_split(array, threads)

    def split(fn, parts):
        return lambda: list(pool.map(fn, parts))

    return {"numpy add.reduce fp32": split(np.add.reduce, f32_parts), "numpy max uint8": split(np.max, u8_parts)}


def measure(threads: int, buf: torch.Tensor, repeats: int, numpy_too: bool = True) -> dict[str, float]:
    """Bytes/s of each reader over `buf` with `threads` threads."""
    readers = dict(torch_readers(buf))
    if numpy_too:
        readers.update(numpy_readers(buf, threads))
    with torch_threads(threads):
        return {name: buf.numel() / best_seconds(fn, repeats, warmup=1) for name, fn in readers.items()}


def read_bandwidth(threads: int, size_bytes: int = GIB, repeats: int = 5, huge_pages: bool = False) -> float:
    """This machine's streaming read bandwidth in bytes/s with `threads` torch threads: the best torch reader over a
    buffer of `size_bytes` (keep it far above the last-level cache), best of `repeats`."""
    buf = _buffer(size_bytes, huge_pages)
    return max(measure(threads, buf, repeats, numpy_too=False).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="buffer size in GiB (default 1)")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--huge-pages", action="store_true", help="also measure a buffer advised MADV_HUGEPAGE")
    args = parser.parse_args()

    counts = [int(t) for t in args.threads.split(",")]
    size = int(args.gigabytes * GIB)
    print(
        f"buffer {size / GIB:.2f} GiB, best of {args.repeats}, torch {torch.__version__}, numpy {np.__version__}; "
        "GiB/s (2^30 bytes/s)"
    )
    print("| reader | pages | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in counts) + " |")
    print("|---" * (len(counts) + 2) + "|")
    for huge in (False, True) if args.huge_pages else (False,):
        buf = _buffer(size, huge)
        results = {t: measure(t, buf, args.repeats) for t in counts}
        pages = "2 MiB (THP)" if huge else "torch's"
        for name in results[counts[0]]:
            print(f"| {name} | {pages} | " + " | ".join(f"{results[t][name] / GIB:.1f}" for t in counts) + " |")
        best = " | ".join(f"**{max(results[t].values()) / GIB:.1f}**" for t in counts)
        print(f"| **best** | {pages} | {best} |")
        del buf


if __name__ == "__main__":
    main()
