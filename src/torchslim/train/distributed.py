"""Data-parallel training with TernGrad, fp16 or fp32 gradients, under ``torchrun``::

    torchrun --standalone --nproc-per-node 4 -m torchslim.train.distributed --model lenet --grad terngrad \\
        --steps 2000 --batch-size 64 --checkpoint runs/ddp/ckpt.pt --out runs/ddp/summary.json

Backend: NCCL with one GPU per worker where CUDA is available, gloo on CPU otherwise. Each worker trains
on its own shard of Fashion-MNIST (examples ``rank, rank + N, …``) in an order drawn from
``(seed, rank, epoch)``, so a step's batch depends only on the step: a resumed run sees the batches an
uninterrupted one would. Rank 0 writes an atomic checkpoint every ``--checkpoint-every`` steps (model,
optimizer, TernGrad state); started again, e.g. by ``torchrun --max-restarts``, every worker resumes from
it and loses at most the steps since. At the end rank 0 evaluates on the test set and writes a JSON
summary to ``--out``.

A resume continues the run it resumes, or refuses: the checkpoint stores the arguments that decide the
batches, the updates and the codes (mode, model, seed, learning rate, momentum, weight decay, batch size,
training examples, world size, TernGrad options), and a resume with other values is a ConfigError that
lists them, unless ``--allow-changed`` names them (recorded in the checkpoint as ``run_changes``). TernGrad's
random streams are keyed by parameter, not by DDP's bucket layout, so a resumed run computes the same bits
as an uninterrupted one.

Wire bytes per step come from :class:`~torchslim.comm.hooks.TernGradState` for ``--grad terngrad``;
for fp32/fp16 they are the ring all-reduce volume ``2(N-1)/N · bytes`` of all gradients.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from torchslim.comm.hooks import TernGradState, fp16_compress_hook, terngrad_hook
from torchslim.data import batches, load_dataset
from torchslim.errors import CheckpointError, ConfigError, TorchSlimError
from torchslim.models import create_model
from torchslim.train.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from torchslim.train.world import attempt_store

log = logging.getLogger(__name__)

GRADS = ("terngrad", "fp32", "fp16")
# what a resume must keep (--allow-changed may name them): they decide the batches, updates and codes
RUN_KEYS = ("grad", "model", "seed", "lr", "momentum", "weight_decay", "batch_size", "train_limit", "world_size")
TERNGRAD_KEYS = ("scheme", "clip_sigma", "min_numel", "warmup_steps", "reduce", "quantize_last")


@dataclass
class _Shard:
    """This worker's training examples and the batches it draws from them."""

    images: Tensor          # (n, 1, 28, 28)
    labels: Tensor          # (n,)
    batch_size: int
    seed: int
    rank: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.labels) // self.batch_size

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch of ``step``: epoch ``step // steps_per_epoch``, shuffled by ``(seed, rank, epoch)``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.rank * 10_007 + epoch))
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        return self.images[idx], self.labels[idx]


