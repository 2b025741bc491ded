"""TernGrad as a DDP communication hook: ``ddp.register_comm_hook(TernGradState(), terngrad_hook)``.

Per bucket of ``N`` workers with gradient layers ``g_l`` (one layer = one parameter's gradient), worker ``i``:

1. computes its scaler ``s_l^i = scaler(g_l^i, clip_sigma)`` for every ternarized layer;
2. shares them: ``s_l = max_i s_l^i`` by one MAX all-reduce of the ``(L + 1,)`` vector, whose last entry
   flags a non-finite gradient on any worker;
3. ternarizes ``t_l^i = ternarize(g_l^i, s_l)`` with its own random stream per layer, seeded by
   (seed, rank, step, parameter): never by DDP's bucket layout, which changes after a (re)start's first step;
4. exchanges the codes of all ``L`` layers in one collective: an all-gather of the packed bytes, or an
   integer SUM all-reduce of the int8 codes, whichever moves fewer bytes (:meth:`TernGradState.collective_for`);
5. decodes ``ḡ_l = Σ_i t_l^i · (s_l / N)``: every worker holds the same integers and the same ``s_l``,
   so every worker computes the same bits and the replicas stay identical.

Opt-in, ``reduce="twophase"`` (compression_anchors §8 and §9 (b); DeepSpeed's and Bagua's pattern, and
the paper's parameter server, which sends gradients quantized in both directions): the codes are cut into
``N`` shards; an all-to-all gives worker ``j`` every worker's shard ``j``; it re-ternarizes the mean
``Σ_i t_i / N ∈ [-1, 1]`` (unbiased again, with scale 1) and an all-gather of those codes gives every
worker all shards. ``2(N-1)/N · 1.6`` bits per element instead of ``(N-1) · 1.6``: 2.4 bits at N = 4,
where the all-gather sends 4.8. The price is a second rounding: the average is itself ternary,
``s_l · u`` with ``u ∈ {-1, 0, 1}``, still unbiased but noisier (benchmarks/terngrad_convergence.py).

Layers kept in full precision (small ones, chosen ones, the last layer) are averaged by one fp SUM
all-reduce per bucket, as are whole buckets during warm-up and buckets holding a non-finite gradient
(so an AMP ``GradScaler`` still sees the inf/NaN and skips the step).

The hook's options and counters are a :class:`~torchslim.comm.state.TernGradState`, re-exported here.
Baselines for benchmarks: no hook (fp32 all-reduce) and PyTorch's own :func:`fp16_compress_hook`,
re-exported here too.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's annotations
# with the objects ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]``, not strings.
import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from torchslim.comm.state import _SUM_DTYPES, TernGradState, _clip
from torchslim.comm.ternary import _random_lanes, _ternarize_into, pack, scaler, unpack, unpack_sum
from torchslim.errors import TorchSlimError

__all__ = ["TernGradState", "fp16_compress_hook", "terngrad_hook"]

logger = logging.getLogger(__name__)

_SHARD_ALIGN = 20   # twophase shards hold a multiple of 4 and 5 codes: whole bytes in both schemes
_BLOCK = 1 << 16    # twophase re-ternarization: elements per random stream of a parameter
# recent torch calls it all_gather_single and deprecates all_gather_into_tensor (same arguments)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class _Layer:
    """One parameter's gradient inside a bucket's flat buffer: ``buffer[start : start + numel]``."""

    start: int
    numel: int
    key: int            # the parameter's identity in the random streams (TernGradState._key)

    def of(self, flat: Tensor) -> Tensor:
        return flat[self.start:self.start + self.numel]


@dataclass(frozen=True)
class _Split:
    ternary: tuple[_Layer, ...]
    full: tuple[_Layer, ...]


def terngrad_hook(state: TernGradState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average a DDP bucket with ternary gradients (TernGrad, Wen et al. 2017); see the module docstring.

    Use ``ddp.register_comm_hook(state, terngrad_hook)`` on every worker with equal options.
    Steps for a bucket with ternarized layers ``l = 1..L`` (``ḡ_l`` written into ``bucket.buffer()``):

    1. split the flat buffer into per-parameter layers (``bucket.parameters()`` order);
    2. ``s_l = max_i scaler(g_l^i)``: one blocking MAX all-reduce of ``(L + 1,)`` floats, the last a
       non-finite flag. If set on any worker, the whole bucket is averaged in floating point instead;
    3. ``t_l = ternarize(g_l, s_l, generator_l)`` for every layer, concatenated: ``t`` int8 ``(n,)``;
       ``generator_l`` is seeded by ``(seed, rank, step, parameter)``, whatever bucket holds the layer;
    4. all-gather ``pack(t, scheme)`` and ``Σ_i t_i = unpack_sum(...)``, or SUM all-reduce ``t`` as
       ``sum_dtype``, per :meth:`TernGradState.collective_for`; full-precision layers meanwhile go
       through one fp SUM all-reduce of ``g/N``;
    5. ``ḡ_l = float32(Σ_i t_l^i) · float32(s_l / N)``, cast to the buffer's dtype (fp32, fp16 or bf16).

    The scaler all-reduce blocks inside the hook, so every worker launches the payload collective
    from the same thread in the same order (gloo matches collectives by launch order; launching from a
    future's callback would race across workers). ``state.step`` advances after the bucket with
    ``bucket.is_last()`` (the last one of each backward); it drives the warm-up and the random streams.

    Returns:
        a future of ``bucket.buffer()`` holding the average over workers.
    Raises:
        ConfigError: see :meth:`TernGradState.collective_for`; names used before ``bind``.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    step = state.step
    split = _split_bucket(state, bucket)
    state.numel_reduced += buffer.numel()
    if step < state.warmup_steps or not split.ternary:
        fut = _mean_allreduce(state, group, buffer)
    else:
        fut = _ternary_average(state, group, bucket, split, step)
    if bucket.is_last():
        state.step += 1
    return fut


def _split_bucket(state: TernGradState, bucket: dist.GradBucket) -> _Split:
    """The bucket's layers, ternarized or full precision, at their offsets in ``bucket.buffer()``."""
    ternary, full, start = [], [], 0
    for param in bucket.parameters():
        layer = _Layer(start, param.numel(), state._key(param))
        (full if state._in_full_precision(param) else ternary).append(layer)
        start += layer.numel
    if start != bucket.buffer().numel():
        raise TorchSlimError(f"bucket {bucket.index()} holds {bucket.buffer().numel()} gradient elements but its "
                             f"parameters {start}; DDP's bucket layout is not what terngrad_hook expects")
    return _Split(tuple(ternary), tuple(full))


