"""Checkpoints that are written atomically and loaded without running pickled code.

A checkpoint is the caller's ``state`` dict plus a format marker, saved with ``torch.save``::

    {"format": "torchslim.train.checkpoint", "version": 1, **state}

``state`` may hold only tensors, dicts, lists, tuples, ints, floats, strings, bools, ``None``, torch
dtypes and devices (a model or optimizer ``state_dict`` qualifies), so :func:`load_checkpoint` can use
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from torchslim._files import atomic_write
from torchslim.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "torchslim.train.checkpoint"
VERSION = 1
_MARKER_KEYS = ("format", "version")
# Exact types, not subclasses: numpy's float64 subclasses float and defaultdict subclasses dict, and a
# weights-only load refuses both.
_PLAIN_LEAVES = (int, float, str, bool, type(None), torch.dtype, torch.device)
_DICTS = (dict, OrderedDict)
_SEQUENCES = (list, tuple, torch.Size)
_MAX_LISTED = 5          # keys and shape mismatches listed per kind in a mismatch message


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves any previous file intact.

    Steps: (1) ``torch.save`` into a fresh temporary file in the same folder, (2) flush and
    ``os.fsync`` it, (3) ``os.replace`` it onto ``path``, (4) fsync the folder (where supported).

    Args:
        path: destination; missing parent folders are created.
        state: str-keyed dict of tensors, containers and plain values (see the module docstring);
            the keys ``"format"`` and ``"version"`` are reserved.
    Raises:
        CheckpointError: ``state`` holds a value ``torch.load(weights_only=True)`` could not read back,
            uses a reserved key, or the write failed (the previous checkpoint is then unchanged).
    """
    path = Path(path)
    if not all(isinstance(key, str) for key in state):
        raise CheckpointError(f"checkpoint state keys must be strings, got {list(state)!r}")
    reserved = [key for key in _MARKER_KEYS if key in state]
    if reserved:
        raise CheckpointError(f"checkpoint state may not use the reserved keys {reserved}; rename them")
    _check_serializable(state, "state")
    payload = {"format": FORMAT, "version": VERSION, **state}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except Exception as exc:
        raise CheckpointError(
            f"could not write checkpoint {path}: {type(exc).__name__}: {exc}. Any previous checkpoint "
            "there is unchanged; check free disk space and permissions."
        ) from exc
    logger.debug("saved checkpoint %s", path)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``torch.load(weights_only=True)``.

    Returns:
        the saved ``state`` dict, without the format marker.
    Raises:
        CheckpointError: the file is missing, truncated or corrupt, is not a torchslim checkpoint,
            or was written by a newer version of the format.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}; check the path, or start without --resume")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, OSError, EOFError... for bad files
        raise _unreadable(path, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a readable torch file but not a torchslim checkpoint (no format marker "
            f"{FORMAT!r}). For a bare state_dict use model.load_state_dict(torch.load(path)); "
            "otherwise point --resume at a file written by torchslim."
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this torchslim reads versions up to "
            f"{VERSION}. Upgrade torchslim, or point --resume at a checkpoint this version wrote."
        )
    return {key: value for key, value in payload.items() if key not in _MARKER_KEYS}


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state_dict)`` that explains, in one error, why a checkpoint does not fit.

    Raises:
        CheckpointError: keys missing from or unexpected in ``state_dict``, or tensors whose shapes
            differ (``name: checkpoint (a, b) vs model (c, d)``); the model is then left untouched.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {_shape(state_dict[key])} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and _shape(state_dict[key]) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(model, missing, unexpected, mismatched))
    model.load_state_dict(state_dict, strict=True)


def rng_state(generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The state of ``generator`` (default: torch's global CPU generator) for a checkpoint.

    Returns:
        ``{"torch": ByteTensor}``, restored by :func:`set_rng_state`.
    """
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    return {"torch": state}


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore a state from :func:`rng_state` into ``generator`` (default: torch's global CPU one).

    Raises:
        CheckpointError: ``state`` has no ``"torch"`` ByteTensor.
    """
    saved = state.get("torch") if isinstance(state, Mapping) else None
    if not isinstance(saved, Tensor) or saved.dtype != torch.uint8:
        raise CheckpointError(
            f"RNG state must be a dict with a uint8 tensor under 'torch' (as rng_state() returns), got "
            f"{type(state).__name__}; the checkpoint's 'rng' entry is damaged or from another program"
        )
    try:
        if generator is not None:
            generator.set_state(saved)
        else:
            torch.set_rng_state(saved)
    except RuntimeError as exc:
        raise CheckpointError(f"RNG state of {saved.numel()} bytes cannot be restored: {exc}") from exc


def _check_serializable(value: Any, where: str) -> None:
    """Raise if ``value`` holds anything ``torch.load(weights_only=True)`` would refuse to read."""
    if isinstance(value, Tensor) or type(value) in _PLAIN_LEAVES:
        return
    if type(value) in _DICTS:
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key {key!r} of type {type(key).__name__}; use str or int keys")
            _check_serializable(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCES:
        for i, item in enumerate(value):
            _check_serializable(item, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__name__}, which a weights-only load cannot read back; store "
        "tensors, dicts, lists, numbers, strings, bools or None (e.g. a dataclass as dataclasses.asdict)"
    )


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if pickled:                                             # a real pickle, of a class weights_only refuses
        return CheckpointError(
            f"checkpoint {path} holds a pickled Python object ({pickled.group(1)}), not only tensors and "
            "plain containers, and torchslim does not run pickled code. If you trust the file, load it with "
            "torch.load(path, weights_only=False) and save its tensors with save_checkpoint; otherwise "
            "point --resume at a checkpoint torchslim wrote."
        )
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {_first_sentence(exc)}). "
        "Delete it to start fresh, or point --resume at an earlier checkpoint."
    )


def _first_sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text.split(". ")[0] if text else "no message"


def _listed(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:_MAX_LISTED]) + more


def _mismatch_message(model: nn.Module, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    lines = f"checkpoint does not fit {type(model).__name__}:"
    if missing:
        lines += _listed("missing from the checkpoint", missing)
    if unexpected:
        lines += _listed("unexpected in the checkpoint", unexpected)
    if mismatched:
        lines += _listed("shape mismatches", mismatched)
    if unexpected and all(key.startswith("module.") for key in unexpected):
        lines += "\nThe keys start with 'module.': the checkpoint was saved from a DDP wrapper; strip that prefix."
    return lines + (
        "\nIt was written for another model: rebuild the model it was saved from (its 'arch' entry, if "
        "present) or start fresh without --resume."
    )
