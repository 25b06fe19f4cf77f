"""Keep freed memory inside the process on CPU (glibc malloc), so that every training step's
large tensors reuse pages the process already has instead of faulting in fresh ones.

glibc serves a block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and
unmaps it when freed. A HittER step on CPU allocates many such blocks (the FFN activations of
(3 x pairs, 1280), the 1vsAll scores), so the kernel faults in and zeroes each of their pages
again at every step. :func:`keep_freed_memory` serves every block from the heap and keeps what
is freed, the effect that PyTorch's CPU tuning guide gets from swapping in jemalloc or tcmalloc,
here with the allocator already loaded. ``bench/train_speed.py --no-keep-freed-memory``
measures the difference (bench/RESULTS.md gives the figures); peak memory rises, by 6-36% in our
runs.

It changes the whole process, so only entry points call it (``python -m hitter_core.train``,
``python -m hitter_core.evaluate``, ``bench/train_speed.py``), on CPU, unless given
``--no-keep-freed-memory`` (:func:`add_memory_argument`); no library class does.
"""

from __future__ import annotations

import argparse
import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap (``M_MMAP_MAX`` 0) and give freed memory
    back to the OS only beyond 2 GiB free at the heap's top (``M_TRIM_THRESHOLD``), for the
    rest of the process. Returns False, changing nothing, where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def add_memory_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-keep-freed-memory``: leave glibc's allocator as it is on CPU."""
    parser.add_argument("--no-keep-freed-memory", action="store_true",
                        help="CPU: leave glibc's malloc as it is (hitter_core.cpu_memory)")