_DESCRIPTION = """\
Data-parallel training of a Fashion-MNIST model with TernGrad, fp16 or fp32 gradients, under torchrun:

  torchrun --standalone --nproc-per-node 4 -m torchslim.train.distributed --grad terngrad --steps 2000

Each worker trains on its own shard; rank 0 checkpoints every --checkpoint-every steps and, started again
(torchrun --max-restarts 1), every worker resumes from that checkpoint. At the end rank 0 evaluates on the
test set and writes a JSON summary (accuracy, seconds, bytes and bits per element on the wire) to --out."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (unless the help says it); the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        shown = "off" if action.default is False else "none" if action.default == [] else "%(default)s"
        return f"{text} (default: {shown})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchslim.train.distributed", description=_DESCRIPTION,
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", default="lenet", help="a torchslim.models name (lenet, fcnet)")
    p.add_argument("--grad", choices=GRADS, default="terngrad", help="how gradients are averaged")
    p.add_argument("--steps", type=int, default=1000, help="total iterations, counting resumed ones")
    p.add_argument("--batch-size", type=int, default=64, help="examples per worker per step")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--seed", type=int, default=0, help="model init, data order and TernGrad streams")
    p.add_argument("--data-dir", help="Fashion-MNIST folder (default: $TORCHSLIM_DATA, then the system one)")
    p.add_argument("--train-limit", type=int, help="use only the first N training examples (default: all)")
    p.add_argument("--test-limit", type=int, help="evaluate on only the first N test examples (default: all)")
    p.add_argument("--checkpoint", help="checkpoint file: resumed from if present, written by rank 0 "
                                        "(default: none, no checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--out", help="JSON summary written by rank 0 at the end (default: none)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size in MiB")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss logs on rank 0")
    p.add_argument("--allow-changed", nargs="+", default=[], metavar="NAME",
                   help="resume although these arguments differ from the checkpoint's (e.g. lr batch-size)")
    p.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)   # tests: crash once, before that step
    _add_terngrad_options(p)
    return p


def _add_terngrad_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TernGrad (--grad terngrad)")
    g.add_argument("--scheme", default="base3", choices=("base3", "2bit"),
                   help="code packing: base3 (5 codes a byte, 1.6 bits) or 2bit")
    g.add_argument("--clip-sigma", type=float, default=2.5, help="s = min(max|g|, c·std); inf disables")
    g.add_argument("--min-numel", type=int, default=1, help="layers with fewer elements stay fp32")
    g.add_argument("--warmup-steps", type=int, default=0, help="first K steps with fp32 gradients")
    g.add_argument("--reduce", default="auto", choices=("auto", "allgather", "allreduce", "twophase"),
                   help="auto: exact, whichever sends fewer bytes; twophase: fewest bytes, rounds twice")
    g.add_argument("--quantize-last", action="store_true",
                   help="ternarize the last layer too (it stays fp32 otherwise, as in the paper)")


def main(argv: Sequence[str] | None = None) -> int:
    """Train under torchrun; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    device = _init_process_group()
    try:
        summary = train(args, device)
        dist.barrier()  # rank 0 may still be evaluating; tearing gloo down under it aborts the process
    except TorchSlimError as exc:  # raised alike on every worker (before any collective): no traceback
        log.error("error: %s", exc)
        return 2
    finally:
        dist.destroy_process_group()
    if summary is not None:
        print(json.dumps(summary))
    return 0


def _init_process_group() -> torch.device:
    """NCCL on this worker's GPU where CUDA is available, else gloo on CPU."""
    store = attempt_store()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **store)
        return device
    dist.init_process_group("gloo", **store)
    return torch.device("cpu")


def train(args: argparse.Namespace, device: torch.device) -> dict[str, Any] | None:
    """Train ``args.steps`` steps (resuming from ``args.checkpoint``); rank 0 returns the summary."""
    _check_args(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)                                      # same initial weights on every worker
    model = create_model(args.model).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    state = _terngrad_state(args, model)
    run = _RunRecord(_run_arguments(args, world))
    start = _resume(args.checkpoint, model, optimizer, state, run, args.allow_changed)
    ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    _register_hook(ddp, args.grad, state)
    shard = _shard(args, rank, world, device)
    began = time.perf_counter()
    for step in range(start, args.steps):
        _fail_once(args, step)
        loss = _train_step(ddp, optimizer, *shard.batch(step))
        if rank == 0 and (step + 1) % args.checkpoint_every == 0 and args.checkpoint:
            _save(args.checkpoint, step + 1, model, optimizer, state, run)
        if rank == 0 and (step + 1) % args.log_every == 0:
            log.info("step %d/%d loss %.4f", step + 1, args.steps, loss)
    seconds = time.perf_counter() - began
    if rank != 0:
        return None
    if args.checkpoint and args.steps % args.checkpoint_every:
        _save(args.checkpoint, args.steps, model, optimizer, state, run)
    return _summary(args, model, state, start, seconds, world, device, run.changes)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.allow_changed = [name.lstrip("-").replace("-", "_") for name in args.allow_changed]
    unknown = sorted(set(args.allow_changed) - set(RUN_KEYS + TERNGRAD_KEYS))
    if unknown:
        raise ConfigError(f"--allow-changed {' '.join(unknown)}: not a run argument; name some of "
                          f"{', '.join(k.replace('_', '-') for k in RUN_KEYS + TERNGRAD_KEYS)}")


