"""TernGrad as a DDP communication hook: ``ddp.register_comm_hook(TernGradState(), terngrad_hook)``.

Per bucket of ``N`` workers with gradient layers ``g_l`` (one layer = one parameter's gradient), worker ``i``:

1. computes its scaler ``s_l^i = scaler(g_l^i, clip_sigma)`` for every ternarized layer;
2. shares them: ``s_l = max_i s_l^i`` by one MAX all-reduce of the ``(L + 1,)`` vector, whose last entry
   flags a non-finite gradient on any worker;
3. ternarizes ``t_l^i = ternarize(g_l^i, s_l)`` with its own random stream (seed, rank, step, bucket);
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

Baselines for benchmarks: no hook (fp32 all-reduce) and PyTorch's own :func:`fp16_compress_hook`,
re-exported here.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook compares the hook's annotations
# with the objects ``dist.GradBucket`` and ``torch.futures.Future[torch.Tensor]``, not strings.
import difflib
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Literal, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

from torchslim.comm.ternary import SCHEMES, pack, packed_numel, scaler, ternarize, unpack, unpack_sum
from torchslim.errors import CheckpointError, ConfigError, TorchSlimError

__all__ = ["TernGradState", "fp16_compress_hook", "terngrad_hook"]

logger = logging.getLogger(__name__)

Scheme = Literal["base3", "2bit"]
Reduce = Literal["auto", "allgather", "allreduce", "twophase"]
SumDtype = Literal["int8", "int32"]
Collective = Literal["allgather", "allreduce", "twophase"]

_REDUCES = ("auto", "allgather", "allreduce", "twophase")
_SUM_DTYPES = {"int8": torch.int8, "int32": torch.int32}       # NCCL has no int16 SUM
_SUM_LIMITS = {"int8": 127, "int32": 2**31 - 1}                 # |Σ_i t_i| ≤ N must fit
_OPTIONS = (
    "scheme", "clip_sigma", "seed", "min_numel", "full_precision_last", "full_precision_params",
    "warmup_steps", "reduce", "sum_dtype",
)
_COUNTERS = ("step", "bytes_sent", "bytes_received", "numel_reduced")
_STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
_SHARD_ALIGN = 20   # twophase shards hold a multiple of 4 and 5 codes: whole bytes in both schemes
_DDP_PREFIX = "module."
# recent torch calls it all_gather_single and deprecates all_gather_into_tensor (same arguments)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class TernGradState:
    """Options and running counters of :func:`terngrad_hook`; checkpointed without the process group.

    Byte counters follow the bandwidth-optimal ring algorithms of compression_anchors §8, as payload
    arithmetic (not measured): an all-reduce of ``B`` bytes sends and receives ``⌊2(N-1)·B/N⌋`` bytes per
    worker, an all-gather of ``B`` bytes per worker sends and receives ``(N-1)·B``. So ``bytes_sent ==
    bytes_received``; the scaler all-reduce (4 bytes per layer + 4) is included. ``8 · bytes_sent /
    numel_reduced`` is the wire cost in bits per gradient element.

    Tuning guide (the paper's settings first):

    - ``clip_sigma=2.5`` held for every model in the paper; without clipping one outlier sets ``s``
      and most codes become 0 (AlexNet lost 3 points top-1 without it).
    - ``full_precision_last=True`` as the paper's ImageNet runs (build with :meth:`for_model`);
      ``min_numel`` = the original's ``size_to_binarize`` (its AlexNet scripts: 9217, i.e. biases stay fp).
    - ``warmup_steps``: plain fp averaging for the first K steps (not in the paper; PowerSGD's hook has
      the same knob, ``start_powerSGD_iter``); the paper trained with TernGrad from step 0.
    - ``scheme="base3"`` sends 1.6 bits per element, ``"2bit"`` 2 bits with a cheaper pack; ``reduce="auto"``
      switches from all-gather to the integer all-reduce near 10 workers (int8) as the volume rule says.
    - ``reduce="twophase"`` sends the fewest bytes from 3 workers on (2.4 bits per element at N = 4,
      ~3.2 at large N) but rounds twice; "auto" never picks it, as it changes the result, not just the cost.

    Example:
        >>> state = TernGradState(scheme="2bit", warmup_steps=10)
        >>> state.collective_for(numel=1_000_000, world_size=4)     # 4·250,000 ≤ 2·1,000,000 bytes
        'allgather'
        >>> state.collective_for(numel=1_000_000, world_size=16)
        'allreduce'
    """

    # --- what the user tunes ------------------------------------------------------------------------
    process_group: dist.ProcessGroup | None = None  # None: the default group. Never saved.
    scheme: Scheme = "base3"            # all-gather packing: 5 codes/byte (1.6 bits) or 4 codes/byte (2 bits)
    clip_sigma: float | None = 2.5      # s = min(max|g|, c·σ); the paper's c = 2.5. None or inf: s = max|g|
    seed: int = 0                       # rank r, step k, bucket b draw from a generator seeded by (seed, r, k, b)
    min_numel: int = 1                  # size_to_binarize: layers with fewer elements are averaged in fp.
    #                                     With clipping, 1-element layers always are (σ = 0 would zero them).
    full_precision_last: bool = False   # keep the last layer (logits) in fp, as the original's default
    #                                     quantize_logits=False did; needs bind(model)
    full_precision_params: tuple[str, ...] = ()  # parameter or module names kept in fp; needs bind(model)
    warmup_steps: int = 0               # the first K iterations average plain fp gradients
    reduce: Reduce = "auto"             # the codes' collective; "auto" picks the fewer bytes (collective_for)
    sum_dtype: SumDtype = "int8"        # integer width of the SUM all-reduce: int8 holds N ≤ 127 workers
    # --- what the run accumulates -------------------------------------------------------------------
    step: int = field(default=0, init=False)            # iterations done; advanced on bucket.is_last()
    bytes_sent: int = field(default=0, init=False)      # by this worker, ring model (see above)
    bytes_received: int = field(default=0, init=False)
    numel_reduced: int = field(default=0, init=False)   # gradient elements averaged, all buckets
    _param_names: dict[int, str] | None = field(default=None, init=False, repr=False)  # id(param) → name
    _last_layer: tuple[str, ...] = field(default=(), init=False, repr=False)          # names, from bind()
    _keep_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)   # fp params, resolved
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, init=False, repr=False)
    _logged: set[int] = field(default_factory=set, init=False, repr=False)          # bucket indices logged

    def __post_init__(self) -> None:
        if isinstance(self.full_precision_params, str):
            raise ConfigError(
                f"full_precision_params must be a sequence of names, got the string "
                f"{self.full_precision_params!r}; write ({self.full_precision_params!r},)"
            )
        self.full_precision_params = tuple(self.full_precision_params)
        _validate_options(self)

    @classmethod
    def for_model(cls, model: nn.Module, **options: Any) -> "TernGradState":
        """``TernGradState(**options).bind(model)``: a state that can name ``model``'s parameters.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> TernGradState.for_model(model, full_precision_last=True).full_precision_names()
            ('2.bias', '2.weight')
        """
        return cls(**options).bind(model)

    def bind(self, model: nn.Module) -> "TernGradState":
        """Resolve ``full_precision_params`` and ``full_precision_last`` on ``model``; returns ``self``.

        ``model`` is the module DDP wraps, or the DDP wrapper (its ``module.`` prefix is dropped).
        The last layer is the last module, in ``model.modules()`` (registration) order, that owns
        parameters itself: ``fc2`` in LeNet, the final ``Linear`` of a ``Sequential``. Where the output
        layer is registered earlier, name it in ``full_precision_params`` instead.

        Raises:
            ConfigError: a name in ``full_precision_params`` matches no parameter or module
                (the message suggests close matches).
        """
        self._param_names = {id(p): _strip_ddp(name) for name, p in model.named_parameters()}
        owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
        last = {id(p) for p in owners[-1].parameters(recurse=False)} if owners else set()
        self._last_layer = tuple(sorted(self._param_names[i] for i in last))
        self._resolve()
        logger.info("TernGrad keeps in full precision: %s", ", ".join(self.full_precision_names()) or "nothing")
        return self

    def full_precision_names(self) -> tuple[str, ...]:
        """Sorted names of the parameters kept in full precision by name (not by ``min_numel``)."""
        names = self._param_names or {}
        return tuple(sorted(names[i] for i in self._keep_ids))

    def collective_for(self, numel: int, world_size: int) -> Collective:
        """The collective that carries ``numel`` codes among ``world_size`` workers.

        Rule (ring algorithms, compression_anchors §8): an all-gather of ``P = packed_numel(numel)``
        bytes moves ``(N-1)·P`` bytes per worker; a SUM all-reduce of ``w``-byte integers moves
        ``2(N-1)/N · numel · w``. ``reduce="auto"`` picks the all-gather iff ``N·P ≤ 2·numel·w``:
        with int8 sums up to N = 10 workers for "base3" and N = 8 for "2bit"; with int32 up to 40 and 32.
        ``reduce="twophase"`` moves ``2(N-1)/N · P``, as few as the all-gather at N = 2 but with a second
        rounding, so two workers use the all-gather instead.

        Raises:
            ConfigError: the all-reduce is chosen but ``world_size`` exceeds what ``sum_dtype`` holds
                (``|Σ_i t_i| ≤ N``: 127 for int8).
        """
        if self.reduce == "allgather" or (self.reduce == "twophase" and world_size <= 2):
            return "allgather"
        if self.reduce == "twophase":
            return "twophase"
        width = _SUM_DTYPES[self.sum_dtype].itemsize
        if self.reduce == "auto" and world_size * packed_numel(numel, self.scheme) <= 2 * numel * width:
            return "allgather"
        limit = _SUM_LIMITS[self.sum_dtype]
        if world_size > limit:
            raise ConfigError(
                f"{world_size} workers overflow {self.sum_dtype} sums of ternary codes (|sum| <= world size, at "
                f"most {limit} for {self.sum_dtype}); set sum_dtype='int32' or reduce='allgather'"
            )
        return "allreduce"

    def state_dict(self) -> dict[str, Any]:
        """Options and counters, without the process group, for :func:`torchslim.train.checkpoint.save_checkpoint`."""
        options = {name: getattr(self, name) for name in _OPTIONS}
        return {"version": _STATE_VERSION, "options": options, **{name: getattr(self, name) for name in _COUNTERS}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the process group and the model binding stay.

        Raises:
            CheckpointError: a newer version, or missing entries.
            ConfigError: saved options this version rejects, or names the bound model lacks.
        """
        version = state_dict.get("version")
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise CheckpointError(
                f"TernGradState version {version!r} is newer than {_STATE_VERSION}; upgrade torchslim"
            )
        missing = [k for k in ("options", *_COUNTERS) if k not in state_dict]
        missing += [f"options.{k}" for k in _OPTIONS if k not in state_dict.get("options", {})]
        if missing:
            raise CheckpointError(f"TernGradState checkpoint lacks {missing}; it is damaged or from another program")
        checked = TernGradState(**state_dict["options"])                       # validates before we touch self
        for name in _OPTIONS:
            setattr(self, name, getattr(checked, name))
        for name in _COUNTERS:
            setattr(self, name, int(state_dict[name]))
        if self._param_names is not None:
            self._resolve()

    # --- used by the hook ---------------------------------------------------------------------------

    def _resolve(self) -> None:
        """``_keep_ids`` from the bound names; ConfigError for a name that matches nothing."""
        names = self._param_names or {}
        keep = set(self._last_layer) if self.full_precision_last else set()
        for wanted in self.full_precision_params:
            hits = {n for n in names.values() if n == wanted or n.startswith(wanted + ".")}
            if not hits:
                raise ConfigError(_unknown_name(wanted, names.values()))
            keep |= hits
        self._keep_ids = frozenset(i for i, n in names.items() if n in keep)

    def _in_full_precision(self, param: Tensor) -> bool:
        if param.numel() < self.min_numel or (param.numel() == 1 and _clip(self) is not None):
            return True
        if self._param_names is None:
            if self.full_precision_last or self.full_precision_params:
                raise ConfigError(
                    "full_precision_last/full_precision_params need the model's parameter names: build the "
                    "state with TernGradState.for_model(model, ...) or call state.bind(model) before training"
                )
            return False
        if id(param) not in self._param_names:
            raise ConfigError("a DDP bucket holds a parameter of a model this TernGradState was not bound to; "
                              "bind() the module that DDP wraps")
        return id(param) in self._keep_ids

    def _generator(self, device: torch.device, rank: int, step: int, bucket_index: int) -> torch.Generator:
        """This worker's stream for one bucket of one step, independent of torch's global RNG."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(_stream_seed(self.seed, rank, step, bucket_index))

    def _count(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.bytes_received += nbytes


@dataclass(frozen=True)
class _Layer:
    """One parameter's gradient inside a bucket's flat buffer: ``buffer[start : start + numel]``."""

    start: int
    numel: int

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
    3. ``t_l = ternarize(g_l, s_l, generator)`` for every layer, concatenated: ``t`` int8 ``(n,)``;
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
        layer = _Layer(start, param.numel())
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
    generator = state._generator(buffer.device, rank, step, bucket.index())
    codes = torch.cat([ternarize(layer.of(buffer), s, generator) for layer, s in zip(split.ternary, shared[:-1])])
    if collective == "twophase":
        sums_fut, decode = _two_phase_codes(state, group, codes, generator)
    else:
        launch = _all_gather_codes if collective == "allgather" else _all_reduce_codes
        sums_fut, decode = launch(state, group, codes)
    full_fut, full_flat = _full_layers_allreduce(state, group, buffer, split.full)
    finish = partial(_write_back, buffer=buffer, split=split, scale=shared[:-1] / world, decode=decode,
                     full_flat=full_flat)
    return torch.futures.collect_all([sums_fut, *full_fut]).then(finish)


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
    state: TernGradState, group: dist.ProcessGroup, codes: Tensor, generator: torch.Generator
) -> tuple[torch.futures.Future, Callable[[], Tensor]]:
    """All-to-all of packed shards, re-ternarized shard means, all-gather; see the module docstring.

    Phase 1 blocks (phase 2 needs its result, and gloo matches collectives by launch order). The
    returned ``decode`` gives ``N · u`` (float32), the re-ternarized mean in the units of ``Σ_i t_i``.
    """
    world = dist.get_world_size(group)
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
    mine = pack(ternarize(mean, torch.ones((), device=mean.device), generator), state.scheme)  # (P,)
    gathered = torch.empty_like(packed)
    work = _all_gather_flat(gathered, mine, group=group, async_op=True)
    state._count(_ring_allgather_bytes(shard_bytes, world))

    def decode() -> Tensor:
        return unpack(gathered, world * shard, state.scheme)[:n].to(torch.float32).mul_(world)

    return work.get_future(), decode


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


def _validate_options(state: TernGradState) -> None:
    """ConfigError for an option no run could use, saying why and what to pass instead."""
    if state.scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {state.scheme!r}; use 'base3' (5 codes per byte, 1.6 bits) or "
                          "'2bit' (4 codes per byte)")
    if state.reduce not in _REDUCES:
        raise ConfigError(f"unknown reduce {state.reduce!r}; use 'auto' (fewer bytes), 'allgather', 'allreduce' "
                          "or 'twophase'")
    if state.sum_dtype not in _SUM_DTYPES:
        raise ConfigError(f"unknown sum_dtype {state.sum_dtype!r}; use 'int8' (up to 127 workers) or 'int32'")
    if state.clip_sigma is not None and not (isinstance(state.clip_sigma, (int, float)) and state.clip_sigma > 0):
        raise ConfigError(f"clip_sigma must be > 0, got {state.clip_sigma!r}; use None or math.inf to disable clipping")
    for name in ("seed", "min_numel", "warmup_steps"):
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 0):
            raise ConfigError(f"{name} must be an integer{'' if name == 'seed' else ' >= 0'}, got {value!r}")
    if not all(isinstance(name, str) for name in state.full_precision_params):
        raise ConfigError(f"full_precision_params must hold parameter or module names (str), "
                          f"got {state.full_precision_params!r}")


def _clip(state: TernGradState) -> float | None:
    c = state.clip_sigma
    return None if c is None or math.isinf(c) else float(c)


def _strip_ddp(name: str) -> str:
    return name[len(_DDP_PREFIX):] if name.startswith(_DDP_PREFIX) else name


def _unknown_name(wanted: str, names) -> str:
    prefixes = sorted({n.rsplit(".", 1)[0] for n in names} | set(names))
    close = difflib.get_close_matches(wanted, prefixes, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"full_precision_params: {wanted!r} names no parameter or module of the bound model{hint}"


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


def _stream_seed(seed: int, rank: int, step: int, bucket_index: int) -> int:
    """A 63-bit seed mixing ``(seed, rank, step, bucket)`` with splitmix64: distinct streams per worker."""
    h = 0
    for value in (seed, rank, step, bucket_index):
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
