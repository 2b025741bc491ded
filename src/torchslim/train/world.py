"""The processes a run trains on: this one, or N started by torchrun (``torch.distributed``, DDP).

A :class:`World` says which of N processes this is. ``torchrun --nproc-per-node N -m torchslim train RECIPE``
starts N copies of the run; :func:`join` makes each one's World from torchrun's environment (gloo: the engine
trains on CPUs), and :meth:`World.wrap` puts a phase's model in
:class:`~torch.nn.parallel.DistributedDataParallel` with the recipe's gradient mode (``distributed.grad``):
fp32 all-reduce, PyTorch's fp16/bf16 compression and PowerSGD hooks, or TernGrad's
(:func:`torchslim.comm.terngrad_hook`).

The recipe's ``batch_size`` is the global batch: every process draws the same batches (their order depends only
on seed, phase and epoch) and takes its own contiguous part (:meth:`World.part`). DDP averages the processes'
gradients, so each weighs its loss by its share of the batch (:meth:`World.loss_weight`) and the update is
the one-process update of the whole batch. Every rank keeps an identical replica; after each epoch
:meth:`World.check_replicas` compares them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD
from torch.nn.parallel import DistributedDataParallel

from torchslim.comm import TernGradState, terngrad_hook
from torchslim.errors import ConfigError, TorchSlimError
from torchslim.train.recipes import DistributedSpec

log = logging.getLogger(__name__)

__all__ = ["SOLO", "ReplicaMismatch", "World", "Wrapped", "check_batch", "join", "leave",
           "restarted", "under_torchrun"]


class ReplicaMismatch(TorchSlimError):
    """The processes' model replicas differ: they no longer train one model."""


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` training processes (rank 0 writes the run's files)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def part(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n``: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def loss_weight(self, local: int, total: int) -> float:
        """Scale of a rank's mean loss over ``local`` of ``total`` examples, so that DDP's average of the ranks'
        gradients is the gradient of the mean over all ``total``: ``N · local / total``."""
        return self.size * local / total

    def wrap(self, model: nn.Module, spec: DistributedSpec, seed: int = 0) -> Wrapped:
        """``model`` in DDP with ``spec.grad``'s communication hook; ``model`` itself in one process.
        The wrapper shares ``model``'s parameters: optimizers and regularizers keep acting on ``model``."""
        if not self.distributed:
            return Wrapped(model)
        stepped = callable(getattr(model, "step", None))  # a word LM: trained through step(x, state)
        ddp = DistributedDataParallel(_StepAsForward(model) if stepped else model,
                                      bucket_cap_mb=_bucket_cap_mb(model, spec))
        state: Any = None
        if spec.grad == "terngrad":
            t = spec.terngrad
            state = TernGradState.for_model(ddp, scheme=t.scheme, clip_sigma=t.clip_sigma, seed=seed,
                                            min_numel=t.min_numel, warmup_steps=t.warmup_steps, reduce=t.reduce,
                                            full_precision_last=not t.quantize_last)
            ddp.register_comm_hook(state, terngrad_hook)
        elif spec.grad == "powersgd":
            p = spec.powersgd
            state = powerSGD.PowerSGDState(process_group=None, matrix_approximation_rank=p.rank,
                                           start_powerSGD_iter=p.warmup_steps,
                                           min_compression_rate=p.min_compression_rate, random_seed=seed)
            ddp.register_comm_hook(state, powerSGD.powerSGD_hook)
        elif spec.grad in ("fp16", "bf16"):
            hook = default_hooks.fp16_compress_hook if spec.grad == "fp16" else default_hooks.bf16_compress_hook
            ddp.register_comm_hook(None, hook)  # None: the default process group
        return Wrapped(_StepThrough(ddp) if stepped else ddp, state, ddp)

    def share_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm's running statistics), as DDP does before each forward:
        without SyncBatchNorm each rank's last step updated them from its own part of the batch."""
        if self.distributed:
            for t in model.buffers():
                dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        """Wait until every rank is here (e.g. until rank 0 has written a file the others read)."""
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (float64); the values themselves in one process."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_columns(self, state: Any) -> Any:
        """A word LM's hidden states (tensors ``(layers, B/N, H)``, in tuples and lists) with every rank's columns:
        ``(layers, B, H)`` in rank order; ``state`` itself in one process."""
        if not self.distributed or state is None:
            return state
        if isinstance(state, (tuple, list)):
            return type(state)(self.gather_columns(s) for s in state)
        parts = [torch.empty_like(state) for _ in range(self.size)]
        dist.all_gather(parts, state.contiguous())
        return torch.cat(parts, dim=1)

    def take_columns(self, state: Any) -> Any:
        """This rank's columns of hidden states that :meth:`gather_columns` joined."""
        if not self.distributed or state is None:
            return state
        if isinstance(state, (tuple, list)):
            return type(state)(self.take_columns(s) for s in state)
        return state[:, self.part(state.shape[1])].contiguous()

    def check_replicas(self, model: nn.Module, what: str) -> None:
        """Compare the ranks' parameters and buffers by checksum (one all-gather of two numbers per tensor).

        Raises:
            ReplicaMismatch: a rank's replica differs from rank 0's; the message names the first tensor.
        """
        if not self.distributed:
            return
        names, sums = [], []
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            v = t.detach().double().flatten()
            names.append(name)
            sums.append(torch.stack([v.sum(), (v * torch.arange(1, len(v) + 1, device=v.device,
                                                                 dtype=torch.float64)).sum()]))
        mine = torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine)
        for rank, theirs in enumerate(gathered[1:], 1):
            differ = (theirs != gathered[0]).any(dim=1).nonzero()
            if len(differ):
                raise ReplicaMismatch(
                    f"after {what}, rank {rank}'s replica differs from rank 0's, first in '{names[int(differ[0])]}' "
                    f"({len(differ)} of {len(names)} tensors differ): the processes no longer train one model. "
                    "Check that every process runs the same torchslim and torch versions and the same recipe; "
                    "resume with --resume from the last checkpoint")

    def agree(self, error: TorchSlimError | None) -> None:
        """Raise on every rank when some rank met ``error`` (e.g. its data is missing), naming that rank: all stop
        together instead of the others waiting in their next collective.

        Raises:
            TorchSlimError: this rank's own error, or a :class:`ConfigError` with the first failing rank's message.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        messages: list[Any] = [None] * self.size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = next((r for r, m in enumerate(messages) if m is not None), None)
        if failed is not None:
            raise ConfigError(f"rank {failed} cannot start: {messages[failed]}")

    def same_everywhere(self, text: str, what: str) -> None:
        """Refuse to start when ranks disagree on ``text`` (e.g. the recipe), compared by hash.

        Raises:
            ConfigError: some rank has another ``what``.
        """
        if not self.distributed:
            return
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        digests: list[Any] = [None] * self.size
        dist.all_gather_object(digests, digest)
        others = [r for r, d in enumerate(digests) if d != digests[0]]
        if others:
            raise ConfigError(f"ranks {others} were started with another {what} than rank 0; start every process "
                              "with the same command line and files")


@dataclass(frozen=True)
class Wrapped:
    """What :meth:`World.wrap` made: the module to call in training, and its hook's state (TernGrad's, PowerSGD's)."""

    module: nn.Module
    hook_state: Any = None
    ddp: DistributedDataParallel | None = None

    def release(self) -> None:
        """Detach the DDP from the model's parameters at the end of a phase, so that its reducer's autograd hooks
        never fire in a later phase's backward (they would until the garbage collector freed it)."""
        if self.ddp is not None and hasattr(self.ddp, "_remove_autograd_hooks"):
            self.ddp._remove_autograd_hooks()

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the hook: TernGrad's counters (its random streams follow from them)."""
        return self.hook_state.state_dict() if isinstance(self.hook_state, TernGradState) else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None and isinstance(self.hook_state, TernGradState):
            self.hook_state.load_state_dict(state)


class _StepAsForward(nn.Module):
    """A word LM whose ``forward`` is its ``step``: DDP synchronises what runs through ``forward``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: Tensor, state: Any = None) -> Any:
        return self.lm.step(x, state)


class _StepThrough(nn.Module):
    """The DDP of a :class:`_StepAsForward`, called as the LM loop calls a model: ``step(x, state)``."""

    def __init__(self, ddp: DistributedDataParallel) -> None:
        super().__init__()
        self.ddp = ddp

    def step(self, x: Tensor, state: Any = None) -> Any:
        return self.ddp(x, state)


SOLO = World()  # one process: no process group, nothing wrapped


def _bucket_cap_mb(model: nn.Module, spec: DistributedSpec) -> float:
    """DDP's bucket size: the recipe's, except PowerSGD on gloo, which needs every gradient in one bucket.

    PowerSGD's hook chains two all-reduces per bucket (P, then Q); on gloo the chains of several buckets reach
    the wire in different orders on different ranks, and gloo aborts ("Received data size doesn't match").
    """
    if spec.grad != "powersgd" or dist.get_backend() != "gloo":
        return spec.bucket_cap_mb
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    if size <= spec.bucket_cap_mb:
        return spec.bucket_cap_mb
    log.info("PowerSGD on gloo: one DDP bucket of %.0f MiB for all gradients (bucket_cap_mb %g would split them, "
             "and gloo cannot order the hook's all-reduces across buckets)", size + 1, spec.bucket_cap_mb)
    return float(int(size) + 1)


def restarted() -> bool:
    """Whether torchrun restarted this process after a worker failed (``--max-restarts``): the run resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE``) started this process among several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(timeout_s: float = 600.0) -> World:
    """This process's :class:`World` from torchrun's environment, its process group started; :data:`SOLO` when
    not under torchrun. ``timeout_s`` bounds every collective, so a rank that dies leaves no rank hanging."""
    if not under_torchrun():
        return SOLO
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _device())
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s), **_attempt_store())
    world = World(dist.get_rank(), dist.get_world_size(), _device())
    log.debug("rank %d of %d on %s", world.rank, world.size, world.device)
    return world


def leave(world: World, clean: bool = True) -> None:
    """End the process group :func:`join` started: after a barrier when ``clean``, so no rank tears it down under
    another; at once after an error, so the other ranks' next collective fails instead of waiting for this one."""
    if world.distributed and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cpu")  # the engine trains on the CPU; NCCL on GPUs comes with device placement


def _attempt_store() -> dict[str, Any]:
    """After a torchrun restart: its store with keys prefixed by the attempt, as init arguments.

    torchrun's agent keeps one store across restarts, so the workers of attempt k can read the addresses the
    dead workers of attempt k-1 published under the same keys, and gloo then waits forever to connect to them.
    The first attempt uses the plain ``env://`` init.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return {}
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                          is_master=not agent_hosts_it and rank == 0)
    return {"store": dist.PrefixStore(f"torchslim/attempt{attempt}", store), "rank": rank, "world_size": size}


def check_batch(world: World, batch_size: int) -> None:
    """Refuse a global batch the ranks cannot share equally.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the number of processes.
    """
    if batch_size % world.size:
        raise ConfigError(f"batch_size {batch_size} is the global batch, shared by {world.size} processes, and "
                          f"{world.size} does not divide it; set batch_size to a multiple of {world.size} (e.g. "
                          f"--set batch_size={batch_size // world.size * world.size or world.size}) or start "
                          "another number of processes")
