"""Graph capture: ``torch.fx`` first, ``torch.export`` where fx cannot trace; shapes for every node.

``torch.fx.symbolic_trace`` (with leaf modules) keeps module calls as ``call_module`` nodes, which module
rules and leaf modules need, and its shapes come from one eval-mode run on the example inputs
(``ShapeProp``). Where fx fails (Hugging Face transformers, a ``forward`` that branches on a shape),
``torch.export.export(strict=False)`` captures aten operations instead: ``ep.module()`` reads parameters
by their qualified names (``get_attr`` nodes), every node knows its module (``nn_module_stack``) and its
output (``meta["val"]``, a fake tensor), so no real forward runs.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from torchslim._inputs import eval_mode
from torchslim.errors import ConfigError, ShapeMismatch, UnsupportedOperation
from torchslim.layers import NarrowMultiheadAttention  # a leaf, as the nn.MultiheadAttention it replaces

log = logging.getLogger(__name__)

Capture = Literal["auto", "fx", "export"]
CAPTURES = ("auto", "fx", "export")


def capture(model: nn.Module, example_inputs: tuple[Tensor, ...], leaf_modules: Sequence[type[nn.Module]] = (),
            how: Capture = "auto") -> fx.GraphModule:
    """``model`` as a GraphModule whose nodes know their output shapes (``node.meta["tensor_meta"]``).

    ``how``: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, aten ops; ``leaf_modules`` do not
    apply) or ``"auto"``: fx, and export where fx cannot trace. Shapes are found in eval mode (fx: one
    forward; export: its run on fake tensors), so BatchNorm statistics are not touched; every module's
    training flag is restored afterwards, and the graph reads ``model``'s own parameters (nothing is copied).

    Raises:
        UnsupportedOperation: the chosen capture fails (``"auto"``: both do; the message gives both reasons).
        ShapeMismatch: the model fails on ``example_inputs`` (found by fx's shape propagation).
        ConfigError: ``how`` is not one of the three.
    """
    if how not in CAPTURES:
        raise ConfigError(f"capture must be one of {CAPTURES}, got {how!r}")
    if how == "export":
        return _export(model, example_inputs)
    try:
        graph = _trace(model, leaf_modules)
    except Exception as fx_error:  # noqa: BLE001 - fx raises many types for untraceable Python
        if how == "fx":
            raise UnsupportedOperation(
                f"torch.fx could not trace {type(model).__name__}: {_first_line(fx_error)}. Make the forward "
                "traceable (no Python control flow on tensor values or shapes), pass leaf_modules=(TheBlock,) "
                "for the submodule that is not, or capture='auto' to fall back to torch.export."
            ) from fx_error
        log.info("torch.fx could not trace %s (%s): capturing with torch.export", type(model).__name__,
                 _first_line(fx_error))
        return _export(model, example_inputs, fx_error)
    return _propagate(model, fx.GraphModule(model, graph), example_inputs)


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """While capturing: Hugging Face configs with ``use_cache=False``, restored afterwards.

    A key/value cache is state the forward appends to (``torch.cat`` into a cache object), not part of the
    function from inputs to outputs; captured, it would pin every head. The compact model runs with the
    cache as before: its cache simply holds fewer heads.
    """
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


def _trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module]]) -> fx.Graph:
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, (*leaf_modules, NarrowMultiheadAttention)) or super().is_leaf_module(m, qualname)

    return _Tracer().trace(model)


class _NodeFailed(Exception):
    """A node of the graph raised while shapes were propagated."""

    def __init__(self, node: fx.Node, error: Exception) -> None:
        super().__init__(f"at node '{node.name}' ({node.op} {node.target}): {type(error).__name__}: {error}")


class _ShapeProp(fx.Interpreter):
    """fx's ``ShapeProp`` (``node.meta["tensor_meta"]``, ``["type"]``) without its ``traceback.print_exc()``:
    a model that fails on the example inputs is the user's ShapeMismatch, not a traceback on stderr."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the error names its node below; fx would append its whole trace

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - any error in the user's forward, as ShapeProp wraps them
            raise _NodeFailed(n, e) from e
        found = []

        def describe(v: Any) -> Any:
            if isinstance(v, Tensor):
                found.append(v)
                return _extract_tensor_metadata(v)
            return v

        meta = map_aggregate(result, describe)
        if found:  # as ShapeProp: nodes without tensors get no tensor_meta
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _propagate(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple[Tensor, ...]) -> fx.GraphModule:
    """Shapes of an fx trace: one eval-mode run of ``gm`` on the example inputs."""
    try:
        with eval_mode(model), torch.no_grad():  # gm's submodules are model's: eval covers them
            _ShapeProp(gm).run(*example_inputs)
    except _NodeFailed as e:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in example_inputs]
        raise ShapeMismatch(
            f"{type(model).__name__} fails on example inputs of shape {shapes} {e}. Pass a batch "
            "the model accepts, e.g. one from your data loader."
        ) from e.__cause__
    return gm