def _ternary_average(
    state: TernGradState, group: dist.ProcessGroup, bucket: dist.GradBucket, split: _Split, step: int
) -> torch.futures.Future[Tensor]:
    """Steps 2-5 of :func:`terngrad_hook` for a bucket with at least one ternarized layer."""
    buffer = bucket.buffer()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    numel = sum(layer.numel for layer in split.ternary)
    collective = state.collective_for(numel, world)
    _log_once(state, bucket.index(), numel, world, collective)
    shared = _shared_scalers(state, group, buffer, split.ternary)                 # (L + 1,) float32
    if bool(shared[-1] > 0):                                                      # a worker saw inf/NaN
        return _mean_allreduce(state, group, buffer)
    codes = _codes(state, buffer, split.ternary, shared[:-1], rank, step)       # (n,) int8
    if collective == "twophase":
        sums_fut, decode = _two_phase_codes(state, group, codes, split.ternary, step)
    else:
        launch = _all_gather_codes if collective == "allgather" else _all_reduce_codes
        sums_fut, decode = launch(state, group, codes)
    full_fut, full_flat = _full_layers_allreduce(state, group, buffer, split.full)
    finish = partial(_write_back, buffer=buffer, split=split, scale=shared[:-1] / world, decode=decode,
                     full_flat=full_flat)
    return torch.futures.collect_all([sums_fut, *full_fut]).then(finish)


def _codes(state: TernGradState, buffer: Tensor, layers: tuple[_Layer, ...], scalers: Tensor, rank: int,
           step: int) -> Tensor:
    """Step 3: ``t_l = ternarize(g_l, s_l)`` for every layer, concatenated: int8 ``(n,)``.

    Each layer draws from its own stream, seeded by ``(seed, rank, step, parameter)``: the codes do not
    depend on which bucket holds the parameter or where, so DDP's bucket rebuild after a (re)start's
    first step changes nothing.
    """
    codes = torch.empty(sum(layer.numel for layer in layers), dtype=torch.int8, device=buffer.device)
    start = 0
    for layer, s in zip(layers, scalers):
        generator = state._generator(buffer.device, rank, step, layer.key)
        _ternarize_into(layer.of(buffer), s, codes[start:start + layer.numel], generator)
        start += layer.numel
    return codes


