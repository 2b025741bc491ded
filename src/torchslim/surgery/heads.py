"""Attention modules after their heads were cut: the head counts they keep agree with their projections again.

The compact model runs the user's own attention classes. A class that splits with ``view(B, T, -1, D)``
needs nothing (LLaMA, Qwen2, BERT, GPT-2 and torchslim's own blocks do); one that reads its head count
(timm's ``reshape(B, N, 3, self.num_heads, self.head_dim)``), a width (``self.attn_dim``,
``self.all_head_size``) or a split size (GPT-2's ``split(self.split_size)``) gets them rewritten from
its projections' new shapes. ``num_key_value_groups`` (LLaMA) stays: whole key/value groups go.
Configs shared by every layer (``config.num_attention_heads``) are left alone. An ``nn.MultiheadAttention`` cannot
run with fewer heads or a narrower width (its head width is ``embed_dim // num_heads``): it becomes a
:class:`~torchslim.layers.NarrowMultiheadAttention` holding the same cut parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from torchslim.layers import NarrowMultiheadAttention
from torchslim.structure.heads_layout import HEAD_COUNTS, HEAD_DIMS, INNER_WIDTHS, KV_HEAD_COUNTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadAttrs:
    """Where an attention class keeps its head count, and which projection tells the new one.

    The first child in ``query`` that exists is the query projection: its output width is
    ``parts·heads·head_dim`` (``parts`` 3 for one fused q, k, v projection, 2 for fused k, v).
    """

    heads: str                              # the attribute holding the query head count
    query: tuple[tuple[str, int], ...]      # (child projection, parts), the first present
    head_dim: str | None = None             # the attribute holding D; None: old width / (parts·heads)
    widths: tuple[str, ...] = ()            # attributes equal to heads·D, rewritten with it
    kv_heads: str | None = None             # the attribute holding the key/value head count (GQA)
    key: tuple[str, ...] = ()               # the key projection, the first present: its width is kv_heads·D


# by qualified class name (torchslim imports neither timm nor transformers)
TABLE: dict[str, HeadAttrs] = {
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention":
        HeadAttrs("num_heads", (("q_attn", 1), ("c_attn", 3)), "head_dim", ("split_size",)),
    "transformers.models.bert.modeling_bert.BertSelfAttention":
        HeadAttrs("num_attention_heads", (("query", 1),), "attention_head_size", ("all_head_size",)),
    "timm.layers.attention.Attention": HeadAttrs("num_heads", (("qkv", 3),), "head_dim", ("attn_dim",)),
}

# the default, for a class not in the table: an attribute named like a head count, the first child
# projection named like a query (or fused q, k, v) projection, a head-width attribute if there is one
_QUERIES = (("q_proj", 1), ("q", 1), ("query", 1), ("wq", 1), ("to_q", 1), ("q_attn", 1), ("qkv", 3),
            ("c_attn", 3), ("qkv_proj", 3), ("Wqkv", 3), ("in_proj", 3), ("query_key_value", 3))
_KEYS = ("k_proj", "k", "key", "wk", "to_k")


def attrs_of(module: nn.Module) -> HeadAttrs | None:
    """The table's entry for ``module``'s class (or a base class), else the default's, or None (no head count)."""
    for cls in type(module).__mro__:
        spec = TABLE.get(f"{cls.__module__}.{cls.__qualname__}")
        if spec is not None:
            return spec
    heads = next((a for a in HEAD_COUNTS if _int(module, a) is not None), None)
    if heads is None:
        return None
    return HeadAttrs(heads, _QUERIES, next((a for a in HEAD_DIMS if _int(module, a) is not None), None),
                     tuple(a for a in INNER_WIDTHS if _int(module, a) is not None),
                     next((a for a in KV_HEAD_COUNTS if _int(module, a) is not None), None), _KEYS)


def sync_attention(model: nn.Module, before: dict[str, tuple[int, ...]]) -> None:
    """Make every attention module's head counts agree with its cut projections; ``before``: shapes before the cut.

    Run after the layers' own sizes were synced (``Linear.out_features``, HF ``Conv1D.nf``).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.MultiheadAttention, NarrowMultiheadAttention)):
            _narrow(model, name, module)
            continue
        spec = attrs_of(module)
        if spec is not None:
            _sync(module, name, spec, before)


def _narrow(model: nn.Module, name: str, mha: nn.Module) -> None:
    """An ``nn.MultiheadAttention`` whose ``in_proj_weight (3·H'·D, E')`` was cut: a ``NarrowMultiheadAttention``
    with ``H'`` heads and width ``E'`` holding its parameters (a narrow one: its counts set)."""
    rows, width = mha.in_proj_weight.shape
    heads = rows // (3 * mha.head_dim)
    if isinstance(mha, NarrowMultiheadAttention):
        mha.num_heads, mha.embed_dim = heads, width
        return
    if (heads, width) == (mha.num_heads, mha.embed_dim):
        return
    narrow = NarrowMultiheadAttention(width, heads, mha.head_dim, batch_first=mha.batch_first, dropout=mha.dropout)
    narrow.in_proj_weight, narrow.in_proj_bias, narrow.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, narrow)


def _sync(module: nn.Module, name: str, spec: HeadAttrs, before: dict[str, tuple[int, ...]]) -> None:
    """Rewrite ``module``'s head counts (and widths) from its query (and key) projection's new width."""
    h = _int(module, spec.heads)
    found = next(((child, parts) for child, parts in spec.query if _width(module, name, child, before)), None)
    if h is None or found is None:
        return
    child, parts = found
    old, new = _width(module, name, child, before)
    d = _int(module, spec.head_dim) if spec.head_dim else old // (parts * h)
    if old == new or not d:
        return
    if old != parts * h * d or new % (parts * d):
        log.warning("'%s' (%s): %s is %d wide, not a multiple of %d heads of %d; its head count is left at %d",
                    name, type(module).__name__, child, new, parts, d, h)
        return
    for attr in spec.widths:
        if _int(module, attr) == h * d:
            setattr(module, attr, new // parts)
    setattr(module, spec.heads, new // (parts * d))
    key = next((c for c in spec.key if _width(module, name, c, before)), None)
    if spec.kv_heads and key is not None and _int(module, spec.kv_heads) is not None:
        setattr(module, spec.kv_heads, _width(module, name, key, before)[1] // d)


def _int(module: nn.Module, attr: str | None) -> int | None:
    value = getattr(module, attr, None) if attr else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _width(module: nn.Module, name: str, child: str, before: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """``(old, new)`` output width of the child projection ``child`` (a Linear, or HF's Conv1D), or None."""
    weight = getattr(getattr(module, child, None), "weight", None)
    if not isinstance(getattr(module, child, None), nn.Module) or weight is None or weight.dim() != 2:
        return None
    out = 1 if type(getattr(module, child)).__name__ == "Conv1D" else 0  # Conv1D's weight is (in, out)
    old = before.get(f"{name}.{child}.weight" if name else f"{child}.weight", tuple(weight.shape))
    return old[out], weight.shape[out]
