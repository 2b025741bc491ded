"""What :func:`~torchslim.deploy.serialize.load_compact` checks in a file before it allocates anything.

A compact checkpoint is data, but data a hostile or damaged file controls: a spec that declares a 25000×25000
Linear beside a 100 KB state dict, an arch with ``num_classes: 1e9``, a stored tensor that is a stride-0 view
claiming more elements than the file holds. Every value is checked here for its type and range, every described
module is built on the meta device and its tensors' shapes compared with the stored ones, and the dense skeleton
built from an arch is measured on the meta device, all before a byte is allocated. So a load costs memory in
proportion to the file: its tensors, plus a skeleton of at most :data:`SKELETON_FLOOR` bytes or
:data:`SKELETON_FACTOR` times the file's tensors.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import typing
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from torchslim.errors import CheckpointError

SKELETON_FLOOR = 256 * 2**20  # bytes a dense skeleton from a stored arch may always take
SKELETON_FACTOR = 100  # ... or this many times the file's tensors (compaction rarely removes more than 99%)
_MAX_SIZE = 2**31 - 1  # a width, a count or a kernel side
_MAX_DEPTH = 32  # nested Sequential/LowRank containers in one description
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_GLOBAL = re.compile(r"GLOBAL:?\s+([\w.]+)")


def read(path: str | os.PathLike, fmt: str, version: int) -> dict[str, Any]:
    """The checkpoint dict at ``path``, with its format marker ``fmt``, ``version`` and field types checked."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; save a compacted model there with save_compact() "
                              "or `torchslim compact`, or check the path") from None
    except Exception as e:  # corrupt zip, truncated file, pickle with forbidden globals, ...
        raise read_error(path, e) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        marker = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"'{path}' is not a torchslim compact checkpoint (format marker {marker!r}, expected {fmt!r}). "
            "A plain state dict loads with model.load_state_dict(torch.load(path)); "
            "compacted models are written with torchslim.deploy.serialize.save_compact."
        )
    if ckpt.get("version") != version:
        raise CheckpointError(
            f"'{path}' has compact format version {ckpt.get('version')!r}; this torchslim reads version "
            f"{version}. Load it with the torchslim version that wrote it."
        )
    if not isinstance(ckpt.get("spec"), str) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"'{path}' lacks its 'spec' string or 'state_dict' dict; the file is damaged")
    return ckpt


def parse_json(text: str | None, field: str, path: str | os.PathLike) -> Any:
    """``json.loads(text)`` (None stays None); CheckpointError for bad or absurdly nested JSON."""
    try:
        return None if text is None else json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"the {field} in '{path}' is not valid JSON ({e}); the file is damaged") from e


def read_error(path: str | os.PathLike, e: Exception) -> CheckpointError:
    """The CheckpointError for a file ``torch.load(weights_only=True)`` refused: pickled code, or a damaged file."""
    found = _GLOBAL.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if found:
        return CheckpointError(
            f"'{path}' holds pickled Python objects (code: {found.group(1)}), not only data; torchslim never runs "
            "code from a file, so it does not load it. Compact checkpoints hold tensors and JSON only: write the "
            "model with torchslim.save_compact(model, path) from a source you trust."
        )
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CheckpointError(
        f"cannot read '{path}' as a torchslim compact checkpoint ({type(e).__name__}: {first_line}). "
        "The file is corrupt or truncated, or was not written by torchslim.save_compact; "
        "write it again with save_compact(model, path)."
    )


def check_tensors(state: Mapping[Any, Any], path: str | os.PathLike) -> int:
    """Every entry a str -> Tensor, and the tensors claim no more bytes than the file's storages hold.

    Returns:
        the tensors' total bytes.
    Raises:
        CheckpointError: a non-tensor entry, or views (stride 0, overlapping) claiming more than is stored.
    """
    claimed, storages = 0, {}
    for key, t in state.items():
        if not isinstance(key, str) or not isinstance(t, Tensor):
            raise CheckpointError(f"state_dict entry {key!r} in '{path}' is a {type(t).__name__}, not a tensor; "
                                  "the file is damaged")
        claimed += t.numel() * t.element_size()
        storage = t.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    held = sum(storages.values())
    if claimed > held:
        raise CheckpointError(f"the tensors in '{path}' claim {claimed} bytes but the file holds {held}: they are "
                              "expanded or overlapping views, which save_compact never writes; the file is damaged")
    return claimed


