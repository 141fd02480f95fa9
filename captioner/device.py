"""Which torch device a command or a training run uses.

``auto`` is CUDA when a GPU is present, else the CPU; an explicit device that this machine
does not have is a :class:`~captioner.errors.CaptionerError` that names the option it came
from (``--device`` or ``train.device``), never a traceback from deep inside torch.

``train.amp: auto`` (:func:`resolve_amp`) is bf16 where the device multiplies bf16 natively
(a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), and float32 elsewhere: emulated bf16
is slower than float32.
"""

from __future__ import annotations

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


def resolve_amp(amp: str, device: torch.device, *, cpu_bf16: str | None = None) -> tuple[str, str]:
    """``train.amp`` -> (``none``, ``bf16`` or ``fp16``, why). ``auto`` is ``bf16`` on a CUDA GPU
    that supports it and on a CPU with native bf16 matmul, else ``none``; the other values
    are returned as they are.

    Args:
        amp: ``auto``, ``none``, ``bf16`` or ``fp16``.
        device: where the run computes.
        cpu_bf16: the CPU's bf16 support as :func:`cpu_bf16_support` names it (None: read it).
    """
    if amp != "auto":
        return amp, f"train.amp={amp}"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "none"), f"train.amp=auto: {'bf16' if ok else 'float32'} (the GPU " \
            f"{'supports' if ok else 'lacks'} bf16)"
    if device.type == "cpu":
        support = cpu_bf16_support() if cpu_bf16 is None else cpu_bf16
        if support != "none":
            return "bf16", f"train.amp=auto: bf16 (this CPU multiplies bf16 natively: {support})"
        return "none", "train.amp=auto: float32 (this CPU has no native bf16 matmul; emulated bf16 is slower)"
    return "none", f"train.amp=auto: float32 on {device.type}"
