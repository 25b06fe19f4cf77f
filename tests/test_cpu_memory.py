"""hitter_core.cpu_memory: after keep_freed_memory, large blocks come from the heap and stay."""

import platform
import subprocess
import sys

import pytest

from hitter_core.cpu_memory import keep_freed_memory

# Run in a child process: the setting lasts for the rest of the process.
PROBE = """
import ctypes
import torch
from hitter_core.cpu_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_and_heap_after_a_64_mib_tensor():
    t = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    info = libc.mallinfo2()
    del t
    return info.hblkhd, libc.mallinfo2().arena

before = mmapped_and_heap_after_a_64_mib_tensor()
assert keep_freed_memory()
after = mmapped_and_heap_after_a_64_mib_tensor()
print(before[0], after[0], after[1])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_blocks_come_from_the_heap_and_are_kept():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    mmapped_before, mmapped_after, heap_after_free = map(int, out)
    assert mmapped_before >= 64 * 2**20  # glibc's default: an mmap of its own
    assert mmapped_after < 64 * 2**20  # now from the heap ...
    assert heap_after_free >= 64 * 2**20  # ... which keeps it once freed


def test_returns_false_without_glibc(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False
