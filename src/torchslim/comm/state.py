"""What :func:`~torchslim.comm.hooks.terngrad_hook` is told and what it counts: :class:`TernGradState`.

Options the user tunes (scheme, clipping, which layers stay in full precision, the collective), the
counters a run accumulates (steps, bytes), the resolution of layer names on a bound model, and a
checkpoint format without the process group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchslim._deprecate import renamed_kwargs
from torchslim._select import check_patterns, matches
from torchslim.comm.ternary import SCHEMES, packed_numel
from torchslim.errors import CheckpointError, ConfigError

__all__ = ["TernGradState"]

logger = logging.getLogger(__name__)

Scheme = Literal["base3", "2bit"]
Reduce = Literal["auto", "allgather", "allreduce", "twophase"]
SumDtype = Literal["int8", "int32"]
Collective = Literal["allgather", "allreduce", "twophase"]

_REDUCES = ("auto", "allgather", "allreduce", "twophase")
_SUM_DTYPES = {"int8": torch.int8, "int32": torch.int32}        # NCCL has no int16 SUM
_SUM_LIMITS = {"int8": 127, "int32": 2**31 - 1}                 # |Σ_i t_i| ≤ N must fit
_OPTIONS = (
    "scheme", "clip_sigma", "seed", "min_numel", "full_precision_last", "include", "exclude",
    "warmup_steps", "reduce", "sum_dtype",
)
_COUNTERS = ("step", "bytes_sent", "bytes_received", "numel_reduced")
_STATE_VERSION = 2      # 2: include/exclude replace version 1's full_precision_params (read as exclude)
_MASK64 = (1 << 64) - 1
_REQUANTIZE = -1        # in the rank's place of a stream seed: two-phase re-ternarization, no rank
_DDP_PREFIX = "module."


def _old_keywords(cls: type) -> type:
    """``TernGradState(full_precision_params=...)`` keeps working for one release as ``exclude=...``."""
    init = cls.__init__
    init.__name__ = cls.__name__        # the warning reads "TernGradState(full_precision_params=...) is deprecated"
    cls.__init__ = renamed_kwargs(full_precision_params="exclude")(init)
    return cls


@_old_keywords
@dataclass
class TernGradState:
    """Options and running counters of :func:`~torchslim.comm.hooks.terngrad_hook`; checkpointed without
    the process group.

    Byte counters follow the bandwidth-optimal ring algorithms of compression_anchors §8, as payload
    arithmetic (not measured): an all-reduce of ``B`` bytes sends and receives ``⌊2(N-1)·B/N⌋`` bytes per
    worker, an all-gather of ``B`` bytes per worker sends and receives ``(N-1)·B``. So ``bytes_sent ==
    bytes_received``; the scaler all-reduce (4 bytes per layer + 4) is included. ``8 · bytes_sent /
    numel_reduced`` is the wire cost in bits per gradient element.

    Which gradients are ternarized: those of parameters chosen by ``include``/``exclude``
    (:mod:`torchslim._select`'s rule: exact name, prefix ending at ``.``, or glob; a pattern may name a
    parameter or a module, which stands for all its parameters), less the last layer with
    ``full_precision_last`` and the layers below ``min_numel`` elements. The rest is averaged in fp.

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

    Random streams: worker ``r`` ternarizes parameter ``p`` at step ``k`` with a generator seeded by
    ``(seed, r, k, p)``, ``p`` its index in ``model.parameters()`` once bound (unbound: in the order the hook
    first meets it, DDP's initial bucket layout). DDP rebuilds its buckets after the first step of every
    (re)start, so nothing depends on the layout: a run resumed from :meth:`state_dict` draws the codes an
    uninterrupted one would. (From 3 workers on, the fp all-reduce of full-precision layers sums in an
    order that follows the layout, as plain DDP does; with 2 workers the resumed run is bit-identical.)

    ``full_precision_params=`` is the old name of ``exclude=``: it works for one release with a
    DeprecationWarning, and version 1 checkpoints holding it still load.

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
    seed: int = 0                       # rank r, step k, parameter p: a stream seeded by (seed, r, k, p), never
    #                                     by DDP's bucket layout, so a resumed run draws the same codes
    min_numel: int = 1                  # size_to_binarize: layers with fewer elements are averaged in fp.
    #                                     With clipping, 1-element layers always are (σ = 0 would zero them).
    full_precision_last: bool = False   # keep the last layer (logits) in fp, as the original's default
    #                                     quantize_logits=False did; needs bind(model)
    include: tuple[str, ...] | None = None  # only these parameters/modules are ternarized (None: all); needs bind
    exclude: tuple[str, ...] = ()       # parameters/modules kept in fp (names or globs); needs bind(model)
    warmup_steps: int = 0               # the first K iterations average plain fp gradients
    reduce: Reduce = "auto"             # the codes' collective; "auto" picks the fewer bytes (collective_for)
    sum_dtype: SumDtype = "int8"        # integer width of the SUM all-reduce: int8 holds N ≤ 127 workers
    # --- what the run accumulates -------------------------------------------------------------------
    step: int = field(default=0, init=False)            # iterations done; advanced on bucket.is_last()
    bytes_sent: int = field(default=0, init=False)      # by this worker, ring model (see above)
    bytes_received: int = field(default=0, init=False)
    numel_reduced: int = field(default=0, init=False)   # gradient elements averaged, all buckets
    _param_names: dict[int, str] | None = field(default=None, init=False, repr=False)  # id(param) → name
    _param_index: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # id(param) → stream key
    _last_layer: tuple[str, ...] = field(default=(), init=False, repr=False)          # names, from bind()
    _keep_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)   # fp params, resolved
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, init=False, repr=False)
    _logged: set[int] = field(default_factory=set, init=False, repr=False)          # bucket indices logged

    def __post_init__(self) -> None:
        self.include = _names_tuple(self.include, "include")
        self.exclude = _names_tuple(self.exclude, "exclude") or ()
        _validate_options(self)

    @classmethod
    @renamed_kwargs(full_precision_params="exclude")
    def for_model(cls, model: nn.Module, **options: Any) -> TernGradState:
        """``TernGradState(**options).bind(model)``: a state that can name ``model``'s parameters.

        Example:
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> TernGradState.for_model(model, full_precision_last=True).full_precision_names()
            ('2.bias', '2.weight')
            >>> TernGradState.for_model(model, exclude=("*.bias",)).full_precision_names()
            ('0.bias', '2.bias')
        """
        return cls(**options).bind(model)

    def bind(self, model: nn.Module) -> TernGradState:
        """Resolve ``include``, ``exclude`` and ``full_precision_last`` on ``model``; returns ``self``.

        ``model`` is the module DDP wraps, or the DDP wrapper (its ``module.`` prefix is dropped).
        The last layer is the last module, in ``model.modules()`` (registration) order, that owns
        parameters itself: ``fc2`` in LeNet, the final ``Linear`` of a ``Sequential``. Where the output
        layer is registered earlier, name it in ``exclude`` instead.

        Raises:
            ConfigError: an ``include`` or ``exclude`` pattern matches no parameter or module
                (the message suggests close matches).
        """
        self._param_names = {id(p): _strip_ddp(name) for name, p in model.named_parameters()}
        self._param_index = {i: k for k, i in enumerate(self._param_names)}     # model.parameters() order
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
        """Restore what :meth:`state_dict` saved (this version or version 1); the process group and the
        model binding stay.

        Raises:
            CheckpointError: a newer version, or missing entries.
            ConfigError: saved options this version rejects, or names the bound model lacks.
        """
        version = state_dict.get("version")
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise CheckpointError(
                f"TernGradState version {version!r} is newer than {_STATE_VERSION}; upgrade torchslim"
            )
        options = _upgraded_options(state_dict.get("options", {}), version)
        missing = [k for k in ("options", *_COUNTERS) if k not in state_dict]
        missing += [f"options.{k}" for k in _OPTIONS if k not in options]
        if missing:
            raise CheckpointError(f"TernGradState checkpoint lacks {missing}; it is damaged or from another program")
        checked = TernGradState(**{k: options[k] for k in _OPTIONS})          # validates before we touch self
        for name in _OPTIONS:
            setattr(self, name, getattr(checked, name))
        for name in _COUNTERS:
            setattr(self, name, int(state_dict[name]))
        if self._param_names is not None:
            self._resolve()

    # --- used by the hook ---------------------------------------------------------------------------

    def _resolve(self) -> None:
        """``_keep_ids`` from the bound names; ConfigError for a pattern that matches nothing."""
        names = self._param_names or {}
        scopes = sorted({scope for n in names.values() for scope in _scopes(n)})   # modules and parameters
        check_patterns(self.include, scopes, "include")
        check_patterns(self.exclude, scopes, "exclude")
        keep = {n for n in names.values() if not _ternarized(n, self.include, self.exclude)}
        if self.full_precision_last:
            keep |= set(self._last_layer)
        self._keep_ids = frozenset(i for i, n in names.items() if n in keep)

    def _in_full_precision(self, param: Tensor) -> bool:
        if param.numel() < self.min_numel or (param.numel() == 1 and _clip(self) is not None):
            return True
        if self._param_names is None:
            if self.full_precision_last or self.exclude or self.include is not None:
                raise ConfigError(
                    "full_precision_last/include/exclude need the model's parameter names: build the state "
                    "with TernGradState.for_model(model, ...) or call state.bind(model) before training"
                )
            return False
        if id(param) not in self._param_names:
            raise ConfigError("a DDP bucket holds a parameter of a model this TernGradState was not bound to; "
                              "bind() the module that DDP wraps")
        return id(param) in self._keep_ids

    def _key(self, param: Tensor) -> int:
        """The parameter's identity in the random streams: its index in ``model.parameters()`` once bound.

        Unbound, parameters are numbered as the hook first meets them: in DDP's initial bucket layout,
        which every (re)started DDP uses for its first step, so a resumed run numbers them alike too.
        """
        key = self._param_index.get(id(param))
        if key is None:
            key = self._param_index[id(param)] = len(self._param_index)
        return key

    def _generator(self, device: torch.device, rank: int, step: int, key: int) -> torch.Generator:
        """Worker ``rank``'s stream for parameter ``key`` at ``step``, independent of torch's global RNG.

        Reseeded per parameter, so the codes depend on neither the bucket nor the parameter's place in it.
        """
        return self._reseeded(device, _stream_seed(self.seed, rank, step, key))

    def _requantize_generator(self, device: torch.device, step: int, key: int, block: int) -> torch.Generator:
        """The two-phase re-ternarization stream of elements ``[block·B, (block+1)·B)`` of parameter ``key``.

        Rank-free: which worker re-ternarizes an element depends on the bucket layout, its bits must not.
        """
        return self._reseeded(device, _stream_seed(self.seed, _REQUANTIZE, step, key, block))

    def _reseeded(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    def _count(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.bytes_received += nbytes


def _clip(state: TernGradState) -> float | None:
    """The clipping factor ``c`` of ``s = min(max|g|, c·σ)``, or None for no clipping (None or inf)."""
    c = state.clip_sigma
    return None if c is None or math.isinf(c) else float(c)


def _names_tuple(names: Sequence[str] | None, keyword: str) -> tuple[str, ...] | None:
    if isinstance(names, str):
        raise ConfigError(f"{keyword} must be a sequence of names, got the string {names!r}; write ({names!r},)")
    return None if names is None else tuple(names)


def _scopes(name: str) -> tuple[str, ...]:
    """``"a.b.weight"`` → ``("a", "a.b", "a.b.weight")``: the parameter and the modules that hold it."""
    parts = name.split(".")
    return tuple(".".join(parts[:k]) for k in range(1, len(parts) + 1))


def _ternarized(name: str, include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> bool:
    """An ``include`` pattern (None: any) and no ``exclude`` pattern matches the parameter or a module holding it."""
    scopes = _scopes(name)
    return (include is None or _any_match(include, scopes)) and not _any_match(exclude, scopes)


def _any_match(patterns: tuple[str, ...], scopes: tuple[str, ...]) -> bool:
    return any(matches(p, scope) for p in patterns for scope in scopes)


def _upgraded_options(options: Mapping[str, Any], version: int) -> dict[str, Any]:
    """Version 1 options in this version's names: ``full_precision_params`` is ``exclude``, no ``include``."""
    options = dict(options)
    if version < 2:
        if "full_precision_params" in options:
            options["exclude"] = options.pop("full_precision_params")
        options.setdefault("include", None)
    return options


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
    for name in ("include", "exclude"):
        if not all(isinstance(pattern, str) for pattern in getattr(state, name) or ()):
            raise ConfigError(f"{name} must hold parameter or module names or globs (str), "
                              f"got {getattr(state, name)!r}")


def _strip_ddp(name: str) -> str:
    return name.removeprefix(_DDP_PREFIX)


def _stream_seed(*values: int) -> int:
    """A 63-bit seed mixing ``values``, e.g. ``(seed, rank, step, parameter)``, with splitmix64."""
    h = 0
    for value in values:
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