def _size(v: Any) -> bool:
    return type(v) is int and 0 <= v <= _MAX_SIZE


def _sizes(v: Any) -> bool:
    return _size(v) or (isinstance(v, list) and 0 < len(v) <= 8 and all(_size(x) for x in v))


def _ints(v: Any) -> bool:
    return type(v) is int and abs(v) <= _MAX_SIZE or (isinstance(v, list) and len(v) <= 8 and all(
        type(x) is int and abs(x) <= _MAX_SIZE for x in v))


def _finite(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# every argument any described module kind takes -> (its check, what it must be)
_ARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_size, "an int >= 0") for k in (
        "in_channels", "out_channels", "in_features", "out_features", "num_features", "num_columns", "input_size",
        "hidden_size", "num_layers", "proj_size", "num_embeddings", "embedding_dim", "kept", "full", "embed_dim",
        "num_heads", "head_dim", "num_groups", "num_channels", "groups")},
    **{k: (lambda v: type(v) is bool, "true or false") for k in (
        "bias", "affine", "track_running_stats", "inplace", "batch_first", "bidirectional", "elementwise_affine")},
    **{k: (_sizes, "an int >= 0 or a list of them") for k in (
        "kernel_size", "stride", "dilation", "weight", "normalized_shape")},
    "gain": (_optional(_sizes), "null or a list of ints >= 0"),
    "padding": (lambda v: _ints(v) or v in ("same", "valid"), "ints or 'same'/'valid'"),
    "padding_mode": (lambda v: v in _PADDING_MODES, f"one of {_PADDING_MODES}"),
    "padding_idx": (_optional(lambda v: type(v) is int and abs(v) <= _MAX_SIZE), "null or an int"),
    "dim": (lambda v: type(v) is int and abs(v) <= 8, "an int in [-8, 8]"),
    "eps": (_optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    "momentum": (_optional(lambda v: _finite(v) and 0 <= v <= 1), "null or a number in [0, 1]"),
    "dropout": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "scale": (_finite, "a finite number"),
}


def check_description(desc: Any, where: str, depth: int = 0) -> None:
    """The JSON shape of one module description and every argument's type and range.

    Raises:
        CheckpointError: naming the entry and the argument.
    """
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        raise CheckpointError(f"module '{where}' is described by {_short(desc)}, not {{'type': ..., ...}}; "
                              "the file is damaged")
    if "children" in desc:
        children = desc["children"]
        if not isinstance(children, list) or depth >= _MAX_DEPTH:
            raise CheckpointError(f"module '{where}' ({desc['type']}) has children {_short(children)}: not a list, "
                                  f"or nested deeper than {_MAX_DEPTH}; the file is damaged")
        for i, child in enumerate(children):
            check_description(child, f"{where}.{i}", depth + 1)
        return
    args = desc.get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f"module '{where}' ({desc['type']}) has args {_short(args)}, not a JSON object")
    for key, value in args.items():
        check, wanted = _ARGS.get(key, (None, ""))
        if check is None:
            raise CheckpointError(f"module '{where}' ({desc['type']}) has an unknown argument {key!r}; "
                                  "was the file written by a newer torchslim?")
        if not check(value):
            raise CheckpointError(f"module '{where}' ({desc['type']}) has {key}={_short(value)}; it must be "
                                  f"{wanted}. The file is damaged or was edited by hand")


