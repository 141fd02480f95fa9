"""Which torch device a command or a training run uses.

``auto`` is CUDA when a GPU is present, else the CPU; an explicit device that this machine
does not have is a :class:`~captioner.errors.CaptionerError` that names the option it came
from (``--device`` or ``train.device``), never a traceback from deep inside torch.
"""

from __future__ import annotations

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