def _shared_scalers(
    state: TernGradState, group: dist.ProcessGroup, buffer: Tensor, layers: tuple[_Layer, ...]
) -> Tensor:
    """``[max_i s_1^i, …, max_i s_L^i, max_i nonfinite^i]``: local scalers, then a blocking MAX all-reduce."""
    clip = _clip(state)
    local = torch.stack([scaler(layer.of(buffer), clip) for layer in layers]
                        + [(~torch.isfinite(buffer).all()).to(torch.float32)])   # (L + 1,)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    state._count(_ring_allreduce_bytes(local.nbytes, dist.get_world_size(group)))
    return local


def _all_gather_codes(
    state: TernGradState, group: dist.ProcessGroup, codes: Tensor
) -> tuple[torch.futures.Future, Callable[[], Tensor]]:
    """Launch the all-gather of packed codes; returns its future and how to get ``Σ_i t_i`` (float32)."""
    world = dist.get_world_size(group)
    packed = pack(codes, state.scheme)                                            # (P,) uint8
    gathered = torch.empty(world * packed.numel(), dtype=torch.uint8, device=codes.device)  # (N·P,): gloo wants 1-d
    work = _all_gather_flat(gathered, packed, group=group, async_op=True)
    state._count(_ring_allgather_bytes(packed.nbytes, world))
    rows = gathered.view(world, packed.numel())                                   # (N, P), row i = worker i
    return work.get_future(), partial(unpack_sum, rows, codes.numel(), state.scheme, torch.float32)