def check_module(meta: nn.Module, name: str, kind: str, state: Mapping[str, Tensor]) -> None:
    """A described module (built on the meta device) needs exactly the stored tensors' shapes.

    Raises:
        CheckpointError: a tensor the file lacks, or one of another shape, naming the entry.
    """
    for key, t in meta.state_dict().items():
        full = f"{name}.{key}" if name else key
        stored = state.get(full)
        if stored is None:
            raise CheckpointError(f"module '{name or '<root>'}' ({kind}) needs tensor '{full}', which the file "
                                  "lacks; the file is damaged")
        if tuple(stored.shape) != tuple(t.shape):
            raise CheckpointError(
                f"module '{name or '<root>'}' ({kind}) is described with {key} of shape {tuple(t.shape)} but the "
                f"file stores {tuple(stored.shape)}; the spec and the tensors disagree, the file is damaged")


def check_ties(ties: Any, state: Mapping[str, Tensor], path: str | os.PathLike) -> list[list[str]]:
    """Tied groups: lists of at least two names of stored tensors of one shape."""
    if not isinstance(ties, list):
        raise CheckpointError(f"the tied parameters in '{path}' are {_short(ties)}, not a list; the file is damaged")
    for group in ties:
        if not (isinstance(group, list) and len(group) >= 2 and all(isinstance(n, str) for n in group)):
            raise CheckpointError(f"tied group {_short(group)} in '{path}' is not a list of two or more names")
        unknown = [n for n in group if n not in state]
        if unknown:
            raise CheckpointError(f"tied group {group} in '{path}' names {unknown}, which the file stores no "
                                  "tensor for; the file is damaged")
        if len({tuple(state[n].shape) for n in group}) > 1:
            raise CheckpointError(f"tied group {group} in '{path}' joins tensors of different shapes")
    return ties


def check_arch(arch: Any) -> None:
    """``{"name": str, "kwargs": {str: value}}``, each value of its registered factory's annotated type, sizes >= 0.

    Raises:
        CheckpointError: naming the keyword and the value.
    """
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs", {}), dict)):
        raise CheckpointError(f"the stored arch {_short(arch)} is not {{'name': str, 'kwargs': {{...}}}}")
    try:
        from torchslim.models.registry import _REGISTRY  # the factory's annotations say what each keyword is

        factory = _REGISTRY.get(arch["name"])
        hints = typing.get_type_hints(factory) if factory is not None else {}
    except Exception:  # an annotation that does not resolve: check the JSON kinds only
        hints = {}
    for key, value in arch.get("kwargs", {}).items():
        hint = hints.get(key, Any)
        if not _fits(value, hint):
            raise CheckpointError(f"the stored arch {arch['name']!r} has {key}={_short(value)}, which is not "
                                  f"{getattr(hint, '__name__', hint)} (numbers finite, sizes >= 0); "
                                  "the file is damaged or was edited by hand")


def _fits(value: Any, hint: Any) -> bool:
    """``value`` (from JSON) is of type ``hint``; ints must be >= 0, floats finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _plain(value)
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return _size(value)
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str) and len(value) <= 4096
    if hint is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        items = [a for a in args if a is not Ellipsis] or [Any]
        return isinstance(value, list) and len(value) <= 4096 and all(_fits(v, items[min(i, len(items) - 1)])
                                                                   for i, v in enumerate(value))
    if args:  # a union, Optional or a Literal
        return any(_fits(value, a) for a in args) if origin is not typing.Literal else value in args
    return _plain(value)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, dict)):
        items = value.values() if isinstance(value, dict) else value
        return len(value) <= 4096 and all(_plain(v) for v in items)
    return value is None or type(value) in (bool, str) or _finite(value) and abs(value) <= 2**53


def check_skeleton(meta: nn.Module, stored_bytes: int, name: str) -> None:
    """The dense skeleton (on the meta device) costs at most the floor or the factor times the file's tensors."""
    need = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
    allowed = max(SKELETON_FLOOR, SKELETON_FACTOR * stored_bytes)
    if need > allowed:
        raise CheckpointError(
            f"the stored arch {name!r} builds a dense model of {need / 2**20:.0f} MiB for {stored_bytes / 2**20:.1f} "
            f"MiB of stored tensors (allowed {allowed / 2**20:.0f} MiB); the arch's keywords do not match the file. "
            "If you trust it, pass model=<a freshly built dense model> instead")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
