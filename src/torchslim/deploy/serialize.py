"""Save and load compacted models without pickle; export them to TorchScript and ONNX.

A compact checkpoint is one ``torch.save`` file holding only data (loadable with
``torch.load(weights_only=True)``)::

    {"format": "torchslim.compact", "version": 1,
     "spec": '{"conv1": {"type": "Conv2d", "args": {...}}, "conv2": {"type": "Sequential", ...}}',
     "arch": '{"name": "lenet", "kwargs": {}}' or None,
     "state_dict": {...}}

The spec describes every top-most module of an allow-listed type (:data:`ALLOWED`) by its qualified
name. Loading rebuilds a fresh dense model of the same architecture (the *skeleton*), replaces each
described module by one built from its description, and loads the state dict strictly. The user's
own classes (containers such as a ResNet block) come from the skeleton and are never unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from torchslim._files import atomic_write
from torchslim._inputs import Inputs, as_tuple, eval_mode
from torchslim.deploy import _guard
from torchslim.deploy._attrs import plain_attrs, resize_tensors, restore_attrs
from torchslim.errors import CheckpointError, ConfigError, TorchSlimError, UnsupportedOperation, VerificationError
from torchslim.layers import LoweredConv2d, LowRank, NarrowMultiheadAttention, PaddedLayerNorm, PaddedStdConv

logger = logging.getLogger(__name__)

__all__ = ["ALLOWED", "export_onnx", "export_torchscript", "load_compact", "save_compact"]

FORMAT = "torchslim.compact"
VERSION = 1
_TOLERANCE = 1e-4  # export checks: max |ref - exported| <= _TOLERANCE * max(1, max |ref|)


def _tup(v: Any) -> Any:
    """JSON lists back to the tuples ``nn`` modules hold (``"same"`` padding stays a string)."""
    return tuple(v) if isinstance(v, list) else v


def _describe_conv(m: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
        "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
        "bias": m.bias is not None, "padding_mode": m.padding_mode,
    }


def _build_conv(a: Mapping[str, Any]) -> nn.Conv2d:
    return nn.Conv2d(
        a["in_channels"], a["out_channels"], _tup(a["kernel_size"]), _tup(a["stride"]), _tup(a["padding"]),
        _tup(a["dilation"]), a["groups"], a["bias"], a["padding_mode"],
    )


def _describe_linear(m: nn.Linear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _describe_bn(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {
        "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def _describe_lowered(m: LoweredConv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
        "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "bias": m.bias is not None,
        "num_columns": len(m.columns),
    }


def _build_lowered(a: Mapping[str, Any]) -> LoweredConv2d:
    columns = torch.zeros(a["num_columns"], dtype=torch.long)  # the real ones come with the state dict
    return LoweredConv2d(
        a["in_channels"], a["out_channels"], _tup(a["kernel_size"]), columns, _tup(a["stride"]),
        _tup(a["padding"]), _tup(a["dilation"]), bias=a["bias"],
    )


def _describe_std_conv(m: PaddedStdConv) -> dict[str, Any]:
    return {"weight": list(m.weight.shape), "bias": m.bias is not None,
            "gain": None if m.gain is None else list(m.gain.shape), "scale": m.scale, "eps": m.eps, "full": m.full,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation}


def _build_std_conv(a: Mapping[str, Any]) -> PaddedStdConv:
    shape = _tup(a["weight"])  # the values come with the state dict
    gain = None if a["gain"] is None else nn.Parameter(torch.ones(_tup(a["gain"])))
    bias = nn.Parameter(torch.zeros(shape[0])) if a["bias"] else None
    return PaddedStdConv(nn.Parameter(torch.zeros(shape)), bias, gain, a["scale"], a["eps"], a["full"],
                         _tup(a["stride"]), _tup(a["padding"]), _tup(a["dilation"]))


def _describe_rnn(m: nn.RNNBase) -> dict[str, Any]:
    args = {
        "input_size": m.input_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers, "bias": m.bias,
        "batch_first": m.batch_first, "dropout": m.dropout, "bidirectional": m.bidirectional,
    }
    if m.proj_size:
        args["proj_size"] = m.proj_size
    return args


# type name -> (class, describe, build). Exact classes only: a user subclass may change forward.
_KINDS: dict[str, tuple[type[nn.Module], Callable[[Any], dict], Callable[[Mapping[str, Any]], nn.Module]]] = {
    "Conv2d": (nn.Conv2d, _describe_conv, _build_conv),
    "Linear": (nn.Linear, _describe_linear, lambda a: nn.Linear(a["in_features"], a["out_features"], a["bias"])),
    "BatchNorm1d": (nn.BatchNorm1d, _describe_bn, lambda a: nn.BatchNorm1d(**a)),
    "BatchNorm2d": (nn.BatchNorm2d, _describe_bn, lambda a: nn.BatchNorm2d(**a)),
    "ZeroPad2d": (nn.ZeroPad2d, lambda m: {"padding": m.padding}, lambda a: nn.ZeroPad2d(_tup(a["padding"]))),
    "Identity": (nn.Identity, lambda m: {}, lambda a: nn.Identity()),
    # what a residual block keeps after its add when depth compaction reduces it to the shortcut
    "ReLU": (nn.ReLU, lambda m: {"inplace": m.inplace}, lambda a: nn.ReLU(a["inplace"])),
    "ReLU6": (nn.ReLU6, lambda m: {"inplace": m.inplace}, lambda a: nn.ReLU6(a["inplace"])),
    "LoweredConv2d": (LoweredConv2d, _describe_lowered, _build_lowered),
    "LSTM": (nn.LSTM, _describe_rnn, lambda a: nn.LSTM(**a)),  # ISS narrows hidden_size
    "GRU": (nn.GRU, _describe_rnn, lambda a: nn.GRU(**a)),
    "Embedding": (nn.Embedding, lambda m: {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                                           "padding_idx": m.padding_idx},
                  lambda a: nn.Embedding(a["num_embeddings"], a["embedding_dim"], a["padding_idx"])),
    # norms whose channels compaction cut: a LayerNorm keeps the cut channels' share of its statistics
    "PaddedLayerNorm": (PaddedLayerNorm, lambda m: {"kept": m.weight.shape[0], "full": m.full, "eps": m.eps,
                                                    "bias": m.bias is not None, "dim": m.dim},
                        lambda a: PaddedLayerNorm(a["kept"], a["full"], a["eps"], a["bias"], a["dim"])),
    # a weight-standardized conv whose zero input columns were cut: standardized over its original fan-in
    "PaddedStdConv": (PaddedStdConv, _describe_std_conv, _build_std_conv),
    # an nn.MultiheadAttention whose heads or width were cut (its out_proj is built with it)
    "NarrowMultiheadAttention": (NarrowMultiheadAttention, lambda m: {
        "embed_dim": m.embed_dim, "num_heads": m.num_heads, "head_dim": m.head_dim, "bias": m.in_proj_bias is not None,
        "batch_first": m.batch_first, "dropout": m.dropout}, lambda a: NarrowMultiheadAttention(**a)),
    "RMSNorm": (nn.RMSNorm, lambda m: {"normalized_shape": list(m.normalized_shape), "eps": m.eps,
                                       "elementwise_affine": m.elementwise_affine},
                lambda a: nn.RMSNorm(_tup(a["normalized_shape"]), a["eps"], a["elementwise_affine"])),
    "GroupNorm": (nn.GroupNorm, lambda m: {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps,
                                           "affine": m.affine}, lambda a: nn.GroupNorm(**a)),
}
_NAME_OF = {cls: name for name, (cls, _, _) in _KINDS.items()}
_CONTAINERS: dict[str, type[nn.Sequential]] = {"Sequential": nn.Sequential, "LowRank": LowRank}

#: Module classes a compact checkpoint can describe (exact classes; a container only if all its children are).
ALLOWED: tuple[type[nn.Module], ...] = (*_NAME_OF, *_CONTAINERS.values())


def _describable(m: nn.Module) -> bool:
    if type(m) in _CONTAINERS.values():
        return all(_describable(child) for child in m.children())
    return type(m) in _NAME_OF


def _describe(m: nn.Module) -> dict[str, Any]:
    """The JSON-able description of a describable module."""
    if type(m) in _CONTAINERS.values():
        return {"type": type(m).__name__, "children": [_describe(child) for child in m.children()]}
    name = _NAME_OF[type(m)]
    return {"type": name, "args": _KINDS[name][1](m)}


def _build(desc: Mapping[str, Any], where: str) -> nn.Module:
    """A fresh module from its description; ``where`` names it in errors."""
    kind = desc.get("type") if isinstance(desc, Mapping) else None
    try:
        if kind in _CONTAINERS:
            return _CONTAINERS[kind](*(_build(child, f"{where}.{i}") for i, child in enumerate(desc["children"])))
        if kind in _KINDS:
            return _KINDS[kind][2](desc.get("args", {}))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"bad description of module '{where}' ({kind}): {e!r}; the file is damaged") from e
    raise CheckpointError(
        f"module '{where}' has type {kind!r}, which compact checkpoints do not allow "
        f"(allowed: {sorted([*_KINDS, *_CONTAINERS])}); was the file written by a newer torchslim?"
    )


def _spec_of(module: nn.Module, name: str = "", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every top-most describable module under ``module`` by qualified name (``""`` = ``module`` itself)."""
    spec = {} if spec is None else spec
    if _describable(module):
        spec[name] = _describe(module)
        return spec
    for child_name, child in module.named_children():
        _spec_of(child, f"{name}.{child_name}" if name else child_name, spec)
    return spec