@dataclass
class _RunRecord:
    """The run's arguments, checkpointed, and the changes resumes with ``--allow-changed`` made to them."""

    arguments: dict[str, Any]
    changes: list[dict[str, Any]] = field(default_factory=list)   # {"step", "name", "before", "after"}


def _run_arguments(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """What a resume must keep: ``RUN_KEYS`` (and ``TERNGRAD_KEYS`` for ``--grad terngrad``)."""
    keys = RUN_KEYS + (TERNGRAD_KEYS if args.grad == "terngrad" else ())
    return {key: world if key == "world_size" else getattr(args, key) for key in keys}


def _check_resume(path: str, saved: dict[str, Any], run: _RunRecord, allow: Sequence[str]) -> None:
    """Refuse a resume whose arguments differ from the checkpoint's, unless ``allow`` names each; record those.

    Raises:
        ConfigError: differing arguments, listed with the checkpoint's and this run's values.
        CheckpointError: a damaged ``run`` entry.
    """
    stored, changes = saved.get("run"), saved.get("run_changes", [])
    if stored is None:                      # written before checkpoints stored their run's arguments
        log.warning("%s does not record its run's arguments; resuming without checking them", path)
        return
    if not isinstance(stored, dict) or not isinstance(changes, list):
        raise CheckpointError(f"{path}: its 'run' entry is damaged (a {type(stored).__name__}); delete the "
                              "checkpoint or pass another --checkpoint path to start afresh")
    mine = run.arguments
    keys = RUN_KEYS + (TERNGRAD_KEYS if stored.get("grad") == mine["grad"] == "terngrad" else ())
    differ = [key for key in keys if stored.get(key) != mine.get(key)]
    refused = [key for key in differ if key not in allow]
    if refused:
        listed = "; ".join(f"{_flag(k, mine.get(k))} (checkpoint: {_flag(k, stored.get(k))})" for k in refused)
        raise ConfigError(
            f"{path} was written by a run with other arguments: {listed}. A resume must continue the run it "
            f"resumes: rerun with the checkpoint's values ({', '.join(_flag(k, stored.get(k)) for k in refused)}), "
            f"pass --allow-changed {' '.join(k.replace('_', '-') for k in refused)} to continue with the new ones "
            "(recorded in the checkpoint), or start a fresh run with another --checkpoint path"
        )
    run.changes = [*changes, *({"step": saved.get("step"), "name": key, "before": stored.get(key),
                                "after": mine.get(key)} for key in differ)]
    for key in differ:
        log.warning("resuming with %s instead of %s, as --allow-changed %s says", _flag(key, mine.get(key)),
                    _flag(key, stored.get(key)), key.replace("_", "-"))


def _flag(key: str, value: Any) -> str:
    """An argument as it is written: ``--lr 0.1``, ``no --train-limit``, ``--nproc-per-node 2`` (torchrun's)."""
    if key == "world_size":
        return f"{value} workers (--nproc-per-node {value})"
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool) or value is None:
        return name if value else f"no {name}"
    return f"{name} {value}"


def _terngrad_state(args: argparse.Namespace, model: nn.Module) -> TernGradState | None:
    if args.grad != "terngrad":
        return None
    return TernGradState.for_model(
        model, scheme=args.scheme, clip_sigma=args.clip_sigma, seed=args.seed, min_numel=args.min_numel,
        warmup_steps=args.warmup_steps, reduce=args.reduce, full_precision_last=not args.quantize_last,
    )


def _register_hook(ddp: DistributedDataParallel, grad: str, state: TernGradState | None) -> None:
    if grad == "terngrad":
        ddp.register_comm_hook(state, terngrad_hook)
    elif grad == "fp16":
        ddp.register_comm_hook(None, fp16_compress_hook)                # None: the default process group


