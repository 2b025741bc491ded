"""The training engine: baseline → SSL → compact → fine-tune, as the SSL paper trains (Wen et al. 2016).

1. **baseline**: momentum SGD with L2 weight decay, the dense model.
2. **ssl**: the same, plus a group Lasso on the recipe's group kinds (proximal or subgradient).
3. **compact**: all-zero removable groups are cut out (:func:`torchslim.surgery.compact.compact`).
4. **finetune**: the smaller model is trained with the Lasso off; a :class:`ZeroMask` keeps the zeros
   that remain inside it (shape fibers of surviving kernels) at zero, with their momentum.

Every epoch ends with an evaluation and an atomic checkpoint in the run folder
(``runs/<recipe name>/checkpoint.pt``); ``run(..., resume=True)`` continues from it without redoing
finished epochs. Each epoch shuffles with its own generator seeded from ``(seed, phase, epoch)``, so a
resumed run sees the same batches as an uninterrupted one. A resume continues the run it resumes or refuses
(:mod:`~torchslim.train.resume`: a recipe changed where finished epochs read it, a hand-edited checkpoint), and
a loss or weight that turns NaN or infinite stops the phase (``DivergenceError``) before it is checkpointed.

This module is the training app's façade: :func:`run` and the names the CLI and benchmarks use. The parts
stand below it, each on the ones before: :mod:`~torchslim.train.loop` (one SGD step and epoch, with their
:class:`Regularizers`), :mod:`~torchslim.train.rundir` (the run folder's files: phase models, checkpoint,
``results.json``), :mod:`~torchslim.train.branch` (``--from``) and :mod:`~torchslim.train.phases`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from torchslim.deploy.serialize import FORMAT as COMPACT_FORMAT
from torchslim.deploy.serialize import save_compact
from torchslim.errors import CheckpointError, ConfigError, TorchSlimError
from torchslim.structure.report import sparsity_report
from torchslim.train.branch import branch, seed_branch, shared_steps
from torchslim.train.checkpoint import FORMAT as CHECKPOINT_FORMAT
from torchslim.train.loop import Regularizers, evaluate, lr_at, optimizer_step, train_epoch
from torchslim.train.phases import run_phases
from torchslim.train.recipes import Recipe
from torchslim.train.resume import changed_values, resume_state
from torchslim.train.rundir import (
    PHASES,
    EpochRecord,
    Run,
    RunResult,
    build_model,
    clear_run_dir,
    hold_run_dir,
    load_phase_model,
    restore,
    write_results,
)
from torchslim.train.tasks import load_task, random_inputs
from torchslim.train.world import SOLO, World, check_batch

log = logging.getLogger(__name__)

__all__ = [
    "EpochRecord",
    "PHASES",
    "Regularizers",
    "RunResult",
    "build_model",
    "check_compact_input",
    "evaluate",
    "example_inputs",
    "load_phase_model",
    "lr_at",
    "optimizer_step",
    "run",
    "shared_steps",
    "train_epoch",
    "write_results",
]


def example_inputs(recipe: Recipe, batch: int = 2) -> Tensor:
    """Seeded random inputs of the recipe's data, for tracing and profiling: images ``(batch, C, H, W)``,
    or token ids ``(data.bptt, batch)`` for a language model."""
    return random_inputs(recipe, batch)


def run(
    recipe: Recipe,
    *,
    data_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: str | None = None,
    progress: bool | None = None,
    branch_from: str | Path | None = None,
    overwrite: bool = False,
    allow_changed: Sequence[str] = (),
    world: World = SOLO,
) -> RunResult:
    """Train ``recipe`` through baseline → SSL → compact → fine-tune.

    Args:
        recipe: from :func:`torchslim.train.recipes.load_recipe`.
        data_dir: where the dataset lies (default: ``$TORCHSLIM_DATA``, then the system folder).
        run_dir: the run folder (default ``runs/<recipe.name>``).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists; finished epochs are not redone.
        stop_after: ``"baseline"``, ``"ssl"`` or ``"compact"`` to stop after that step.
        progress: on stderr: ``None`` a bar on a terminal and a line every ~30 s elsewhere, ``True`` a bar,
            ``False`` nothing.
        branch_from: another run's folder: start after the steps it trained as ``recipe`` would (say, the
            same dense baseline, or the same SSL before another fine-tuning), copying their files. Ignored
            when ``resume`` finds a checkpoint in ``run_dir``.
        overwrite: a fresh run (no ``resume``) may delete the results of an earlier run in ``run_dir``.
        allow_changed: with ``resume``, recipe keys (``ssl.strength``, or a section: ``ssl``) that may differ
            from the values the finished epochs used; ``results.json`` records which epochs ran with which.
        world: the processes that train this run together (:func:`torchslim.train.world.join` under torchrun):
            each takes its part of every batch, DDP averages the gradients with ``recipe.distributed.grad``, and
            rank 0 alone writes the run folder, which every rank must see at ``run_dir`` to resume.
    Raises:
        DatasetNotFound: the data is missing (the message says how to get it).
        CheckpointError: ``resume`` with a corrupt or hand-edited checkpoint (the message names the field), or
            one of another model; ``branch_from`` without a checkpoint, or short of the shared steps.
        ConfigError: a recipe value the model does not fit (e.g. a multiplier for a missing layer);
            ``branch_from`` a run that shares no step; ``run_dir`` in use by another run, or holding an
            earlier run's results without ``resume`` or ``overwrite``; ``resume`` with a recipe that differs
            in a value the finished epochs used, unless ``allow_changed`` names it.
        DivergenceError: a training loss or weight became NaN or infinite; the checkpoint keeps the last finite
            epoch, and the message names the phase, epoch and step, and the recipe keys to change.
    """
    if stop_after not in (None, "baseline", "ssl", "compact"):
        raise ConfigError(f"stop_after must be 'baseline', 'ssl' or 'compact', got {stop_after!r}")
    if allow_changed and not resume:
        raise ConfigError("--allow-changed lets a resumed run continue with changed values; add --resume")
    started = time.perf_counter()
    world.same_everywhere(json.dumps(recipe.to_dict(), sort_keys=True), "recipe")
    check_batch(world, recipe.batch_size)
    task, failed = None, None
    try:
        task = load_task(recipe, data_dir)
    except TorchSlimError as exc:  # under torchrun every rank stops with it (data missing on one machine)
        failed = exc
    world.agree(failed)
    model = build_model(recipe)
    run_ = Run(
        recipe=recipe, run_dir=Path(run_dir) if run_dir is not None else Path("runs") / recipe.name,
        task=task, dense_numel=sum(p.numel() for p in model.parameters()),
        progress=progress if world.is_main else False, world=world,
    )
    # one run at a time in a folder, held by rank 0; the lock goes on any exit
    with hold_run_dir(run_.run_dir) if world.is_main else nullcontext():
        phase = "baseline"
        if resume and (run_.run_dir / "checkpoint.pt").exists():
            state, changes = resume_state(run_, allow_changed)
            model, phase = restore(run_, model, state)
            run_.recipe_changes += changes
        else:
            if resume and branch_from is None:
                log.info("no checkpoint in %s: starting %s from scratch", run_.run_dir, recipe.name)
            branched = branch(run_, Path(branch_from)) if branch_from is not None else None  # checked before clearing
            if world.is_main:
                clear_run_dir(run_.run_dir, overwrite=overwrite or resume)
                if branched is not None:
                    seed_branch(run_, Path(branch_from), *branched)
            world.barrier()  # the others read what rank 0 cleared and copied
            if branched is not None:
                model, phase = restore(run_, model)
        model, finished = run_phases(run_, model, phase, stop_after)
        return _results(run_, model, finished, time.perf_counter() - started)


def _results(run: Run, model: nn.Module, finished: bool, seconds: float) -> RunResult:
    """Collect the models, save ``compact.pt`` and ``results.json``."""
    dense = _load_if_exists(run.run_dir / "baseline.pt", run.recipe)
    sparse = _load_if_exists(run.run_dir / "sparse.pt", run.recipe)
    compact_model = model.eval() if "compact" in run.accuracy else None
    if finished and compact_model is not None and run.world.is_main:
        save_compact(compact_model, run.run_dir / "compact.pt", arch=getattr(sparse, "arch", None))
    result = RunResult(
        recipe=run.recipe, run_dir=run.run_dir, accuracy=dict(run.accuracy),
        valid_accuracy=dict(run.valid_accuracy), loss=dict(run.loss), valid_loss=dict(run.valid_loss),
        lowrank=list(run.lowrank),
        history=[EpochRecord(**r) for r in run.history], epochs_trained=dict(run.trained),
        dense_model=dense, sparse_model=sparse, compact_model=compact_model,
        report=sparsity_report(sparse, run.task.example) if sparse is not None else None,
        example=run.task.example, seconds=seconds, finished=finished,
    )
    extra = {"recipe_changes": changed_values(run.recipe_changes, run.history)} if run.recipe_changes else {}
    if run.world.distributed:  # each epoch ended with World.check_replicas, which raises on any difference
        extra["distributed"] = {"processes": run.world.size, "grad": run.recipe.distributed.grad,
                                "replicas_agreed_epochs": sum(run.trained.values()),
                                "steps_per_epoch": run.task.steps_per_epoch()}
    if run.world.is_main:
        write_results(result, extra or None)
    return result


def _load_if_exists(path: Path, recipe: Recipe) -> nn.Module | None:
    return load_phase_model(path, recipe)[0].eval() if path.exists() else None


_COMPACT_INPUTS = ("`torchslim compact` takes a run folder's sparse.pt or baseline.pt, its checkpoint.pt while "
                   "the run is in the baseline or SSL phase, or a state dict saved with "
                   "torch.save(model.state_dict()) together with --recipe")


def check_compact_input(path: str | Path) -> None:
    """Refuse, saying what ``path`` is, a file ``compact`` cannot take: no file, not a torch file, a compact
    model file, or a torch file that is neither a torchslim checkpoint nor a state dict.

    Raises:
        CheckpointError: saying what the file is and what ``torchslim compact`` takes.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{path} {what}; {_COMPACT_INPUTS}")
    with path.open("rb") as f:
        head = f.read(4096)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a torch.save zip, or a legacy pickle
        raise CheckpointError(f"{path} is not a torchslim checkpoint, compact file or state dict: it is "
                              f"{_what_file(head)}, not a file torch.save wrote. {_COMPACT_INPUTS}.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... here
        raise CheckpointError(f"{path} looks like a torch file but torch.load(weights_only=True) cannot read it "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): it is truncated, "
                              f"corrupt, or holds pickled Python objects. {_COMPACT_INPUTS}.") from exc
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt == COMPACT_FORMAT:
        raise CheckpointError(f"{path} is already a compact model file: there are no zeros left to cut. Measure "
                              f"it with `torchslim profile --compact {path}`, or compact the run's sparse.pt.")
    plain = isinstance(raw, dict) and raw and all(isinstance(v, Tensor) for v in raw.values())
    if fmt != CHECKPOINT_FORMAT and not plain:
        raise CheckpointError(f"{path} is not a torchslim checkpoint, compact file or state dict: it is a torch "
                              f"file holding {_what_object(raw)}. {_COMPACT_INPUTS}.")


def _what_file(head: bytes) -> str:
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the 4 KiB read
            return "a binary file"
    return "a text file"


def _what_object(raw: object) -> str:
    if isinstance(raw, dict):
        keys = ", ".join(repr(k) for k in list(raw)[:5])
        return f"a dict with keys {keys}{', ...' if len(raw) > 5 else ''}" if raw else "an empty dict"
    return f"a {type(raw).__name__}"