def save_compact(model: nn.Module, path: str | os.PathLike, *, arch: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (compacted or not) to ``path`` as data only: a module spec and its state dict.

    Args:
        model: the model to save; every top-most module of an :data:`ALLOWED` class is described
            (a ``Sequential`` only when all its children are), the rest comes from the skeleton on load.
        path: the file to write; it is replaced atomically (temporary file, then ``os.replace``).
        arch: ``{"name": str, "kwargs": {...}}`` for ``torchslim.models.create_model``, so that
            :func:`load_compact` needs no ``model=``; defaults to ``getattr(model, "arch", None)``.
    Raises:
        ConfigError: ``arch`` is not a JSON-able mapping with a string ``"name"``.
    """
    arch = getattr(model, "arch", None) if arch is None else arch
    if arch is not None and not (isinstance(arch, Mapping) and isinstance(arch.get("name"), str)):
        raise ConfigError(f"arch must look like {{'name': 'lenet', 'kwargs': {{}}}}, got {arch!r}")
    try:
        arch_json = None if arch is None else json.dumps(dict(arch))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"arch must be JSON-serializable (str, numbers, lists, dicts), got {arch!r}: {e}") from e
    spec = described = _spec_of(model)
    spec_ties, attrs = _ties(model), plain_attrs(model, set(described))
    if spec_ties:
        spec = {**spec, _TIES: spec_ties}
    if attrs:
        spec = {**spec, _ATTRS: attrs}
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # no shared storage
    payload = {"format": FORMAT, "version": VERSION, "spec": json.dumps(spec), "arch": arch_json, "state_dict": state}
    atomic_write(path, lambda f: torch.save(payload, f))
    logger.info("saved %s to %s: %d described modules, %d tensors", type(model).__name__, path, len(described),
                len(state))


def _skeleton(model: nn.Module | None, arch: Any, spec: Mapping[str, Any], stored_bytes: int) -> nn.Module:
    """The module tree to rebuild into: a copy of ``model``, or ``create_model`` from the stored arch.

    A skeleton from the arch is first built on the meta device: its keywords are checked against the
    factory's types and its dense size against the file's (:func:`_guard.check_skeleton`).
    """
    if model is not None:
        own = getattr(model, "arch", None)
        if isinstance(own, Mapping) and isinstance(arch, Mapping) and own.get("name") != arch.get("name"):
            raise CheckpointError(
                f"the checkpoint was written for arch {arch.get('name')!r} but model= is a {own.get('name')!r}; "
                f"pass a fresh {arch.get('name')!r} model"
            )
        return copy.deepcopy(model)
    if "" in spec:
        return nn.Identity()  # the whole model is described; replaced below
    if arch is None:
        raise CheckpointError(
            "the checkpoint stores no architecture (saved without arch=), so there is no skeleton to load "
            "into; pass model=<a freshly constructed dense model of the same architecture>"
        )
    _guard.check_arch(arch)
    try:
        from torchslim.models import create_model
    except ImportError as e:
        raise CheckpointError(
            f"cannot rebuild arch {arch.get('name')!r}: torchslim.models is unavailable ({e}); pass model="
        ) from e
    name, kwargs = arch["name"], arch.get("kwargs", {})
    try:
        with torch.device("meta"):
            meta = create_model(name, **kwargs)
    except NotImplementedError:  # a factory that reads tensor values: no measurement, the types were checked
        logger.warning("arch %r cannot be built on the meta device; loading without a size check", name)
    except (TorchSlimError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot build the stored arch {name!r} with {kwargs}: {e}; the file is damaged, "
                              "or pass model=") from e
    else:
        _guard.check_skeleton(meta, stored_bytes, name)
    return create_model(name, **kwargs)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at qualified ``name`` in ``root``, on the device of the module it replaces."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        parent = None
    old = dict(parent.named_children()).get(attr) if parent is not None else None
    if old is None:
        raise CheckpointError(
            f"the checkpoint describes module '{name}', which the skeleton ({type(root).__name__}) lacks: "
            "the file was written for another model; pass model= a fresh instance of the saved architecture"
        )
    device = next((t.device for t in [*old.parameters(), *old.buffers()]), None)
    setattr(parent, attr, new if device is None else new.to(device))


def _limited(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _load_state(model: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)``, with every misfit listed in one CheckpointError."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in expected.keys() & state.keys()
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{label}: {_limited(items)}"
        for label, items in [("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)]
        if items
    ]
    if problems:
        raise CheckpointError(
            f"'{path}' does not fit the model: " + "; ".join(problems) + ". The file was written for another "
            "model, or a narrowed layer has a type compact checkpoints cannot describe; pass model= a fresh "
            "instance of the architecture it was saved from."
        )
    model.load_state_dict(state, strict=True)


def load_compact(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save_compact`, in eval mode.

    Args:
        path: a file written by :func:`save_compact`.
        model: a freshly constructed dense model of the saved architecture (it is deep-copied, not
            modified); ``None`` builds one with ``torchslim.models.create_model`` from the stored arch.
    Returns:
        the skeleton with every described module rebuilt from the file and all tensors loaded.
    Raises:
        CheckpointError: corrupt, truncated or foreign file; pickled objects (code); a module type outside
            :data:`ALLOWED`; an argument, tied name or arch keyword of the wrong type or range; a described
            module whose tensors the file does not store with that shape; no skeleton (no stored arch and no
            ``model=``); keys or shapes that do not fit. All but the last before anything is allocated; a
            skeleton from the stored arch is measured on the meta device first (:mod:`torchslim.deploy._guard`).
    """
    ckpt = _guard.read(path, FORMAT, VERSION)
    state, spec = ckpt["state_dict"], _guard.parse_json(ckpt["spec"], "module spec", path)
    if not isinstance(spec, dict):
        raise CheckpointError(f"the module spec in '{path}' is not a JSON object; the file is damaged")
    ties = _guard.check_ties(spec.pop(_TIES, []), state, path)
    attrs, stored_bytes = spec.pop(_ATTRS, {}), _guard.check_tensors(state, path)
    for name, desc in spec.items():  # every described module fits the stored tensors before any is built
        _guard.check_description(desc, name or "<root>")
        with torch.device("meta"):
            _guard.check_module(_build(desc, name or "<root>"), name, desc["type"], state)
    skeleton = _skeleton(model, _guard.parse_json(ckpt.get("arch"), "arch", path), spec, stored_bytes)
    for name, desc in spec.items():
        new = _build(desc, name or "<root>")
        if name:
            _replace(skeleton, name, new)
        else:
            skeleton = new
    _retie(skeleton, ties, path)
    restore_attrs(skeleton, attrs, path)
    resize_tensors(skeleton, state, set(spec))
    _load_state(skeleton, state, path)
    return skeleton.eval()


_TIES = "__tied__"  # spec entry: lists of parameter names that are one tensor (a decoder tied to an embedding)
_ATTRS = "__attrs__"  # spec entry: plain settings of undescribed modules (head counts, epsilons), see deploy._attrs


def _ties(model: nn.Module) -> list[list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: nn.Module, ties: Any, path: str | os.PathLike) -> None:
    """Share each tied group's first parameter again: rebuilt modules got their own tensors."""
    try:
        for first, *others in ties:
            shared = model.get_parameter(first)
            for name in others:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, shared)
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"the tied parameters {ties!r} in '{path}' do not fit the model: {e}") from e


