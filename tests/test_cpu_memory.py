"""tiger_fast.cpu_memory: the opt-in glibc malloc tuning (run in subprocesses: it is process-wide)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

_PROBE = r"""
import sys, torch
from tiger_fast.cpu_memory import retain_freed_memory
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
applied = retain_freed_memory() if sys.argv[1] == "tune" else None
before = rss_mb()
x = torch.ones(200 * 2**20 // 4)  # 200 MB, touched
peak = rss_mb()
del x
after = rss_mb()
print(applied, round(peak - before), round(after - before))
"""


def _probe(mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    applied, grew, kept = out.stdout.split()
    return applied, int(grew), int(kept)


def test_retain_freed_memory_keeps_a_freed_200mb_block():
    applied, grew, kept = _probe("tune")
    assert applied == "True"
    assert grew >= 190
    assert kept >= 190  # freed but kept by malloc for the next request: no page faults next time


def test_default_malloc_returns_the_block():
    applied, grew, kept = _probe("plain")
    assert applied == "None"
    assert grew >= 190 and kept < 50  # glibc's default mmap path gives it back to the OS
