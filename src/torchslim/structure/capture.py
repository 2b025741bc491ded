"""Graph capture: ``torch.fx.symbolic_trace`` with leaf modules, then shapes from the example inputs."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from torchslim.errors import ShapeMismatch, UnsupportedOperation


def capture(model: nn.Module, example_inputs: tuple[Tensor, ...],
            leaf_modules: Sequence[type[nn.Module]] = ()) -> fx.GraphModule:
    """``model`` as a GraphModule whose nodes know their output shapes (``node.meta["tensor_meta"]``).

    Shapes are propagated in eval mode, so BatchNorm statistics are not touched; ``model``'s mode is
    restored afterwards.

    Raises:
        UnsupportedOperation: torch.fx cannot trace the forward.
        ShapeMismatch: the model fails on ``example_inputs``.
    """
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, tuple(leaf_modules)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python
        raise UnsupportedOperation(
            f"torch.fx could not trace {type(model).__name__}: {e}. Make the forward traceable "
            "(no data-dependent Python control flow), or pass leaf_modules=(TheBlock,) for the "
            "submodule that is not."
        ) from e
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    gm.eval()  # shape propagation must not touch BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except RuntimeError as e:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in example_inputs]
        raise ShapeMismatch(
            f"{type(model).__name__} fails on example inputs of shape {shapes}: {e}. Pass a batch "
            "the model accepts, e.g. one from your data loader."
        ) from e
    finally:
        model.train(was_training)
    return gm


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


def module_path(node: fx.Node) -> str:
    """The attribute path of the module a node runs in: its own for a module call, the caller's otherwise.

    From fx's ``nn_module_stack`` (innermost last); ``""`` is the traced model itself.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack)).split("@")[0] if stack else ""
