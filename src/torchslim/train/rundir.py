"""The run folder: what a run keeps between epochs and between calls, and what it leaves behind.

Files in the run folder::

    checkpoint.pt   the latest state (phase, epochs done, model, optimizer, RNG, history)
    baseline.pt     the dense model after the baseline      {"arch", "recipe", "phase", "model"}
    sparse.pt       the model after SSL (same architecture, learned zeros)
    compacted.pt    the compact model before fine-tuning    (torchslim.deploy.serialize format)
    compact.pt      the compact model after fine-tuning     (torchslim.deploy.serialize format)
    results.json    accuracies, per-layer structure, history
    run.lock        while a run uses the folder: its process id and host (:func:`hold_run_dir`)

:class:`Run` is the state the engine threads through its phases; :func:`save_run_checkpoint` writes it
after every epoch and :func:`restore` reads it back (``--resume``, and a branch's seeded checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from torchslim._files import atomic_write_text
from torchslim.deploy.serialize import load_compact
from torchslim.errors import CheckpointError, ConfigError
from torchslim.models import create_model
from torchslim.structure.report import SparsityReport
from torchslim.train.checkpoint import (
    load_checkpoint,
    load_state_dict_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from torchslim.train.recipes import Recipe, recipe_from_dict
from torchslim.train.tasks import Task, is_text
from torchslim.train.world import SOLO, World

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT", "EpochRecord", "PHASES", "RUN_FILES", "Run", "RunResult", "build_model", "changed_keys",
    "clear_run_dir", "hold_run_dir", "load_model_file", "load_phase_model", "phase_file", "restore", "save_phase_model",
    "save_run_checkpoint", "with_defaults", "write_results",
]

PHASES: tuple[str, ...] = ("baseline", "ssl", "finetune")
CHECKPOINT_FORMAT = 1
RUN_FILES = ("checkpoint.pt", "baseline.pt", "sparse.pt", "compacted.pt", "compact.pt", "results.json")


@dataclass
class EpochRecord:
    """One finished epoch; ``density`` is non-zero weights / weights of the dense architecture.

    Losses are mean cross-entropies (per image, or per token for a language model, whose perplexity
    is ``exp(loss)``); accuracies are top-1 (next-word for a language model).
    """

    phase: str
    epoch: int  # 1-based within the phase
    lr: float  # at the epoch's first step
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    density: float
    zero_fraction: dict[str, float]  # all-zero groups per SSL kind; {} once compacted (fine-tuning)
    seconds: float
    valid_acc: float | None = None  # on the held-out training images, when ``data.valid_size`` > 0
    valid_loss: float | None = None
    alive: dict[str, int] = field(default_factory=dict)  # non-zero groups per "layer:kind" (ISS units alive...)
    train_seconds: float | None = None  # the training steps alone: ``seconds`` less evaluation and checkpoint


@dataclass
class RunResult:
    """What :func:`torchslim.train.engine.run` produced; also written to ``run_dir/results.json`` (without
    the models)."""

    recipe: Recipe
    run_dir: Path
    accuracy: dict[str, float]  # "baseline", "ssl", "compact" (before fine-tuning), "finetune"
    valid_accuracy: dict[str, float]  # the same keys on the validation split; {} without one
    loss: dict[str, float]  # test cross-entropy, the same keys
    valid_loss: dict[str, float]
    lowrank: list[dict[str, Any]]  # rows of torchslim.surgery.lowrank.LowRankLayer; [] without a decomposition
    history: list[EpochRecord]
    epochs_trained: dict[str, int]  # epochs trained by this call (resumed ones not counted)
    dense_model: nn.Module | None  # after the baseline
    sparse_model: nn.Module | None  # after SSL: same architecture, learned zeros
    compact_model: nn.Module | None  # physically smaller, after fine-tuning
    report: SparsityReport | None  # per-layer live filters, channels, shape fibers of ``sparse_model``
    example: Tensor  # a few test inputs: images (B, C, H, W) or tokens (bptt, B)
    seconds: float
    finished: bool  # False when stopped early by ``stop_after``


@dataclass
class Run:
    """The state the engine threads through its phases."""

    recipe: Recipe
    run_dir: Path
    task: Task
    dense_numel: int
    progress: bool | None
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    valid_accuracy: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    valid_loss: dict[str, float] = field(default_factory=dict)
    lowrank: list[dict[str, Any]] = field(default_factory=list)  # per-layer rows of the decomposition
    done: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    trained: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    optimizer_state: dict[str, Any] | None = None  # from a checkpoint, for the phase it was taken in
    world: World = SOLO  # the processes training this run; rank 0 alone writes its files
    partial: dict[str, Any] | None = None  # from a checkpoint inside an epoch: {"phase", "epoch", "progress"}
    hook_state: dict[str, Any] | None = None  # from a checkpoint: the gradient hook's state in its phase
    recipe_changes: list[dict[str, Any]] = field(default_factory=list)  # resumes with --allow-changed (train.resume)


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model, initialized from ``recipe.seed`` (torch's global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return create_model(recipe.model.name, **recipe.model.kwargs)


# ---------------------------------------------------------------------------------------------
# phase models


def phase_file(run: Run, phase: str) -> Path:
    """Where the model at the end of ``phase`` (baseline or ssl) lies."""
    return run.run_dir / {"baseline": "baseline.pt", "ssl": "sparse.pt"}[phase]


def save_phase_model(run: Run, phase: str, model: nn.Module) -> None:
    """The model at the end of ``phase`` (baseline or ssl), loadable by :func:`load_phase_model`; written by
    rank 0, and every rank returns once it is there (a later phase's teacher reads it)."""
    if run.world.is_main:
        save_checkpoint(phase_file(run, phase), {
            "engine_format": CHECKPOINT_FORMAT, "kind": "phase_model", "phase": phase,
            "recipe": run.recipe.to_dict(), "arch": getattr(model, "arch", None), "model": model.state_dict(),
        })
    run.world.barrier()


def load_phase_model(path: str | Path, recipe: Recipe | None = None) -> tuple[nn.Module, Recipe]:
    """A dense-architecture model from an engine checkpoint (``checkpoint.pt``, ``baseline.pt``,
    ``sparse.pt``), or from a plain ``torch.save(model.state_dict())`` file with ``recipe`` to build it.

    Raises:
        CheckpointError: unreadable; the fine-tuning state of a compact model; a plain state dict
            without ``recipe``; weights that do not fit the recipe's model.
    """
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        plain = _plain_state_dict(path) if Path(path).is_file() else None
        if plain is None:
            raise exc from None
        if recipe is None:
            raise CheckpointError(
                f"{path} is a plain state dict: pass the recipe (--recipe) that builds its model") from None
        state = {"state_dict": plain}
    if "model" in state and "recipe" in state:
        if state.get("compacted"):
            raise CheckpointError(
                f"{path} holds the fine-tuning state of a compacted model; use the run's compact.pt "
                f"(already compact) or its sparse.pt (the model after SSL)"
            )
        recipe = recipe or recipe_from_dict(state["recipe"], source=str(path))
        sd = state["model"]
    elif recipe is not None:
        sd = state.get("state_dict", state)
    else:
        raise CheckpointError(f"{path} holds no recipe; pass the recipe (--recipe) that builds its model")
    model = build_model(recipe)
    load_state_dict_checked(model, sd)
    return model, recipe


def _plain_state_dict(path: str | Path) -> dict[str, Tensor] | None:
    """A ``state_dict`` saved with ``torch.save`` (read without running pickled code), else None."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        return None
    return dict(sd)


def load_model_file(path: Path, recipe: Recipe) -> nn.Module:
    """A model from any file the library writes (compact.pt, an engine checkpoint or phase model), or from a
    plain state dict of ``recipe``'s model; an engine file builds its own model, which may differ from ``recipe``'s.

    Raises:
        CheckpointError: none of those, with the last reader's reason.
    """
    errors = []
    for load in (load_compact, load_phase_model, lambda p: load_phase_model(p, recipe)):
        try:
            out = load(path)
        except CheckpointError as exc:
            errors.append(str(exc))
        else:
            return out if isinstance(out, nn.Module) else out[0]
    raise CheckpointError(f"{path} is not a model file torchslim reads: a compact.pt (save_compact), an engine "
                          f"checkpoint or phase model, or a state dict of this recipe's model ({errors[-1]})")


# ---------------------------------------------------------------------------------------------
# the checkpoint: save after each epoch, restore on --resume


def save_run_checkpoint(run: Run, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                        partial: Mapping[str, Any] | None = None, hook: Mapping[str, Any] | None = None) -> None:
    """``checkpoint.pt``: ``run``'s progress in ``phase``, ``model`` and the optimizer's state (None between phases);
    rank 0 writes it. ``partial``: where an unfinished epoch stands (``{"phase", "epoch", "progress"}``, the last a
    :class:`~torchslim.train.loop.EpochProgress` as a dict); ``hook``: the gradient hook's state under torchrun."""
    if not run.world.is_main:
        return
    save_checkpoint(run.run_dir / "checkpoint.pt", {
        "engine_format": CHECKPOINT_FORMAT, "kind": "engine", "phase": phase, "compacted": phase == "finetune",
        "recipe": run.recipe.to_dict(), "arch": getattr(model, "arch", None),
        "done": dict(run.done), "history": list(run.history), "accuracy": dict(run.accuracy),
        "valid_accuracy": dict(run.valid_accuracy), "loss": dict(run.loss), "valid_loss": dict(run.valid_loss),
        "lowrank": list(run.lowrank), "recipe_changes": list(run.recipe_changes),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(), "partial": dict(partial) if partial is not None else None, "hook": hook,
    })


def restore(run: Run, model: nn.Module, state: Mapping[str, Any] | None = None) -> tuple[nn.Module, str]:
    """Load ``checkpoint.pt`` (or its already loaded ``state``) into ``run``; returns the model to continue with
    and its phase.

    Raises:
        CheckpointError: not an engine checkpoint, one of another model or an unknown phase, or a compacted
            state without its ``compacted.pt``.
    """
    path = run.run_dir / "checkpoint.pt"
    state = load_checkpoint(path) if state is None else state
    phase = _check_resumable(run, path, state)
    if state.get("compacted"):
        compacted = run.run_dir / "compacted.pt"
        if not compacted.is_file():
            raise CheckpointError(f"{path} continues a compacted model, but {compacted} is missing; "
                                  f"run without --resume to start again")
        model = load_compact(compacted)
    load_state_dict_checked(model, state["model"])
    run.done.update({p: int(n) for p, n in state["done"].items()})
    run.history = list(state["history"])
    run.accuracy = dict(state.get("accuracy", {}))
    run.valid_accuracy = dict(state.get("valid_accuracy", {}))
    run.loss = dict(state.get("loss", {}))
    run.valid_loss = dict(state.get("valid_loss", {}))
    run.lowrank = list(state.get("lowrank", []))
    run.recipe_changes = list(state.get("recipe_changes", []))
    run.optimizer_state = state.get("optimizer")
    run.partial, run.hook_state = state.get("partial"), state.get("hook")
    if state.get("rng") is not None:
        set_rng_state(state["rng"])
    log.info("resuming %s from %s: phase %s, epochs done %s", run.recipe.name, path, phase, run.done)
    return model, phase


def _check_resumable(run: Run, path: Path, state: Mapping[str, Any]) -> str:
    """The phase of the engine checkpoint ``state``, after checking that ``run`` can continue it."""
    missing = [k for k in ("phase", "done", "model", "history", "recipe") if k not in state]
    if missing or state.get("kind") != "engine":
        raise CheckpointError(
            f"{path} is not an engine checkpoint (missing {missing}); delete it or run without --resume")
    if state["recipe"].get("model") != run.recipe.to_dict()["model"]:
        raise CheckpointError(
            f"{path} was written for model {state['recipe'].get('model')}, not {run.recipe.model}; "
            f"use another --out folder or run without --resume"
        )
    changed = changed_keys(with_defaults(state["recipe"]), run.recipe.to_dict())
    if changed:
        log.info("resuming with a recipe that differs from the checkpoint's in %s (train.resume let them through: "
                 "unused so far, or allowed); finished epochs are kept", ", ".join(changed))
    if state["phase"] not in PHASES:
        raise CheckpointError(f"{path} has an unknown phase {state['phase']!r}; delete it or run without --resume")
    return state["phase"]


def clear_run_dir(run_dir: Path, *, overwrite: bool = False) -> None:
    """Remove the files an earlier run left, so that a fresh run never mixes with them.

    Raises:
        ConfigError: the folder holds an earlier run's files and ``overwrite`` is False.
    """
    stale = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if stale and not overwrite:
        raise ConfigError(
            f"{run_dir} holds another run's results ({', '.join(p.name for p in stale)}), which a fresh run would "
            f"delete; continue that run with --resume (resume=True), replace it with --overwrite (overwrite=True), "
            f"or train into another folder with --out (run_dir=...)")
    if stale:
        log.info("starting from scratch in %s: replacing the earlier run's files (--resume continues it)", run_dir)
    for path in stale:
        path.unlink()


# ---------------------------------------------------------------------------------------------
# one run at a time in a folder

LOCK_FILE = "run.lock"
_PARTIAL_WRITE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")  # torchslim._files.atomic_write's temporary files


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir`` for one run: create it, lock it, and remove the temporary files of writes that a killed
    run left. The lock (``run.lock``: an advisory ``flock`` and the owner's process id and host) is released on
    leaving, also on an exception; one left by a dead process of this host is taken over with a warning.

    Raises:
        ConfigError: another run holds the folder, or a lock from another host that cannot be checked.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = _lock(path)
    try:
        _remove_partial_writes(run_dir)
        yield run_dir
    finally:
        if _same_file(fd, path):
            path.unlink()
        os.close(fd)  # releases the flock


def _owner_of(fd: int) -> dict[str, Any] | None:
    """The ``{"pid", "host", "since"}`` written in a lock file, or None when empty or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and {"pid", "host"} <= owner.keys() else None


def _describe(owner: Mapping[str, Any] | None) -> str:
    if owner is None:
        return "an unknown process"
    return f"process {owner['pid']} on host {owner['host']}, since {owner.get('since', '?')}"


def _lock(path: Path) -> int:
    """An open descriptor of ``path`` that holds its lock, with this process written in as the owner."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_flock(fd):
            owner = _owner_of(fd)
            os.close(fd)
            raise ConfigError(f"{path.parent} is in use by another run ({_describe(owner)}); wait for it to end, "
                              f"or train into another folder with --out")
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    owner = _owner_of(fd)
    if owner is not None and (owner["pid"], owner["host"]) != (me["pid"], me["host"]):
        if owner["host"] != me["host"] or fcntl is None:
            os.close(fd)
            raise ConfigError(f"{path} says {_describe(owner)} uses {path.parent}, which cannot be checked from "
                              f"here; if that run has ended, delete {path}; else train into another folder with --out")
        log.warning("%s: taking over the lock of %s, which no longer runs", path.parent, _describe(owner))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode("utf-8"))
    return fd


def _try_flock(fd: int) -> bool:
    """Take the advisory lock without waiting; the kernel drops it when its process dies."""
    if fcntl is None:  # no flock (Windows): the owner written in the file decides alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process never renamed (never other files)."""
    partial = [p for p in run_dir.iterdir() if _PARTIAL_WRITE.fullmatch(p.name) and p.is_file()]
    if partial:
        log.info("%s: removing %d temporary files of interrupted writes (%s)", run_dir, len(partial),
                 ", ".join(p.name for p in partial))
    for p in partial:
        p.unlink(missing_ok=True)


def with_defaults(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """A saved recipe with the keys added since it was written, at their defaults (``raw`` if it no longer loads)."""
    try:
        return recipe_from_dict(raw).to_dict()
    except ConfigError:
        return raw


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "strength":
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------------------------------------
# results.json


def _param_count(model: nn.Module | None) -> int | None:
    return None if model is None else sum(p.numel() for p in model.parameters())


def write_results(result: RunResult, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``results.json`` atomically (recipe, accuracies, history, parameter counts, ``extra``); returns
    its path."""
    data = {
        "recipe": result.recipe.to_dict(),
        "finished": result.finished,
        "seconds": round(result.seconds, 2),
        "accuracy": result.accuracy,
        "valid_accuracy": result.valid_accuracy,
        "loss": result.loss,
        "valid_loss": result.valid_loss,
        "lowrank": result.lowrank,
        **({"perplexity": {k: math.exp(v) for k, v in result.loss.items()},
            "valid_perplexity": {k: math.exp(v) for k, v in result.valid_loss.items()}}
           if is_text(result.recipe) else {}),
        "params": {"dense": _param_count(result.dense_model), "compact": _param_count(result.compact_model)},
        "epochs_trained": result.epochs_trained,
        "structure": [dataclasses.asdict(layer) for layer in result.report.layers] if result.report else None,
        "history": [dataclasses.asdict(r) for r in result.history],
        "files": sorted(p.name for p in result.run_dir.iterdir() if p.suffix in (".pt", ".png")),
        **(extra or {}),
    }
    path = result.run_dir / "results.json"
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
    return path
