"""Checkpoints: plain dicts of tensors and plain data, written atomically, loaded with
``torch.load(..., weights_only=True)`` (no pickled code ever runs on load).

Keys: ``format_version``, ``config`` (nested dict), ``vocab`` (dict), ``model`` (state
dict), and optionally ``optimizer``, ``scheduler``, ``trainer`` (epoch, step, best score,
RNG states, ...).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from captioner.errors import CheckpointError

FORMAT_VERSION = 1
REQUIRED = ("format_version", "config", "vocab", "model")


def save_checkpoint(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` (plus the format version) to ``path`` atomically: a temporary file in
    the same folder, flushed to disk, then renamed over the target. A crash mid-write leaves
    the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **data}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-save (SIGKILL, power loss) left in
    ``folder``: ``<name>.pt.<random>.tmp``, the pattern :func:`save_checkpoint` uses. Call it
    when a run starts, before anything writes there; returns the files removed."""
    removed = []
    for stale in sorted(Path(folder).glob("*.pt.*.tmp")):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely on the CPU.

    Raises:
        CheckpointError: missing, truncated or corrupted file, a file holding code objects,
            not a captioner checkpoint, or from a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    unreadable = f"{path}: not a readable checkpoint (truncated or corrupted?)"
    try:  # a checkpoint is a zip archive: check every member's CRC before unpickling anything
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{unreadable}: {str(err)[:200]}") from None
    if bad is not None:
        raise CheckpointError(f"{unreadable}: member {bad} fails its CRC check") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(" Re-running `torch.load`")[0]  # not torch's advice to turn the check off
        raise CheckpointError(f"{path}: refused: it is not plain tensors and data ({first[:200]})") from None
    except Exception as err:  # noqa: BLE001 - any other failure to read is a damaged file, said in one line
        raise CheckpointError(f"{unreadable}: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(data, dict) or any(k not in data for k in REQUIRED):
        raise CheckpointError(f"{path}: not a captioner checkpoint (expected keys {', '.join(REQUIRED)})")
    version = data["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this captioner's "
            f"({FORMAT_VERSION}); upgrade captioner"
        )
    return data


INFERENCE_KEYS = ("config", "vocab", "model")  # what captioning, evaluation and figures read


def slim(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a checkpoint inference needs: config, vocabulary and model weights (no
    optimizer moments, scheduler, loss buffers or trainer state: those only serve a resume)."""
    return {key: data[key] for key in INFERENCE_KEYS}


def export_checkpoint(source: str | Path, target: str | Path) -> int:
    """Write the inference-only part of the checkpoint ``source`` to ``target`` (atomically);
    returns the new file's size in bytes."""
    if Path(source).resolve() == Path(target).resolve():
        raise CheckpointError(f"{target}: export would overwrite its source; choose another --out")
    save_checkpoint(target, slim(load_checkpoint(source)))
    return Path(target).stat().st_size
