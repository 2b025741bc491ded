"""Checkpoints that are written atomically and loaded without running pickled code.

A checkpoint is the caller's ``state`` dict plus a format marker, saved with ``torch.save``::

    {"format": "torchslim.train.checkpoint", "version": 1, **state}

``state`` may hold only tensors, dicts, lists, tuples, ints, floats, strings, bools, ``None``, torch
dtypes and devices (a model or optimizer ``state_dict`` qualifies), so :func:`load_checkpoint` can use
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
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


def load_optimizer_state_checked(optimizer: torch.optim.Optimizer, state: Any, where: str = "optimizer") -> None:
    """``optimizer.load_state_dict(state)`` after checking that ``state`` is one of this optimizer's: as many
    parameter groups, hyper-parameters of the same types (numbers finite and >= 0), and per-parameter tensors
    of their parameters' shapes, finite.

    Args:
        where: how messages name ``state``, e.g. ``"runs/x/checkpoint.pt: optimizer"``.
    Raises:
        CheckpointError: naming the first field that does not fit (``optimizer.param_groups[0]['lr']``); the
            optimizer is then untouched.
    """
    if type(state) not in _DICTS or type(state.get("state")) not in _DICTS \
            or type(state.get("param_groups")) not in _SEQUENCES:
        raise _edited(where, "must be a dict with 'state' (a dict) and 'param_groups' (a list), as "
                             "Optimizer.state_dict() returns")
    shapes = _check_param_groups(optimizer, state["param_groups"], f"{where}.param_groups")
    for pid, entry in state["state"].items():
        _check_param_state(entry, shapes.get(pid), f"{where}.state[{pid!r}]")
    try:
        optimizer.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - torch raises ValueError, KeyError, TypeError... for a bad state
        raise _edited(where, f"does not fit this {type(optimizer).__name__} ({type(exc).__name__}: {exc})") from exc


def _check_param_groups(optimizer: torch.optim.Optimizer, groups: Any, where: str) -> dict[int, tuple[int, ...]]:
    """Check saved ``param_groups`` against ``optimizer``'s; returns ``{saved parameter id: parameter shape}``."""
    own = optimizer.state_dict()["param_groups"]
    if len(groups) != len(own):
        raise _edited(where, f"has {len(groups)} groups; this {type(optimizer).__name__} has {len(own)}")
    shapes: dict[int, tuple[int, ...]] = {}
    for g, (saved, ref) in enumerate(zip(groups, own)):
        if type(saved) not in _DICTS:
            raise _edited(f"{where}[{g}]", f"is a {type(saved).__name__}, not a dict")
        for key, value in ref.items():
            if key != "params" and key in saved:
                _check_hyper(saved[key], value, f"{where}[{g}][{key!r}]")
        ids, params = saved.get("params"), optimizer.param_groups[g]["params"]
        if type(ids) not in _SEQUENCES or len(ids) != len(params) or not all(type(i) is int for i in ids):
            raise _edited(f"{where}[{g}]['params']", f"must list the integer ids of its {len(params)} parameters")
        shapes.update({i: tuple(p.shape) for i, p in zip(ids, params)})
    if len(shapes) != sum(len(group["params"]) for group in optimizer.param_groups):
        raise _edited(where, "name a parameter id twice")
    return shapes


def _check_hyper(saved: Any, own: Any, where: str) -> None:
    """A saved hyper-parameter of the type this optimizer's own has: numbers finite and >= 0, flags bool."""
    if isinstance(own, bool) or own is None:
        ok = saved is None or isinstance(saved, bool)
    elif isinstance(own, (int, float)):
        ok = type(saved) in (int, float) and math.isfinite(saved) and saved >= 0
    elif isinstance(own, (tuple, list)):
        ok = type(saved) in _SEQUENCES and len(saved) == len(own) \
            and all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in saved)
    elif isinstance(own, Tensor):
        ok = isinstance(saved, Tensor) or type(saved) in (int, float)
    else:
        ok = type(saved) is type(own)
    if not ok:
        raise _edited(where, f"is {saved!r}; expected a value like {own!r}")


def _check_param_state(entry: Any, shape: tuple[int, ...] | None, where: str) -> None:
    """One parameter's saved optimizer state: tensors of the parameter's shape (or 0-d counters), finite."""
    if shape is None:
        raise _edited(where, "belongs to no parameter of the saved param_groups")
    if type(entry) not in _DICTS:
        raise _edited(where, f"is a {type(entry).__name__}, not a dict of tensors")
    for key, value in entry.items():
        at = f"{where}[{key!r}]"
        if isinstance(value, Tensor):
            if value.dim() and tuple(value.shape) != shape:
                raise _edited(at, f"has shape {tuple(value.shape)}; its parameter has {shape}")
            if value.is_floating_point() and not bool(value.isfinite().all()):
                raise _edited(at, "holds NaN or infinite values")
        elif value is not None and type(value) not in (int, float):
            raise _edited(at, f"is a {type(value).__name__}, not a tensor")


def _edited(where: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where} {problem}. The checkpoint was edited or damaged: restore it, or delete it "
                           "and train again without --resume")


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