def _two_phase_codes(
    state: TernGradState, group: dist.ProcessGroup, codes: Tensor, layers: tuple[_Layer, ...], step: int
) -> tuple[torch.futures.Future, Callable[[], Tensor]]:
    """All-to-all of packed shards, re-ternarized shard means, all-gather; see the module docstring.

    Phase 1 blocks (phase 2 needs its result, and gloo matches collectives by launch order). The
    returned ``decode`` gives ``N · u`` (float32), the re-ternarized mean in the units of ``Σ_i t_i``.
    The re-ternarization reads :func:`_shard_lanes`: each element's random bits depend on its
    parameter and offset, not on the shard that holds it.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = codes.numel()
    shard = -(-n // (world * _SHARD_ALIGN)) * _SHARD_ALIGN                       # m codes, whole bytes
    padded = torch.zeros(world * shard, dtype=torch.int8, device=codes.device)
    padded[:n] = codes
    packed = pack(padded, state.scheme)                                           # (N·P,) shard j = row j
    received = torch.empty_like(packed)
    dist.all_to_all_single(received, packed, group=group)
    shard_bytes = packed.numel() // world
    state._count((world - 1) * shard_bytes)
    mean = unpack_sum(received.view(world, shard_bytes), shard, state.scheme, torch.float32).div_(world)  # [-1, 1]
    lanes = _shard_lanes(state, layers, rank * shard, shard, step, mean.device)   # (m,) int16
    requantized = torch.empty(shard, dtype=torch.int8, device=mean.device)
    _ternarize_into(mean, torch.ones((), device=mean.device), requantized, lanes=lanes)
    mine = pack(requantized, state.scheme)                                        # (P,)
    gathered = torch.empty_like(packed)
    work = _all_gather_flat(gathered, mine, group=group, async_op=True)
    state._count(_ring_allgather_bytes(shard_bytes, world))

    def decode() -> Tensor:
        return unpack(gathered, world * shard, state.scheme)[:n].to(torch.float32).mul_(world)

    return work.get_future(), decode


def _shard_lanes(state: TernGradState, layers: tuple[_Layer, ...], first: int, size: int, step: int,
                 device: torch.device) -> Tensor:
    """Random lanes ``(size,)`` int16 for codes ``[first, first + size)`` of the concatenated layers.

    Layer element ``o`` reads lane ``o mod B`` of the rank-free stream of block ``⌊o/B⌋`` of its
    parameter (``B = 2^16``); every block is drawn whole, so the lanes never depend on the slice asked
    for, on any device. Padding past the last layer gets lane 0 (its mean is 0: code 0).
    """
    lanes = torch.zeros(size, dtype=torch.int16, device=device)
    start = 0
    for layer in layers:
        lo, hi = max(first, start), min(first + size, start + layer.numel)        # this shard's part
        blocks = range((lo - start) // _BLOCK, -(-(hi - start) // _BLOCK)) if lo < hi else range(0)
        for block in blocks:
            b0 = start + block * _BLOCK                                           # the block in code positions
            b1 = min(b0 + _BLOCK, start + layer.numel)
            drawn = _random_lanes(b1 - b0, state._requantize_generator(device, step, layer.key, block), device)
            a, b = max(lo, b0), min(hi, b1)
            lanes[a - first:b - first] = drawn[a - b0:b - b0]
        start += layer.numel
    return lanes


def _all_reduce_codes(
    state: TernGradState, group: dist.ProcessGroup, codes: Tensor
) -> tuple[torch.futures.Future, Callable[[], Tensor]]:
    """Launch the integer SUM all-reduce of the codes; returns its future and how to get ``Σ_i t_i`` (float32)."""
    sums = codes.to(_SUM_DTYPES[state.sum_dtype])                                 # (n,) int8 or int32
    work = dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group, async_op=True)
    state._count(_ring_allreduce_bytes(sums.nbytes, dist.get_world_size(group)))
    return work.get_future(), partial(sums.to, torch.float32)


def _full_layers_allreduce(
    state: TernGradState, group: dist.ProcessGroup, buffer: Tensor, layers: tuple[_Layer, ...]
) -> tuple[list[torch.futures.Future], Tensor | None]:
    """Launch one fp SUM all-reduce of ``g/N`` for the full-precision layers (none: no collective)."""
    if not layers:
        return [], None
    flat = torch.cat([layer.of(buffer) for layer in layers]).div_(dist.get_world_size(group))
    work = dist.all_reduce(flat, group=group, async_op=True)
    state._count(_ring_allreduce_bytes(flat.nbytes, dist.get_world_size(group)))
    return [work.get_future()], flat


def _write_back(
    done: torch.futures.Future,
    *,
    buffer: Tensor,
    split: _Split,
    scale: Tensor,
    decode: Callable[[], Tensor],
    full_flat: Tensor | None,
) -> Tensor:
    """Step 5: write ``Σ_i t_l^i · (s_l / N)`` and the fp layers' averages into the buffer."""
    for fut in done.value():
        fut.wait()          # complete already: raises a collective's error; on CUDA orders the streams
    sums = decode()                                                               # (n,) float32
    start = 0
    for layer, s in zip(split.ternary, scale):
        layer.of(buffer).copy_(sums[start:start + layer.numel] * s)
        start += layer.numel
    start = 0
    for layer in split.full:
        layer.of(buffer).copy_(full_flat[start:start + layer.numel])
        start += layer.numel
    return buffer


def _mean_allreduce(state: TernGradState, group: dist.ProcessGroup, buffer: Tensor) -> torch.futures.Future[Tensor]:
    """Plain DDP averaging of the whole bucket: SUM all-reduce of ``g/N`` (what no hook does)."""
    world = dist.get_world_size(group)
    buffer.div_(world)
    work = dist.all_reduce(buffer, group=group, async_op=True)
    state._count(_ring_allreduce_bytes(buffer.nbytes, world))
    return work.get_future().then(partial(_return, buffer))


def _return(tensor: Tensor, fut: torch.futures.Future) -> Tensor:
    fut.value()             # raises the collective's error, if any
    return tensor


def _log_once(state: TernGradState, index: int, numel: int, world: int, collective: str) -> None:
    if index not in state._logged:
        state._logged.add(index)
        logger.info("TernGrad bucket %d: %d ternarized elements, %d workers, %s (%s)",
                    index, numel, world, collective, state.sum_dtype if collective == "allreduce" else state.scheme)


def _ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one worker sends (and receives) in a ring all-reduce of ``nbytes``: ``⌊2(N-1)·B/N⌋``."""
    return 2 * (world - 1) * nbytes // world


def _ring_allgather_bytes(nbytes: int, world: int) -> int:
    """Bytes one worker sends (and receives) in a ring all-gather of ``nbytes`` per worker: ``(N-1)·B``."""
    return (world - 1) * nbytes