def _export(model: nn.Module, example_inputs: tuple[Tensor, ...], fx_error: Exception | None = None) -> fx.GraphModule:
    """``torch.export`` (non-strict, eval mode) unlifted to a GraphModule, its shapes from the fake run."""
    try:
        with eval_mode(model):
            gm = torch.export.export(model, example_inputs, strict=False).module()
    except Exception as e:  # noqa: BLE001 - export raises many types (guards, data-dependent shapes, pytrees)
        if fx_error is not None:
            raise UnsupportedOperation(_both_failed(model, fx_error, e)) from e
        raise UnsupportedOperation(f"torch.export could not capture {type(model).__name__}: {_first_line(e)}. "
                                   f"{_EXPORT_REMEDY}, or capture='fx'.") from e
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users:  # export's input guards (_guards_fn): no tensors
            gm.graph.erase_node(node)
        elif "tensor_meta" not in node.meta:
            _fill_meta(node)
    gm.recompile()
    return gm


def _fill_meta(node: fx.Node) -> None:
    """``tensor_meta`` from export's fake value where it gave none: tuples of tensors (``split``, ``chunk``)."""
    val = node.meta.get("val")
    if isinstance(val, Tensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)
    elif isinstance(val, (list, tuple)) and val and all(isinstance(v, Tensor) for v in val):
        node.meta["tensor_meta"] = [_extract_tensor_metadata(v) for v in val]


_EXPORT_REMEDY = ("Make the forward exportable (return tensors or pytree containers of tensors; a Hugging Face "
                  "model with use_cache=False in its config, or wrapped to return .logits; no Python branch on "
                  "tensor values)")


def _both_failed(model: nn.Module, fx_error: Exception, export_error: Exception) -> str:
    return (f"neither torch.fx nor torch.export could capture {type(model).__name__}. torch.fx: "
            f"{_first_line(fx_error)}. torch.export: {_first_line(export_error)}. {_EXPORT_REMEDY}; "
            "or make the forward traceable by torch.fx, passing leaf_modules=(TheBlock,) for a submodule that is not.")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__).rstrip(".")


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The output shape of a node that returns one tensor, else None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def tensor_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
    """The shapes of a node that returns a tuple of tensors (``split``), else None."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (list, tuple)) and meta and all(hasattr(m, "shape") for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


def module_ops(graph: fx.Graph, path: str) -> set[fx.Node]:
    """The calls with a tensor output that run in the module ``path`` itself (not in its submodules)."""
    return {n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
            and module_path(n) == path and tensor_shape(n) is not None}


def module_path(node: fx.Node) -> str:
    """The attribute path of the module a node runs in: its own for a module call, the caller's otherwise.

    From ``nn_module_stack`` (innermost last), whose values are ``(path, class)`` in fx and export
    graphs alike; ``""`` is the traced model itself.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return str(next(reversed(stack.values()))[0]) if stack else ""
