"""The TernGrad codec (Wen et al., NIPS 2017): ternarize a gradient, pack the codes, decode their sum.

A worker sends ``g̃ = s · t`` with ``t ∈ {-1, 0, +1}`` (one int8 code per element) and one scaler ``s``:

1. ``s = scaler(g)``: ``max|g|``, or ``min(max|g|, c·σ)`` with TernGrad's gradient clipping (c = 2.5);
   workers share one ``s`` per layer (a MAX all-reduce of their scalers) so codes can be summed.
2. ``t = ternarize(g, s, generator)``: ``P(t_k = sign g_k) = |g_k| / s``, else ``t_k = 0``, so
   ``E[s · t] = g`` wherever ``|g| ≤ s`` (to within ``2^-17·s``: 16 random bits per element); larger
   entries become ``±1``, which is the clipping.
3. ``pack(t, "2bit")`` (4 codes per byte) or ``pack(t, "base3")`` (5 codes per byte, 1.6 bits per element,
   against the ``log2 3 ≈ 1.585`` bound) for the wire; ``unpack`` inverts it exactly.
4. ``unpack_sum(gathered, numel, scheme)``: the integer ``Σ_i t_i`` over the workers' packed codes, so
   the average gradient is ``s · Σ_i t_i / N``.

Everything here is a pure, vectorized tensor function that runs on the device of its inputs.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from torchslim.errors import ConfigError, ShapeMismatch

SCHEMES = ("2bit", "base3")
_CODES_PER_BYTE = {"2bit": 4, "base3": 5}

# ternarize compares 16 random bits per element with a threshold; four 16-bit lanes per int64 draw.
_LEVELS = 1 << 16  # uniform integers v ∈ {0, …, 2^16 − 1}
_LANES = 4  # int16 lanes per random int64
_CPU_CHUNK = 1 << 18  # elements per CPU thread and step: scratch stays in cache, no page faults
_MAX_ROWS_PER_SUM = 127  # biased lanes (t + 1 ≤ 2) summed in one uint8 byte: 2·127 ≤ 255, no carry
_PACK_CHUNK = 20 << 16  # codes per step of pack on CPU (a multiple of 4 and 5)
_SUM_BLOCK = 1 << 16  # packed bytes per step of unpack_sum, all workers at once


def _check_scheme(scheme: str) -> int:
    """Codes per byte of ``scheme``; ConfigError naming the valid schemes otherwise."""
    if scheme not in _CODES_PER_BYTE:
        raise ConfigError(f"unknown packing scheme {scheme!r}; valid schemes are {', '.join(map(repr, SCHEMES))}")
    return _CODES_PER_BYTE[scheme]


def packed_numel(numel: int, scheme: str) -> int:
    """Bytes that :func:`pack` uses for ``numel`` codes: ``⌈numel/4⌉`` ("2bit") or ``⌈numel/5⌉`` ("base3")."""
    per_byte = _check_scheme(scheme)
    if numel < 0:
        raise ConfigError(f"numel must be >= 0, got {numel}")
    return -(-numel // per_byte)


def scaler(g: Tensor, clip_sigma: float | None = 2.5) -> Tensor:
    """TernGrad's per-layer scaler ``s_t``: ``||g||_∞``, optionally clipped to ``c·σ``.

    Args:
        g: one layer's gradient, any shape ``(*)``, floating point.
        clip_sigma: the clipping factor ``c``; ``s = min(max|g|, c·σ)`` with ``σ`` the standard deviation
            of ``g`` about its mean (population, as in TernGrad's code). The paper's ``c = 2.5`` moves the
            gradient by about 1% in length and 2–3° in direction. ``None`` or ``math.inf``: ``s = max|g|``,
            no clipping. Entries beyond ``s`` are clipped by :func:`ternarize` (they become ``±1``).
    Returns:
        0-d float32 tensor ``s ≥ 0`` on ``g``'s device; 0 for an empty or all-zero ``g``. A tensor whose
        entries are all equal has ``σ = 0``, so with clipping ``s = 0`` and its gradient decodes to zero:
        leave such tensors (e.g. single-element ones) uncompressed. Non-finite ``g`` gives non-finite ``s``.
    Raises:
        ConfigError: ``clip_sigma`` is not ``> 0``.
    """
    if clip_sigma is not None and not clip_sigma > 0:  # also rejects NaN
        raise ConfigError(f"clip_sigma must be > 0, got {clip_sigma}; use None or math.inf to disable clipping")
    if not g.is_floating_point():
        raise ConfigError(f"scaler expects a floating-point gradient, got {g.dtype}")
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    x = g.detach()
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    lo, hi = torch.aminmax(x)  # one pass, no |g| temporary
    s = torch.maximum(hi, -lo)  # max|g|
    if clip_sigma is not None and not math.isinf(clip_sigma):
        s = torch.minimum(s, clip_sigma * torch.std(x, correction=0))
    return s.to(torch.float32)


def ternarize(g: Tensor, s: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Stochastically round ``g / s`` to {-1, 0, +1} so that ``s * t`` is unbiased (TernGrad).

    ``t_k = sign(g_k)`` with probability ``p_k = min(1, |g_k| / s)``, else 0. The draw compares 16 random
    bits per element, ``v ~ U{0, …, 2^16 − 1}``, with the threshold: ``t_k ≠ 0`` iff
    ``v + ½ < 2^16 · |g_k| / s``. So ``P(t_k ≠ 0)`` is ``p_k`` rounded to a multiple of ``2^-16``:
    ``|E[s·t_k] − g_k| ≤ 2^-17 · s`` (plus float32 rounding of the threshold, ≈ ``2^-22 · s``), far below
    the codec's own noise (standard deviation ``s·sqrt(p(1 − p))``). Four elements share one 64-bit draw,
    a quarter of the random numbers ``torch.rand`` would need.

    Args:
        g: gradient, any shape ``(*)``, floating point. Entries with ``|g| >= s`` become ``±1`` always:
            that is the clipping. Not checked for finiteness (a full pass, and a device sync on CUDA):
            with a finite ``s > 0``, NaN entries give 0 and ``±inf`` give ``±1``; callers that must keep
            non-finite gradients (AMP overflow steps) check them first and send them uncompressed.
        s: positive 0-d scaler, identical on all ranks (MAX all-reduce of per-rank scalers).
            ``s = 0`` gives ``t = sign(g)``, hence all zeros for an all-zero gradient; a NaN or infinite
            ``s`` gives all zeros.
        generator: this rank's random stream, on ``g``'s device; ranks must not share one. The codes are
            a deterministic function of the generator's state.
    Returns:
        int8 tensor ``t`` of shape ``(*)`` with ``E[s * t] = g`` for ``|g| <= s`` (to within ``2^-17 · s``).
    Raises:
        ShapeMismatch: ``s`` has more than one element.
        ConfigError: ``g`` is not floating point.

    Example:
        >>> g = torch.tensor([0.3, -1.2, 0.0, 0.9])
        >>> s = scaler(g, clip_sigma=None)
        >>> t = ternarize(g, s, torch.Generator().manual_seed(0))
        >>> t.dtype, t[1].item(), t[2].item()  # |g| = s is always kept, 0 never is
        (torch.int8, -1, 0)
    """
    if not g.is_floating_point():
        raise ConfigError(f"ternarize expects a floating-point gradient, got {g.dtype}")
    if s.numel() != 1:
        raise ShapeMismatch(f"the scaler s must be a 0-d tensor (one per layer), got shape {tuple(s.shape)}")
    codes = torch.empty(g.shape, dtype=torch.int8, device=g.device)
    _ternarize_into(g.detach().reshape(-1), s, codes.view(-1), generator)
    return codes


def _ternarize_into(g: Tensor, s: Tensor, out: Tensor, generator: torch.Generator | None = None,
                    lanes: Tensor | None = None) -> None:
    """:func:`ternarize` of the flat ``g`` ``(n,)`` written into int8 ``out`` ``(n,)``, unchecked.

    The random lanes come from ``generator`` (as :func:`ternarize` draws them) or, given, from int16
    ``lanes`` ``(n,)`` such as :func:`_random_lanes` returns: element ``k`` reads lane ``k`` either way.
    """
    n = g.numel()
    if n == 0:
        return
    step = _LEVELS / s.detach().reshape(()).to(device=g.device, dtype=torch.float32)  # 2^16 / s
    chunk = n if g.device.type != "cpu" else min(n, _CPU_CHUNK * max(1, torch.get_num_threads()))
    bits = torch.empty(-(-chunk // _LANES) if lanes is None else 0, dtype=torch.int64, device=g.device)
    y = torch.empty(chunk, dtype=torch.float32, device=g.device)
    r = torch.empty(chunk, dtype=torch.float32, device=g.device)
    for start in range(0, n, chunk):  # chunks of 4·m elements: the lanes do not depend on the chunking on CPU
        gc = g[start:start + chunk]
        k = gc.numel()
        u = (_draw_lanes(bits[:-(-k // _LANES)], generator)[:k] if lanes is None
             else lanes[start:start + k])  # (k,) int16
        _ternarize_chunk(gc, step, u, y[:k], r[:k], out[start:start + k])


def _draw_lanes(bits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Fill int64 ``bits`` ``(m,)`` with raw 64-bit draws (``random_`` over the full int64 range); viewed as
    ``4m`` int16 lanes ``u = v − 2^15``, ``v ~ U{0, …, 2^16−1}``."""
    return bits.random_(-(1 << 63), None, generator=generator).view(torch.int16)


def _random_lanes(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The ``n`` int16 lanes ``ternarize`` draws for ``n`` elements from ``generator`` (one draw of ``⌈n/4⌉``).

    On CUDA the draws depend on how many are drawn at once: callers draw fixed sizes and slice them.
    """
    bits = torch.empty(-(-n // _LANES), dtype=torch.int64, device=device)
    return _draw_lanes(bits, generator)[:n]


def _ternarize_chunk(g: Tensor, step: Tensor, u: Tensor, y: Tensor, r: Tensor, out: Tensor) -> None:
    """Write ``t = sign(g) · [v + ½ < |g|·2^16/s]`` into ``out``; ``g, u, y, r, out`` are ``(k,)``.

    ``u`` holds int16 random lanes ``u = v − 2^15``; ``y`` and ``r`` are float32 scratch.
    """
    if g.dtype in (torch.float16, torch.bfloat16):  # |g|·2^16/s overflows float16: scale in float32
        y.copy_(g).mul_(step)
    else:
        torch.mul(g, step, out=y)  # y = g·2^16/s
    torch.abs(y, out=r).sub_(u)  # r = |y| − u = |y| − v + 2^15
    r.gt_(_LEVELS / 2 + 0.5)  # 1 where v + ½ < |y| (P = p rounded to 2^-16), else 0; 0 for NaN
    r.copysign_(y)  # ±1 where kept, ±0 elsewhere (no NaN: the mask is 0 or 1)
    out.copy_(r)


def _as_codes(codes: Tensor) -> Tensor:
    """``codes`` flattened to int8 ``(n,)``; ConfigError for non-integer codes."""
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise ConfigError(f"pack expects integer codes in {{-1, 0, 1}} (int8, from ternarize), got {codes.dtype}")
    return codes.reshape(-1).to(torch.int8)


def pack(codes: Tensor, scheme: str) -> Tensor:
    """Pack ternary codes into bytes for the wire.

    ``"2bit"``: byte ``j`` holds codes ``4j … 4j+3`` as ``Σ_i (t_{4j+i} + 1)·4^i``. ``"base3"``: byte ``j``
    holds codes ``5j … 5j+4`` as ``Σ_i (t_{5j+i} + 1)·3^i ≤ 242`` (1.6 bits per code). The last byte is
    padded with zero codes.

    Args:
        codes: integer codes in {-1, 0, 1} (int8 from :func:`ternarize`), any shape, read flattened. Values
            outside {-1, 0, 1} are not checked (a full pass) and pack to garbage.
        scheme: ``"2bit"`` or ``"base3"``.
    Returns:
        uint8 tensor of shape ``(packed_numel(codes.numel(), scheme),)`` on ``codes``' device.
    Raises:
        ConfigError: unknown ``scheme``, or codes that are not integers.
    """
    per_byte = _check_scheme(scheme)
    flat = _as_codes(codes)  # (n,)
    n = flat.numel()
    m = packed_numel(n, scheme)
    out = torch.empty(m, dtype=torch.uint8, device=flat.device)  # (m,)
    step = _PACK_CHUNK if flat.device.type == "cpu" else max(m * per_byte, 1)  # codes per step
    digits = torch.empty(min(step, m * per_byte), dtype=torch.int8, device=flat.device)  # t + 1 ∈ {0, 1, 2}
    for start in range(0, n, step):
        k = min(step, n - start)
        nbytes = -(-k // per_byte)
        d = digits[:nbytes * per_byte]
        torch.add(flat[start:start + k], 1, out=d[:k])
        d[k:] = 1  # padding of the last byte: code 0
        target = out[start // per_byte:start // per_byte + nbytes]
        if scheme == "2bit":
            _pack_2bit(d, target)
        else:
            _pack_base3(d.view(torch.uint8).view(nbytes, per_byte), target)
    return out


def _pack_2bit(digits: Tensor, out: Tensor) -> None:
    """``(4m,)`` int8 digits ``d ∈ {0,1,2}`` → ``out`` ``(m,)`` uint8 ``d0 + 4·d1 + 16·d2 + 64·d3``.

    Read as little-endian int32 words ``w = d0 + 2^8·d1 + 2^16·d2 + 2^24·d3`` (every platform PyTorch
    runs on is little-endian), ``w | w >> 6`` holds ``d0 + 4·d1`` in byte 0 and ``d2 + 4·d3`` in byte 2;
    OR-ing that with itself ``>> 12`` moves the latter to bits 4…7 of byte 0. Digits ``≤ 2`` use two bits,
    so no fields overlap, and nothing overflows. ``digits`` is overwritten.
    """
    words = digits.view(torch.int32)  # (m,)
    shifted = torch.empty_like(words)
    words.bitwise_or_(torch.bitwise_right_shift(words, 6, out=shifted))
    words.bitwise_or_(torch.bitwise_right_shift(words, 12, out=shifted)).bitwise_and_(0xFF)
    out.copy_(words)  # < 256: the conversion neither wraps nor saturates


def _pack_base3(digits: Tensor, out: Tensor) -> None:
    """``(m, 5)`` uint8 digits ``d ∈ {0,1,2}`` → ``out`` ``(m,)`` uint8 ``Σ_i d_i·3^i`` by Horner's rule."""
    torch.add(digits[:, 3], digits[:, 4], alpha=3, out=out)
    for i in (2, 1, 0):
        torch.add(digits[:, i], out, alpha=3, out=out)


@functools.lru_cache(maxsize=None)
def _table(scheme: str, device: torch.device, biased: bool) -> Tensor:
    """Decode table on ``device``: row ``b`` holds the codes packed in byte ``b`` (``biased``: ``t + 1``).

    Returns ``(256, 4)`` int8 rows for "2bit" (read as ``(256,)`` int32 words, one gather per byte) and
    ``(256, 5)`` for "base3". Bytes 243–255, which ``pack("base3")`` never writes, decode to zero codes.
    """
    per_byte = _CODES_PER_BYTE[scheme]
    base = 4 if scheme == "2bit" else 3
    byte = torch.arange(256)[:, None]  # (256, 1)
    digits = (byte // base ** torch.arange(per_byte)) % base  # (256, per_byte): t + 1 (3 is never packed)
    if scheme == "base3":
        digits[243:] = 1
    return (digits - (0 if biased else 1)).to(torch.int8).to(device)


@functools.lru_cache(maxsize=None)
def _word_table(scheme: str, device: torch.device) -> Tensor:
    """The biased table as one machine word per byte, the codes ``t + 1`` in its little-endian byte lanes.

    ``(256,)`` int32 for "2bit" (4 lanes), int64 for "base3" (5 lanes and 3 zero lanes): a gather of
    words is a scalar gather, and adding words adds every lane at once (no carry while lanes stay ≤ 255).
    """
    table = _table(scheme, device, True)  # (256, per_byte)
    width = 4 if scheme == "2bit" else 8
    words = torch.zeros(256, width, dtype=torch.int8, device=device)
    words[:, :table.shape[1]] = table
    return words.view(torch.int32 if width == 4 else torch.int64).view(256)


def _check_packed(packed: Tensor, numel: int, scheme: str, what: str) -> Tensor:
    """``packed`` viewed as uint8; ShapeMismatch if its last dimension is not ``packed_numel(numel)``."""
    nbytes = packed_numel(numel, scheme)
    if packed.dtype == torch.int8:
        packed = packed.view(torch.uint8)
    if packed.dtype != torch.uint8:
        raise ConfigError(f"{what} expects uint8 bytes from pack(), got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise ShapeMismatch(
            f"{what}: {numel} codes packed as {scheme!r} take {nbytes} bytes, but the packed tensor has shape "
            f"{tuple(packed.shape)}; pass the numel and scheme that pack() was called with"
        )
    return packed


def unpack(packed: Tensor, numel: int, scheme: str) -> Tensor:
    """Inverse of :func:`pack`: the ``numel`` codes in ``packed``, by table lookup.

    Args:
        packed: uint8 ``(packed_numel(numel, scheme),)`` from :func:`pack`.
        numel: number of codes packed.
        scheme: the scheme they were packed with.
    Returns:
        int8 tensor ``t ∈ {-1, 0, 1}`` of shape ``(numel,)`` on ``packed``'s device.
    Raises:
        ConfigError: unknown ``scheme``, negative ``numel`` or non-uint8 ``packed``.
        ShapeMismatch: ``packed`` is not 1-d with ``packed_numel(numel, scheme)`` bytes.
    """
    packed = _check_packed(packed, numel, scheme, "unpack")
    if packed.dim() != 1:
        raise ShapeMismatch(f"unpack expects 1-d packed bytes, got shape {tuple(packed.shape)}; "
                            "use unpack_sum for (world, nbytes)")
    m, per_byte = packed.numel(), _CODES_PER_BYTE[scheme]
    codes = torch.empty(m, per_byte, dtype=torch.int8, device=packed.device)  # (m, per_byte)
    table = _table(scheme, packed.device, False)  # (256, per_byte)
    if per_byte == 4:  # one 4-byte word per byte: a scalar gather
        table, codes_rows = table.view(torch.int32).view(256), codes.view(torch.int32).view(m)
    else:
        codes_rows = codes
    block = max(1, min(m, _SUM_BLOCK) if packed.device.type == "cpu" else m)
    index = torch.empty(block, dtype=torch.int32, device=packed.device)  # int32: uint8 would be a mask
    for start in range(0, m, block):
        b = min(block, m - start)
        index[:b].copy_(packed[start:start + b])
        torch.index_select(table, 0, index[:b], out=codes_rows[start:start + b])
    return codes.view(-1)[:numel]


def unpack_sum(packed: Tensor, numel: int, scheme: str, dtype: torch.dtype = torch.int32, *,
               out: Tensor | None = None) -> Tensor:
    """``Σ_i t_i`` over the workers' packed codes: the decode step after an all-gather.

    A table maps each byte to its biased codes ``t + 1 ∈ {0, 1, 2}`` in the byte lanes of one word; the
    words of up to 127 workers are added (every lane ``≤ 254``: no carry), larger worlds 127 rows at a
    time, and the bias ``world`` is subtracted once. On CPU the columns go in blocks that stay in cache.

    Args:
        packed: uint8 ``(world, packed_numel(numel, scheme))``, row ``i`` = ``pack(t_i, scheme)``.
        numel: number of codes per worker.
        scheme: the scheme they were packed with.
        dtype: dtype of the result, signed integer or floating point; int8 holds at most 127 workers.
        out: optional contiguous ``(numel,)`` tensor on ``packed``'s device to write the sums into (e.g. a
            DDP bucket's float buffer: no new tensor to allocate and fault in); its dtype replaces ``dtype``.
    Returns:
        ``(numel,)`` tensor (``out`` if given) with values in ``[-world, world]``; with a shared scaler the
        average gradient is ``s · result / world``.
    Raises:
        ConfigError: unknown ``scheme``, negative ``numel``, non-uint8 ``packed``, a dtype that cannot hold
            the sums (unsigned, bool, int8 for more than 127 workers), or a non-contiguous ``out``.
        ShapeMismatch: ``packed`` is not 2-d with ``packed_numel(numel, scheme)`` columns, or ``out`` is not
            ``(numel,)``.
    """
    packed = _check_packed(packed, numel, scheme, "unpack_sum")
    if packed.dim() != 2:
        raise ShapeMismatch(f"unpack_sum expects packed bytes of shape (world, nbytes), got {tuple(packed.shape)}")
    world, m = packed.shape
    result = _sum_output(out, numel, dtype, world, packed.device)  # (numel,)
    if world == 0:
        return result.zero_()
    per_byte = _CODES_PER_BYTE[scheme]
    full = numel // per_byte  # bytes whose codes are all used
    block = max(1, min(full, _SUM_BLOCK) if packed.device.type == "cpu" else full)
    table = _word_table(scheme, packed.device)
    scratch = _SumScratch(min(world, _MAX_ROWS_PER_SUM) * block, block, table.dtype, packed.device)
    main = result[:full * per_byte].view(full, per_byte)
    for start in range(0, full, block):
        stop = min(start + block, full)
        _sum_block(packed[:, start:stop], table, main[start:stop], scratch)
    if full < m:  # the last byte holds padding codes too
        tail = torch.empty(1, per_byte, dtype=result.dtype, device=packed.device)
        _sum_block(packed[:, full:], table, tail, scratch)
        result[full * per_byte:] = tail[0, :numel - full * per_byte]
    return result


def _sum_output(out: Tensor | None, numel: int, dtype: torch.dtype, world: int, device: torch.device) -> Tensor:
    """The ``(numel,)`` tensor that :func:`unpack_sum` writes: ``out`` once checked, or a new one."""
    if out is not None:
        if tuple(out.shape) != (numel,):
            raise ShapeMismatch(f"unpack_sum: out must have shape ({numel},), got {tuple(out.shape)}")
        if not out.is_contiguous() or out.device != device:
            raise ConfigError(f"unpack_sum: out must be contiguous and on {device} (got {out.device}); "
                              "pass a fresh tensor or out=None")
        dtype = out.dtype
    if dtype in (torch.bool, torch.uint8) or dtype.is_complex:
        raise ConfigError(f"unpack_sum needs a signed integer or floating dtype for sums in [-world, world], "
                          f"got {dtype}")
    if dtype == torch.int8 and world > 127:
        raise ConfigError(f"sums of {world} workers' codes do not fit int8; pass dtype=torch.int16 or wider")
    return out if out is not None else torch.empty(numel, dtype=dtype, device=device)


class _SumScratch:
    """Buffers reused by every block of :func:`unpack_sum`: indices, looked-up words, their sum."""

    def __init__(self, bytes_per_step: int, block: int, word: torch.dtype, device: torch.device) -> None:
        self.index = torch.empty(bytes_per_step, dtype=torch.int32, device=device)
        self.words = torch.empty(bytes_per_step, dtype=word, device=device)
        self.total = torch.empty(block, dtype=word, device=device)


def _sum_block(cols: Tensor, table: Tensor, out: Tensor, scratch: _SumScratch) -> None:
    """Write ``Σ_i t_i`` of the ``(world, b)`` bytes ``cols`` into ``out`` ``(b, per_byte)``."""
    world, b = cols.shape
    per_byte = out.shape[1]
    for r in range(0, world, _MAX_ROWS_PER_SUM):
        rows = cols[r:r + _MAX_ROWS_PER_SUM]  # (w, b)
        w = rows.shape[0]
        index = scratch.index[:w * b]
        index.view(w, b).copy_(rows)  # int32: uint8 would be read as a mask
        words = scratch.words[:w * b]
        torch.index_select(table, 0, index, out=words)  # (w·b,) biased codes t + 1 in byte lanes
        total = scratch.total[:b]
        torch.sum(words.view(w, b), 0, dtype=table.dtype, out=total)  # lane sums ≤ 2·127: no carry
        lanes = total.view(torch.uint8).view(b, -1)[:, :per_byte]  # (b, per_byte)
        if out.dtype == torch.int8:
            lanes = lanes.view(torch.int8)  # int8 arithmetic is exact mod 2^8
        if r == 0:
            out.copy_(lanes)  # converts in place: no temporary
        else:
            out.add_(lanes)
    out.sub_(world)  # the bias of t + 1, once per worker
