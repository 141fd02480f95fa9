import os
import platform
import subprocess
import sys

import pytest

from captioner import device

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Frees a 96 MB tensor and prints how much resident memory that gave back (MiB), with or
# without hold_freed_memory() first. Run in a fresh process: holding is process-wide.
FREED = """
import sys, torch
from captioner.device import hold_freed_memory, release_freed_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

held = hold_freed_memory() if sys.argv[1] == "hold" else False
x = torch.ones(24 * 1024 * 1024)  # 96 MB, written: resident
before = rss()
del x
after_free = rss()
release_freed_memory()
print(held, round(before - after_free), round(before - rss()))
"""


def _freed(mode: str, env: dict | None = None) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True,
                         env=env, timeout=120).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_hold_freed_memory_keeps_a_freed_block_until_released(monkeypatch):
    held, freed, released = _freed("plain")
    assert held == "False" and freed >= 90  # glibc unmaps a block this large as soon as it is freed
    held, freed, released = _freed("hold")
    assert held == "True" and freed < 10  # kept for the next tensor: no fresh pages to fault in
    assert released >= 90  # release_freed_memory hands it back


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_hold_freed_memory_is_turned_off_by_the_environment():
    held, freed, _ = _freed("hold", env={**os.environ, "CAPTIONER_HOLD_MEMORY": "0"})
    assert held == "False" and freed >= 90


def test_hold_freed_memory_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(device.platform, "system", lambda: "Darwin")
    assert device.hold_freed_memory() is False
    device.release_freed_memory()  # a no-op, no error