def _tensors(out: Any) -> list[Tensor]:
    """The tensors of a model output in flattening order (tensor, tuple/list, or dict)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _verify(ref: list[Tensor], got: Sequence[Any], what: str) -> float:
    """``max |ref - got|`` over all outputs; VerificationError above ``_TOLERANCE * max(1, max |ref|)``."""
    if len(ref) != len(got):
        raise VerificationError(f"{what} returns {len(got)} outputs, the model {len(ref)}")
    diff, scale = 0.0, 1.0
    for r, g in zip(ref, got):
        r = r.detach().cpu().float()
        g = torch.as_tensor(g).detach().cpu().float()
        if r.shape != g.shape:
            raise VerificationError(f"{what} gives shape {tuple(g.shape)}, the model {tuple(r.shape)}")
        if r.numel():
            diff = max(diff, (r - g).abs().max().item())
            scale = max(scale, r.abs().max().item())
    if not diff <= _TOLERANCE * scale:  # also catches NaN
        raise VerificationError(
            f"{what} differs from the model by {diff:.3g} (allowed {_TOLERANCE * scale:.3g}): the export "
            "does not compute the same function; look for data-dependent control flow in forward"
        )
    return diff


def export_torchscript(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike) -> float:
    """Trace ``model`` in eval mode, save it to ``path``, reload it and compare on ``example_inputs``.

    PyTorch deprecates TorchScript (its FutureWarnings are silenced here); prefer :func:`export_onnx`.

    Returns:
        the max absolute difference between the reloaded trace and the model.
    Raises:
        VerificationError: the difference exceeds ``1e-4 * max(1, max |output|)``.
    """
    inputs = as_tuple(example_inputs)
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        traced = torch.jit.trace(model, inputs)
        traced.save(os.fspath(path))
        loaded = torch.jit.load(os.fspath(path), map_location="cpu")
        ref = _tensors(model(*inputs))
        got = _tensors(loaded(*(x.cpu() for x in inputs)))
    diff = _verify(ref, got, f"the TorchScript file '{path}'")
    logger.info("exported TorchScript to %s, max abs diff %.3g", path, diff)
    return diff


def _import_onnx(check: bool) -> Any:
    """onnxruntime (``None`` unless ``check``), after making sure onnx and onnxscript import."""
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401

        return __import__("onnxruntime") if check else None
    except ImportError as e:
        raise TorchSlimError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({e}): pip install torchslim[export]"
        ) from e


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike,
    *,
    check: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> float | None:
    """Export ``model`` in eval mode to one ONNX file with the ``torch.export``-based exporter.

    Args:
        model: the model; ``ZeroPad2d`` with negative padding and :class:`LoweredConv2d` export.
        example_inputs: a tensor ``(B, ...)`` or a sequence of them, named ``input0, input1, ...``.
        path: the ``.onnx`` file; weights are stored inside it unless they exceed 1.5 GiB.
        check: run the file in onnxruntime (CPU) on ``example_inputs`` and compare with PyTorch.
        opset: the ONNX opset; ``None`` is the exporter's default.
        dynamic_batch: make dim 0 of every input dynamic; a model that fixes its batch size needs ``False``.
    Returns:
        the max absolute difference between onnxruntime and PyTorch, or ``None`` when ``check=False``.
    Raises:
        TorchSlimError: onnx, onnxscript or onnxruntime is not installed.
        UnsupportedOperation: the exporter fails on the model.
        VerificationError: the difference exceeds ``1e-4 * max(1, max |output|)``.
    """
    ort = _import_onnx(check)
    inputs = as_tuple(example_inputs)
    names = [f"input{i}" for i in range(len(inputs))]
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs) if dynamic_batch else None
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    with eval_mode(model):
        try:
            torch.onnx.export(
                model, inputs, os.fspath(path), dynamo=True, verbose=False, input_names=names,
                opset_version=opset, dynamic_shapes=dynamic, external_data=big,
            )
        except Exception as e:
            hint = " Try dynamic_batch=False." if dynamic_batch else ""
            raise UnsupportedOperation(
                f"torch.onnx.export failed on {type(model).__name__}: {type(e).__name__}: {e}.{hint}"
            ) from e
        if not check:
            return None
        with torch.no_grad():
            ref = _tensors(model(*inputs))
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    diff = _verify(ref, session.run(None, feeds), f"the ONNX file '{path}' in onnxruntime")
    logger.info("exported ONNX to %s, max abs diff %.3g in onnxruntime", path, diff)
    return diff