def _shard(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> _Shard:
    """Examples ``rank, rank + N, …`` of the (limited) training set; equal sizes on every worker."""
    train_set = load_dataset("fashion-mnist", "train", args.data_dir, limit=args.train_limit)
    per_worker = len(train_set.labels) // world
    if per_worker < args.batch_size:
        raise ConfigError(f"{len(train_set.labels)} training examples give each of {world} workers {per_worker}, "
                          f"fewer than --batch-size {args.batch_size}; raise --train-limit or lower --batch-size")
    pick = slice(rank, per_worker * world, world)
    return _Shard(train_set.images[pick].to(device), train_set.labels[pick].to(device), args.batch_size,
                  args.seed, rank)


def _train_step(ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ddp(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _save(path: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
          state: TernGradState | None, run: _RunRecord) -> None:
    save_checkpoint(path, {
        "arch": getattr(model, "arch", None), "step": step, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "terngrad": state.state_dict() if state is not None else None,
        "run": run.arguments, "run_changes": run.changes,
    })


def _resume(path: str | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            state: TernGradState | None, run: _RunRecord, allow_changed: Sequence[str] = ()) -> int:
    """Load ``path`` into the model, optimizer and state if it exists; the step to start from.

    Raises:
        ConfigError: the checkpoint's run had other arguments (see :func:`_check_resume`).
    """
    if not path or not Path(path).exists():
        return 0
    saved = load_checkpoint(path, map_location=next(model.parameters()).device)
    _check_resume(path, saved, run, allow_changed)
    load_state_dict_checked(model, saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if state is not None and saved.get("terngrad") is not None:
        state.load_state_dict(saved["terngrad"])
    log.info("resumed from %s at step %d", path, saved["step"])
    return int(saved["step"])


def _fail_once(args: argparse.Namespace, step: int) -> None:
    """For tests of ``torchrun --max-restarts``: crash at ``--fail-at-step`` in the first attempt only."""
    if args.fail_at_step == step and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        raise RuntimeError(f"--fail-at-step {step}: simulated crash")


def _summary(args: argparse.Namespace, model: nn.Module, state: TernGradState | None, start: int,
             seconds: float, world: int, device: torch.device, changes: list[dict[str, Any]]) -> dict[str, Any]:
    """Test accuracy, speed and wire bytes per step; written to ``args.out`` if given."""
    test_set = load_dataset("fashion-mnist", "test", args.data_dir, limit=args.test_limit)
    loss, accuracy = _evaluate(model, test_set.images.to(device), test_set.labels.to(device))
    sent, received = _bytes_per_step(args.grad, model, state, world)
    done = args.steps - start
    summary = {
        "model": args.model, "grad": args.grad, "world_size": world, "backend": dist.get_backend(),
        "steps": args.steps, "resumed_from_step": start, "batch_size": args.batch_size,
        "test_loss": loss, "test_accuracy": accuracy, "seconds": seconds,
        "steps_per_second": done / seconds if done and seconds > 0 else None,
        "bytes_sent_per_step": sent, "bytes_received_per_step": received,
        "bits_per_element": 8 * sent / sum(p.numel() for p in model.parameters()),
        "terngrad": state.state_dict() if state is not None else None, "run_changes": changes,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def _evaluate(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for x, y in batches(images, labels, 1000, shuffle=False):
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss / max(len(labels), 1), correct / max(len(labels), 1)


def _bytes_per_step(grad: str, model: nn.Module, state: TernGradState | None, world: int) -> tuple[float, float]:
    """Per worker: counted by the TernGrad state, or a ring all-reduce of every gradient for fp32/fp16."""
    if state is not None:
        steps = max(state.step, 1)
        return state.bytes_sent / steps, state.bytes_received / steps
    nbytes = sum(p.numel() for p in model.parameters()) * (2 if grad == "fp16" else 4)
    ring = 2 * (world - 1) * nbytes / world
    return ring, ring


if __name__ == "__main__":
    raise SystemExit(main())
