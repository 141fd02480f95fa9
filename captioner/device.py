"""Which torch device a command or a training run uses.

``auto`` is CUDA when a GPU is present, else the CPU; an explicit device that this machine
does not have is a :class:`~captioner.errors.CaptionerError` that names the option it came
from (``--device`` or ``train.device``), never a traceback from deep inside torch.

``train.amp: auto`` (:func:`resolve_amp`) is bf16 where the device multiplies bf16 natively
(a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16) and, on a CPU, where a bf16 matmul
measured at start-up also runs faster than a float32 one; float32 elsewhere. Emulated bf16 is
slower than float32, and so is native bf16 on some CPUs: an Intel Xeon that shows AVX512-BF16
but no AMX multiplied bf16 at half its float32 rate (165 against 330 GFLOP/s).
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch

from captioner.errors import CaptionerError


def resolve_device(name: str, *, key: str = "--device") -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` -> a device this machine has.

    Args:
        name: the requested device.
        key: where the request came from, for the error message (``--device``, ``train.device``).

    Raises:
        CaptionerError: an unknown device name, or a device this machine lacks.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CaptionerError(f"{key}: unknown device {name!r} (use auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CaptionerError(f"{key} {name}: no CUDA GPU is available on this machine; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CaptionerError(f"{key} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CaptionerError(f"{key} {name}: MPS is not available on this machine; use cpu or auto")
    return device


def cpu_bf16_support(flags: set[str] | None = None) -> str:
    """The CPU's native bf16 matmul: "AMX" (amx_bf16 tiles, Intel Sapphire Rapids and later),
    "AVX512-BF16" (dot products, AMD Zen 4, Intel Cooper Lake), or "none" (bf16 is emulated).

    Args:
        flags: the CPU's feature flags; None reads them from /proc/cpuinfo (none found: "none").
    """
    if flags is None:
        flags = set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "none"


BF16_MIN_SPEEDUP = 1.2  # auto takes bf16 on a CPU only if its matmul is at least this much faster


def cpu_bf16_speedup(size: int = 768, repeat: int = 5) -> float:
    """float32 matmul time / bf16 matmul time on this CPU, now: the best of ``repeat`` products
    of two (size, size) matrices each, after one warm-up (about 0.1 s at the default size).
    Above 1: bf16 is faster here."""
    import time

    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def resolve_amp(amp: str, device: torch.device, *, cpu_bf16: str | None = None,
                bf16_speedup: float | None = None) -> tuple[str, str]:
    """``train.amp`` -> (``none``, ``bf16`` or ``fp16``, why). ``auto`` is ``bf16`` on a CUDA GPU
    that supports it and on a CPU with native bf16 matmul that also runs it at least
    :data:`BF16_MIN_SPEEDUP` times as fast as float32 (measured: :func:`cpu_bf16_speedup`),
    else ``none``; the other values are returned as they are.

    Args:
        amp: ``auto``, ``none``, ``bf16`` or ``fp16``.
        device: where the run computes.
        cpu_bf16: the CPU's bf16 support as :func:`cpu_bf16_support` names it (None: read it).
        bf16_speedup: float32 / bf16 matmul time on this CPU (None: measure it, only when
            the CPU has native bf16).
    """
    if amp != "auto":
        return amp, f"train.amp={amp}"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "none"), f"train.amp=auto: {'bf16' if ok else 'float32'} (the GPU " \
            f"{'supports' if ok else 'lacks'} bf16)"
    if device.type == "cpu":
        support = cpu_bf16_support() if cpu_bf16 is None else cpu_bf16
        if support == "none":
            return "none", "train.amp=auto: float32 (this CPU has no native bf16 matmul; emulated bf16 is slower)"
        speedup = cpu_bf16_speedup() if bf16_speedup is None else bf16_speedup
        if speedup >= BF16_MIN_SPEEDUP:
            return "bf16", (f"train.amp=auto: bf16 (this CPU multiplies bf16 natively: {support}; "
                            f"a bf16 matmul ran {speedup:.1f}x as fast as float32)")
        return "none", (f"train.amp=auto: float32 (this CPU has {support}, but a bf16 matmul ran at "
                        f"{speedup:.2f}x float32's speed here; train.amp=bf16 forces it)")
    return "none", f"train.amp=auto: float32 on {device.type}"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HOLD_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap


def _glibc() -> ctypes.CDLL | None:
    """The process's own C library where it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def hold_freed_memory() -> bool:
    """Keeps freed memory in the process for the next tensor, instead of handing it back to the
    system (glibc's ``mallopt``: the mmap and trim thresholds raised to :data:`HOLD_BYTES`).

    Why: glibc gives every block over 32 MB its own ``mmap`` and unmaps it on free, so a tensor
    that size made at every training step starts as fresh pages the kernel must fault in and
    zero: alone, 13.8 ms to copy 51 MB into a new tensor against 3.6 ms into held memory; the
    bench's float32 training step 24-34 ms shorter (of about 400). The cost: the process keeps its
    peak memory until it exits, as PyTorch's recommended allocators (jemalloc, tcmalloc) do
    (:func:`release_freed_memory` hands it back). Process-wide and idempotent;
    ``CAPTIONER_HOLD_MEMORY=0`` turns it off. Returns whether it took effect (False off glibc
    Linux, or when turned off).
    """
    libc = _glibc() if os.environ.get("CAPTIONER_HOLD_MEMORY", "1") != "0" else None
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, HOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, HOLD_BYTES))


def release_freed_memory() -> None:
    """Hands the memory the process holds but does not use back to the system (glibc's
    ``malloc_trim``); a no-op elsewhere. For measuring a peak from a clean start."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
