"""Compacted Hugging Face models as Hugging Face checkpoints: a config that describes the new widths.

``compact`` keeps a transformers model's own classes, so where every layer kept the same widths the result
is again a model its config can describe: :func:`pretrained_config` writes that config, checked by building
the class from it (on the meta device, no memory) and comparing every parameter's shape, and
:func:`save_pretrained` saves with it, so ``AutoModel.from_pretrained`` (or the class's) loads it back.
Layers that kept different widths, or a width cut through LayerNorm (an exact but non-standard module),
cannot be written so: use :func:`torchslim.save_compact` for those.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import ConfigError

__all__ = ["pretrained_config", "save_pretrained"]


def _hf_model(model: nn.Module) -> nn.Module:
    """``model`` itself or the first submodule that is a transformers ``PreTrainedModel`` (a wrapper's)."""
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m, "save_pretrained"):
            return m
    raise ConfigError(f"{type(model).__name__} holds no Hugging Face model (nothing with .config and "
                      ".save_pretrained); save it with torchslim.save_compact instead")


def _first(model: nn.Module, suffix: str) -> nn.Module:
    return next(m for name, m in model.named_modules() if name.endswith(suffix))


def _llama_like(model: nn.Module, config: Any) -> dict[str, Any]:
    """LLaMA, Qwen2, Mistral: an explicit ``head_dim``, separate projections, RMSNorm."""
    attn, head_dim = _first(model, "layers.0.self_attn"), config.head_dim
    norm = _first(model, "layers.0.input_layernorm")
    return {"hidden_size": model.get_input_embeddings().embedding_dim,
            "intermediate_size": _first(model, "layers.0.mlp").gate_proj.out_features,
            "num_attention_heads": attn.q_proj.out_features // head_dim,
            "num_key_value_heads": attn.k_proj.out_features // head_dim,
            "head_dim": head_dim, "rms_norm_eps": float(norm.variance_epsilon)}


def _gpt2(model: nn.Module, config: Any) -> dict[str, Any]:
    """GPT-2: Conv1D weights are ``(in, out)``; head_dim is ``n_embd / n_head``, so heads stay as they were."""
    return {"n_embd": model.get_input_embeddings().embedding_dim,
            "n_inner": _first(model, "h.0.mlp.c_fc").weight.shape[1]}


def _bert(model: nn.Module, config: Any) -> dict[str, Any]:
    """BERT: head size is ``hidden_size / num_attention_heads``, so heads stay as they were."""
    return {"hidden_size": model.get_input_embeddings().embedding_dim,
            "intermediate_size": _first(model, "layer.0.intermediate.dense").out_features}


_FAMILIES = {"llama": _llama_like, "qwen2": _llama_like, "mistral": _llama_like, "gpt2": _gpt2, "bert": _bert}


def pretrained_config(model: nn.Module) -> Any:
    """A copy of the (compacted) model's config with its widths: hidden size, MLP neurons, heads.

    Raises:
        ConfigError: not a supported Hugging Face family (``llama``, ``qwen2``, ``mistral``, ``gpt2``,
            ``bert``), or a config of the new widths does not build this model: layers kept different
            widths, or a norm was replaced (the message names the first parameter or module that differs).
    """
    hf = _hf_model(model)
    config = hf.config
    family = _FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(f"no config rewriting for model_type {config.model_type!r} (supported: "
                          f"{', '.join(sorted(_FAMILIES))}); save it with torchslim.save_compact instead")
    new = copy.deepcopy(config)
    for key, value in family(hf, config).items():
        setattr(new, key, value)
    _check_builds(hf, new)
    return new


def _check_builds(hf: nn.Module, config: Any) -> None:
    """Raise unless ``type(hf)(config)`` has ``hf``'s module classes and parameter shapes."""
    with torch.device("meta"):
        twin = type(hf)(config)
    ours, theirs = dict(hf.named_modules()), dict(twin.named_modules())
    for name, module in ours.items():
        if name in theirs and type(theirs[name]) is not type(module):
            raise ConfigError(
                f"'{name}' is a {type(module).__name__} after compaction, not a {type(theirs[name]).__name__}: "
                "a width cut through this norm needs the exact module torchslim put there, which no config "
                "describes. Save with torchslim.save_compact, or regularize without the 'embed' kind")
    shapes = {n: tuple(p.shape) for n, p in twin.state_dict().items()}
    for name, tensor in hf.state_dict().items():
        if name in shapes and shapes[name] != tuple(tensor.shape):
            raise ConfigError(
                f"'{name}' is {tuple(tensor.shape)} but a config of the new widths gives {shapes[name]}: layers "
                "kept different widths (or heads a config cannot state). Save with torchslim.save_compact, or "
                "compact with one width per kind for every layer")


def save_pretrained(model: nn.Module, directory: str | Path, **kwargs: Any) -> None:
    """``save_pretrained`` of the Hugging Face model in ``model`` with :func:`pretrained_config`'s config.

    ``kwargs`` go to transformers' ``save_pretrained``; the model's own config is left as it was.
    """
    hf = _hf_model(model)
    config, hf.config = hf.config, pretrained_config(model)
    try:
        hf.save_pretrained(str(directory), **kwargs)
    finally:
        hf.config = config
