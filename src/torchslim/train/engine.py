"""The training engine: baseline → SSL → compact → fine-tune, as the SSL paper trains (Wen et al. 2016).

1. **baseline**: momentum SGD with L2 weight decay, the dense model.
2. **ssl**: the same, plus a group Lasso on the recipe's group kinds (proximal or subgradient).
3. **compact**: all-zero removable groups are cut out (:func:`torchslim.surgery.compact.compact`).
4. **finetune**: the smaller model is trained with the Lasso off; a :class:`ZeroMask` keeps the zeros
   that remain inside it (shape fibers of surviving kernels) at zero, with their momentum.

Every epoch ends with an evaluation and an atomic checkpoint in the run folder
(``runs/<recipe name>/checkpoint.pt``); ``run(..., resume=True)`` continues from it without redoing
finished epochs. Each epoch shuffles with its own generator seeded from ``(seed, phase, epoch)``, so a
resumed run sees the same batches as an uninterrupted one.

Files in the run folder::

    checkpoint.pt   the latest state (phase, epochs done, model, optimizer, RNG, history)
    baseline.pt     the dense model after the baseline      {"arch", "recipe", "phase", "model"}
    sparse.pt       the model after SSL (same architecture, learned zeros)
    compacted.pt    the compact model before fine-tuning    (torchslim.deploy.serialize format)
    compact.pt      the compact model after fine-tuning     (torchslim.deploy.serialize format)
    results.json    accuracies, per-layer structure, history
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchslim.data import batches
from torchslim.deploy.serialize import load_compact, save_compact
from torchslim.errors import CheckpointError, ConfigError
from torchslim.models import create_model
from torchslim.regularize.force import ForceRegularizer
from torchslim.regularize.lasso import GroupLasso
from torchslim.regularize.masking import ZeroMask
from torchslim.structure.groups import Group, families_of, zero_counts
from torchslim.structure.report import SparsityReport, sparsity_report
from torchslim.structure.tracing import structures
from torchslim.surgery.compact import compact
from torchslim.surgery.lowrank import lowrank
from torchslim.train.checkpoint import (
    load_checkpoint,
    load_state_dict_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from torchslim.train.distill import Teacher
from torchslim.train.recipes import PhaseSpec, Recipe, recipe_from_dict
from torchslim.train.tasks import Task, is_text, load_task, random_inputs

log = logging.getLogger(__name__)

__all__ = [
    "EpochRecord",
    "PHASES",
    "RunResult",
    "build_model",
    "evaluate",
    "example_inputs",
    "load_phase_model",
    "lr_at",
    "optimizer_step",
    "run",
    "train_epoch",
]

PHASES: tuple[str, ...] = ("baseline", "ssl", "finetune")
CHECKPOINT_FORMAT = 1


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


@dataclass
class RunResult:
    """What :func:`run` produced; also written to ``run_dir/results.json`` (without the models)."""

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
class _Run:
    """The state :func:`run` threads through its phases."""

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


# ---------------------------------------------------------------------------------------------
# building blocks


def lr_at(spec: PhaseSpec, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` (0-based) of ``total_steps`` under ``spec.lr_schedule``."""
    t = step / max(total_steps, 1)
    if spec.lr_schedule == "cosine":
        return spec.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if spec.lr_schedule == "step":
        return spec.lr * (0.1 if t >= 0.5 else 1.0) * (0.1 if t >= 0.75 else 1.0)
    return spec.lr


def _sgd(model: nn.Module, spec: PhaseSpec) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    *,
    rate: float,
    grad_clip: float | None = None,
    lasso: GroupLasso | None = None,
    mask: ZeroMask | None = None,
    force: ForceRegularizer | None = None,
) -> None:
    """One SSL update: ``loss (+ λ·Σ||w_g|| in subgradient mode) → backward → clip the global gradient
    norm to grad_clip (if set) → force.apply_() → optimizer.step() → lasso.step_(rate) → mask.apply_(optimizer)``.

    The force goes after clipping, as the authors add it to the data gradient just before the update.
    """
    objective = loss + lasso.penalty() if lasso is not None and lasso.uses_penalty else loss
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if force is not None:
        force.apply_()
    optimizer.step()
    if lasso is not None:
        lasso.step_(rate, optimizer)
    if mask is not None:
        mask.apply_(optimizer)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    lr: Callable[[int], float],
    steps: int,
    lasso: GroupLasso | None = None,
    mask: ZeroMask | None = None,
    grad_clip: float | None = None,
    force: ForceRegularizer | None = None,
    desc: str = "train",
    progress: bool | None = None,
    teacher: Teacher | None = None,
) -> tuple[float, float]:
    """One pass of momentum SGD over ``data``; returns ``(mean cross-entropy, accuracy)``.

    Each step is :func:`optimizer_step` at rate ``lr(i)`` for the epoch's step ``i``, on the
    cross-entropy or, with a ``teacher``, on :func:`torchslim.train.distill.distill_loss`.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(data, total=steps, desc=desc, leave=False, disable=_disable(progress), unit="batch")
    for i, (x, y) in enumerate(bar):
        rate = lr(i)
        for group in optimizer.param_groups:
            group["lr"] = rate
        logits = model(x)  # (B, classes)
        loss = objective = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher.model(x)  # (B, classes)
            objective = teacher.loss(logits, soft, y, hard=loss)
        optimizer_step(model, optimizer, objective, rate=rate, grad_clip=grad_clip, lasso=lasso, mask=mask,
                       force=force)
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    if seen == 0:
        raise ConfigError("the training set is empty; check data.train_limit")
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode; its training flag is restored."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for x, y in batches(images, labels, batch_size, shuffle=False):
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = max(len(labels), 1)
    return total_loss / n, correct / n


@torch.no_grad()
def alive_members(groups: Sequence[Group]) -> dict[str, int]:
    """Groups that are not all zero, per family: ``{"lstm.l0:hidden": 71, "conv1:channel": 7, ...}``."""
    return {f"{fam.label}:{fam.kind}": int((fam.row_sq()[members] > 0).sum())
            for fam, members in families_of(list(groups)).items()}


def zero_fractions(groups: Sequence[Group]) -> dict[str, float]:
    """Fraction of all-zero groups per kind, e.g. ``{"channel": 0.4, "shape": 0.7}``."""
    return {kind: zero / total for kind, (zero, total) in zero_counts(groups).items()}


def _nonzero(model: nn.Module) -> int:
    with torch.no_grad():
        return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: ``None`` shows bars only on a terminal."""
    return None if progress is None else not progress


def example_inputs(recipe: Recipe, batch: int = 2) -> Tensor:
    """Seeded random inputs of the recipe's data, for tracing and profiling: images ``(batch, C, H, W)``,
    or token ids ``(data.bptt, batch)`` for a language model."""
    return random_inputs(recipe, batch)


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model, initialized from ``recipe.seed`` (torch's global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return create_model(recipe.model.name, **recipe.model.kwargs)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _phase_file(run: _Run, phase: str) -> Path:
    return run.run_dir / {"baseline": "baseline.pt", "ssl": "sparse.pt"}[phase]


def _save_phase_model(run: _Run, phase: str, model: nn.Module) -> None:
    """The model at the end of ``phase`` (baseline or ssl), loadable by :func:`load_phase_model`."""
    save_checkpoint(_phase_file(run, phase), {
        "engine_format": CHECKPOINT_FORMAT, "kind": "phase_model", "phase": phase,
        "recipe": run.recipe.to_dict(), "arch": getattr(model, "arch", None), "model": model.state_dict(),
    })


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


def _save_checkpoint(run: _Run, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    save_checkpoint(run.run_dir / "checkpoint.pt", {
        "engine_format": CHECKPOINT_FORMAT, "kind": "engine", "phase": phase, "compacted": phase == "finetune",
        "recipe": run.recipe.to_dict(), "arch": getattr(model, "arch", None),
        "done": dict(run.done), "history": list(run.history), "accuracy": dict(run.accuracy),
        "valid_accuracy": dict(run.valid_accuracy), "loss": dict(run.loss), "valid_loss": dict(run.valid_loss),
        "lowrank": list(run.lowrank),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
    })


def _restore(run: _Run, model: nn.Module) -> tuple[nn.Module, str]:
    """Load ``checkpoint.pt`` into ``run``; returns the model to continue with and its phase."""
    path = run.run_dir / "checkpoint.pt"
    state = load_checkpoint(path)
    missing = [k for k in ("phase", "done", "model", "history", "recipe") if k not in state]
    if missing or state.get("kind") != "engine":
        raise CheckpointError(
            f"{path} is not an engine checkpoint (missing {missing}); delete it or run without --resume")
    if state["recipe"].get("model") != run.recipe.to_dict()["model"]:
        raise CheckpointError(
            f"{path} was written for model {state['recipe'].get('model')}, not {run.recipe.model}; "
            f"use another --out folder or run without --resume"
        )
    changed = _changed_keys(_with_defaults(state["recipe"]), run.recipe.to_dict())
    if changed:
        log.warning("resuming with a recipe that differs from the checkpoint's in %s; finished epochs are kept",
                    ", ".join(changed))
    phase = state["phase"]
    if phase not in PHASES:
        raise CheckpointError(f"{path} has an unknown phase {phase!r}; delete it or run without --resume")
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
    run.optimizer_state = state.get("optimizer")
    if state.get("rng") is not None:
        set_rng_state(state["rng"])
    log.info("resuming %s from %s: phase %s, epochs done %s", run.recipe.name, path, phase, run.done)
    return model, phase


# ---------------------------------------------------------------------------------------------
# branching: a run that starts from the steps another run trained the same way

# The recipe sections each step depends on, in run order; what all steps share comes first.
_COMMON = ("seed", "model", "data", "batch_size", "eval_batch_size")
_STEPS = (("baseline", ("baseline",)), ("ssl", ("ssl",)), ("compact", ("compact", "lowrank")),
          ("finetune", ("finetune",)))
# the files that hold a step's outcome, copied into the branch
_STEP_FILES = {"baseline": "baseline.pt", "ssl": "sparse.pt", "compact": "compacted.pt"}


def shared_steps(source: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """The leading steps (``baseline``, ``ssl``, ``compact``, ``finetune``) two recipe dicts train alike.

    Raises:
        ConfigError: they differ in model, data, seed or batch sizes (no step is shared).
    """
    source, target = _with_defaults(source), _with_defaults(target)
    differ = [k for k in _COMMON if source.get(k) != target.get(k)]
    if differ:
        raise ConfigError(f"{target.get('name')} and {source.get('name')} differ in {', '.join(differ)}, "
                          f"so they share no training; run {target.get('name')} without a branch")
    shared = []
    for step, keys in _STEPS:
        if any(source.get(k) != target.get(k) for k in keys):
            break
        shared.append(step)
    return shared


def _branch(run: _Run, source_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """What ``source_dir``'s run trained as ``run.recipe`` would: a checkpoint at the end of the shared steps,
    from which :func:`_restore` continues, and the names of their files to copy (:func:`_seed_branch`).
    Recipes alike throughout continue from wherever the source is.

    The branch's RNG is not the source's at that point: dropout masks differ from an unbroken run's.

    Raises:
        CheckpointError: ``source_dir`` holds no engine checkpoint, or has not finished the shared steps.
        ConfigError: the recipes share no step, or ``source_dir`` is the run's own folder.
    """
    if source_dir.resolve() == run.run_dir.resolve():
        raise ConfigError(f"cannot branch {run.run_dir} from itself; use --resume to continue it")
    state = load_checkpoint(source_dir / "checkpoint.pt")
    if state.get("kind") != "engine":
        raise CheckpointError(f"{source_dir / 'checkpoint.pt'} is not an engine checkpoint; branch from a run folder")
    shared = shared_steps(state["recipe"], run.recipe.to_dict())
    if not shared:
        raise ConfigError(f"{run.recipe.name} and {state['recipe']['name']} differ from their baseline on; "
                          f"there is nothing to branch from, run without it")
    last = shared[-1]
    if last == "finetune":
        files = [name for name in _RUN_FILES[1:-1] if (source_dir / name).is_file()]
    else:
        files = [_STEP_FILES[step] for step in shared]
        missing = [name for name in files if not (source_dir / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{source_dir} has not finished its {last} step ({', '.join(missing)} missing), which "
                f"{run.recipe.name} shares: train it that far first "
                f"(torchslim train {state['recipe']['name']} --resume --stop-after {last})")
        _rewind(state, last, source_dir)
    log.info("branching %s from %s, which trained its %s alike", run.recipe.name, source_dir, ", ".join(shared))
    return state | {"recipe": run.recipe.to_dict()}, files


def _seed_branch(run: _Run, source_dir: Path, state: dict[str, Any], files: list[str]) -> None:
    """Write :func:`_branch`'s checkpoint and copy its files into the (cleared) run folder."""
    for name in files:
        shutil.copy2(source_dir / name, run.run_dir / name)
    save_checkpoint(run.run_dir / "checkpoint.pt", state)


def _rewind(state: dict[str, Any], step: str, source_dir: Path) -> None:
    """An engine checkpoint ``state`` taken at or after the end of ``step`` (baseline, ssl or compact), set
    back to the end of ``step``: later epochs and metrics dropped, the model from that step's file."""
    phases = ("baseline",) if step == "baseline" else ("baseline", "ssl")
    keys = (*phases, "compact") if step == "compact" else phases
    state["history"] = [h for h in state["history"] if h["phase"] in phases]
    for metric in ("accuracy", "valid_accuracy", "loss", "valid_loss"):
        state[metric] = {k: v for k, v in state.get(metric, {}).items() if k in keys}
    state["done"] = {p: (n if p in phases else 0) for p, n in state["done"].items()}
    state["lowrank"] = ([{k: v for k, v in row.items() if k != "rank_final"} for row in state.get("lowrank", [])]
                        if step == "compact" else [])
    state["phase"], state["compacted"] = ("finetune", True) if step == "compact" else (step, False)
    path = source_dir / _STEP_FILES[step]
    state["model"] = load_compact(path).state_dict() if step == "compact" else load_checkpoint(path)["model"]
    state["optimizer"], state["rng"] = None, None


def _with_defaults(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """A saved recipe with the keys added since it was written, at their defaults (``raw`` if it no longer loads)."""
    try:
        return recipe_from_dict(raw).to_dict()
    except ConfigError:
        return raw


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and key != "strength":
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------------------------------------
# phases


def _lasso(run: _Run, groups: Sequence[Group]) -> GroupLasso:
    """SSL's regularizer over ``groups`` (it checks that every multiplier selects a layer)."""
    spec, steps = run.recipe.ssl, run.task.steps_per_epoch()
    lasso = GroupLasso(
        groups, spec.strength, multipliers=spec.multipliers, weight_by_size=spec.weight_by_size,
        mode=spec.mode, threshold=spec.threshold, reset_momentum=spec.reset_momentum, keep=spec.keep,
        keep_ramp=round(spec.keep_ramp * spec.epochs * steps), keep_cut=spec.keep_cut,
    )
    lasso.steps = run.done["ssl"] * steps  # resumed: where the budget's ramp stands
    ramp = f" reached over {spec.keep_ramp:.0%} of the phase" if spec.keep_ramp else ""
    ramp += ", cut to by magnitude every step" if spec.keep_cut == "step" else ""
    log.info("SSL: %d groups (%s), λ=%s, mode=%s%s", len(groups), ", ".join(spec.kinds), spec.strength, spec.mode,
             f", keep {spec.keep}{ramp}" if spec.keep is not None else "")
    return lasso


def _force(model: nn.Module, spec: PhaseSpec) -> ForceRegularizer | None:
    """The phase's force regularizer (Wen et al., ICCV 2017), or None when ``force.strength`` is 0."""
    f = spec.force
    if f.strength == 0:
        return None
    return ForceRegularizer(model, f.strength, f.kind, multipliers=f.multipliers, exclude=f.exclude,
                            adaptive=f.adaptive)


def _mask_groups(run: _Run, model: nn.Module) -> list[Group]:
    """Groups of the compact model whose zeros fine-tuning must keep: SSL's kinds and shape fibers."""
    kinds = tuple(dict.fromkeys([*run.recipe.ssl.kinds, "shape"]))
    return structures(model, run.task.example, kinds=kinds)


def run_phase(run: _Run, phase: str, model: nn.Module, *, resumed_phase: str | None = None) -> None:
    """Train ``model`` for the epochs of ``phase`` not done yet, checkpointing after each."""
    spec: PhaseSpec = getattr(run.recipe, phase)
    if run.done[phase] >= spec.epochs:
        return
    if spec.dropout is not None:
        _set_dropout(model, spec.dropout)
    optimizer = _sgd(model, spec)
    if resumed_phase == phase and run.optimizer_state is not None:
        optimizer.load_state_dict(run.optimizer_state)
    lasso, mask, force = None, None, _force(model, spec)
    if phase == "finetune":
        groups = _mask_groups(run, model)
        mask = ZeroMask(groups).attach()
        log.info("fine-tuning with %d zero groups frozen", mask.num_frozen)
        if run.recipe.lowrank.lasso:
            groups = structures(model, run.task.example, kinds=("rank",))
            lasso = GroupLasso(groups, {"rank": run.recipe.lowrank.lasso}, weight_by_size=True, mode="prox")
            log.info("fine-tuning with group Lasso on %d rank groups, λ=%s", len(groups), run.recipe.lowrank.lasso)
    else:
        groups = structures(model, run.task.example, kinds=tuple(run.recipe.ssl.kinds))
        lasso = _lasso(run, groups) if phase == "ssl" else None
    teacher = _teacher(run, phase)
    try:
        for epoch in range(run.done[phase], spec.epochs):
            on = spec.force.epochs is None or epoch < spec.force.epochs
            _one_epoch(run, phase, model, optimizer, epoch, lasso=lasso, mask=mask, force=force if on else None,
                       groups=groups, teacher=teacher)
    finally:
        if mask is not None:
            mask.detach()


def _teacher(run: _Run, phase: str) -> Teacher | None:
    """The frozen model that ``phase.distill`` learns from: its ``teacher`` file, else the run's baseline.pt."""
    spec = getattr(run.recipe, phase).distill
    if not spec.alpha:
        return None
    path = Path(spec.teacher) if spec.teacher is not None else _phase_file(run, "baseline")
    if not path.is_file():
        raise CheckpointError(f"{phase}.distill learns from {path}, which is missing; set {phase}.distill.teacher "
                              f"to a trained model file, or {phase}.distill.alpha: 0 to train without a teacher")
    log.info("%s learns from the teacher %s: α=%s, T=%s", phase, path, spec.alpha, spec.temperature)
    return Teacher(_load_model_file(path, run.recipe), spec.alpha, spec.temperature)


def _load_model_file(path: Path, recipe: Recipe) -> nn.Module:
    """A model from any file the library writes (compact.pt, an engine checkpoint or phase model), or from a
    plain state dict of ``recipe``'s model; an engine file builds its own model, which may differ from ``recipe``'s."""
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


def _set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability: ``nn.Dropout*`` layers and stacked ``nn.LSTM``/``nn.GRU`` between layers."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
        elif isinstance(module, nn.RNNBase) and module.num_layers > 1:
            module.dropout = p
    log.info("dropout p=%s", p)


def _one_epoch(
    run: _Run, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, *,
    lasso: GroupLasso | None, mask: ZeroMask | None, force: ForceRegularizer | None, groups: Sequence[Group],
    teacher: Teacher | None,
) -> None:
    spec: PhaseSpec = getattr(run.recipe, phase)
    steps = run.task.steps_per_epoch()
    start = time.perf_counter()
    train_loss, train_acc = run.task.train_epoch(
        model, optimizer, lr=lambda i: lr_at(spec, epoch * steps + i, spec.epochs * steps),
        seed=run.recipe.seed * 1_000_003 + PHASES.index(phase) * 10_007 + epoch,
        lasso=lasso, mask=mask, grad_clip=spec.grad_clip, force=force,
        desc=f"{phase} {epoch + 1}/{spec.epochs}", progress=run.progress, teacher=teacher,
    )
    if lasso is not None and epoch + 1 == spec.epochs:
        cut = lasso.meet_budget_()
        if cut:
            log.info("size budget (keep) met by zeroing the smallest groups λ left: %s", cut)
    test_loss, test_acc = _record_test(run, phase, model)
    valid_loss, valid_acc = _record_valid(run, phase, model)
    tracked = lasso is not None or phase != "finetune"  # report SSL's groups, or the rank groups under the rank Lasso
    record = EpochRecord(
        phase=phase, epoch=epoch + 1, lr=lr_at(spec, epoch * steps, spec.epochs * steps),
        train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc,
        density=_nonzero(model) / run.dense_numel,
        zero_fraction=zero_fractions(groups) if tracked else {},
        alive=alive_members(groups) if tracked else {},
        seconds=time.perf_counter() - start, valid_acc=valid_acc, valid_loss=valid_loss,
    )
    run.history.append(dataclasses.asdict(record))
    run.done[phase] = epoch + 1
    run.trained[phase] += 1
    zeros = ", ".join(f"{k} {v:.0%}" for k, v in record.zero_fraction.items())
    valid = f"valid acc {100 * valid_acc:.2f}%, " if valid_acc is not None else ""
    log.info("%s %d/%d: train loss %.4f, acc %.2f%% | %stest acc %.2f%% | non-zero weights %.1f%%%s | %.0f s",
             phase, epoch + 1, spec.epochs, train_loss, 100 * train_acc, valid, 100 * test_acc, 100 * record.density,
             f" | all-zero groups: {zeros}" if zeros else "", record.seconds)
    _save_checkpoint(run, phase, model, optimizer)


def _compact_phase(run: _Run, model: nn.Module) -> nn.Module:
    """Cut the zeros out; the result is checked against ``model`` and saved as ``compacted.pt``."""
    small = _compact(run, model)
    spec = run.recipe.lowrank
    if spec.enabled:
        result = lowrank(small, run.task.example, energy=spec.energy, ranks=spec.ranks, method=spec.method,
                         skip=spec.skip)
        small = result.model
        run.lowrank = [dataclasses.asdict(row) for row in result.layers]
        log.info("low rank:\n%s", result.format())
    _record_test(run, "compact", small)
    _record_valid(run, "compact", small)
    save_compact(small, run.run_dir / "compacted.pt", arch=getattr(model, "arch", None))
    log.info("compacted: %d → %d parameters, test acc %.2f%%",
             sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters()),
             100 * run.accuracy["compact"])
    small.train()
    _save_checkpoint(run, "finetune", small, None)
    return small


def _compact(run: _Run, model: nn.Module) -> nn.Module:
    """``compact()`` with the recipe's ``compact`` section."""
    return compact(model, run.task.example, shapes=run.recipe.compact.shapes,
                   channel_multiple=run.recipe.compact.channel_multiple)


def _cut_ranks(run: _Run, model: nn.Module) -> nn.Module:
    """After fine-tuning with the rank Lasso: cut the zero rank groups; each low-rank row gains ``rank_final``."""
    small = _compact(run, model)
    for row in run.lowrank:
        if row["decomposed"]:
            row["rank_final"] = small.get_submodule(row["name"]).rank
    log.info("rank Lasso: ranks %s", ", ".join(f"{r['name']} {r['rank']} → {r['rank_final']}"
                                               for r in run.lowrank if r["decomposed"]))
    return small


# ---------------------------------------------------------------------------------------------
# the whole run


def _record_test(run: _Run, key: str, model: nn.Module) -> tuple[float, float]:
    """``(loss, accuracy)`` on the test split, kept under ``key``."""
    run.loss[key], run.accuracy[key] = run.task.evaluate(model, "test")
    return run.loss[key], run.accuracy[key]


def _record_valid(run: _Run, key: str, model: nn.Module) -> tuple[float | None, float | None]:
    """``(loss, accuracy)`` on the validation split (None without one), kept under ``key``."""
    if not run.task.has_valid:
        return None, None
    run.valid_loss[key], run.valid_accuracy[key] = run.task.evaluate(model, "valid")
    return run.valid_loss[key], run.valid_accuracy[key]


def _finish_phase(run: _Run, phase: str, model: nn.Module) -> None:
    """Record the phase's accuracy (evaluating if it trained no epoch) and save its model."""
    if phase not in run.accuracy:
        _record_test(run, phase, model)
        _record_valid(run, phase, model)
    if phase in ("baseline", "ssl"):
        _save_phase_model(run, phase, model)
        _save_checkpoint(run, phase, model, None)


def run(
    recipe: Recipe,
    *,
    data_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: str | None = None,
    progress: bool | None = None,
    branch_from: str | Path | None = None,
) -> RunResult:
    """Train ``recipe`` through baseline → SSL → compact → fine-tune.

    Args:
        recipe: from :func:`torchslim.train.recipes.load_recipe`.
        data_dir: where the dataset lies (default: ``$TORCHSLIM_DATA``, then the system folder).
        run_dir: the run folder (default ``runs/<recipe.name>``).
        resume: continue from ``run_dir/checkpoint.pt`` if it exists; finished epochs are not redone.
        stop_after: ``"baseline"``, ``"ssl"`` or ``"compact"`` to stop after that step.
        progress: progress bars on stderr: ``None`` on a terminal only, ``True`` always, ``False`` never.
        branch_from: another run's folder: start after the steps it trained as ``recipe`` would (say, the
            same dense baseline, or the same SSL before another fine-tuning), copying their files. Ignored
            when ``resume`` finds a checkpoint in ``run_dir``.
    Raises:
        DatasetNotFound: the data is missing (the message says how to get it).
        CheckpointError: ``resume`` with a corrupt checkpoint, or one of another model; ``branch_from``
            without a checkpoint, or short of the shared steps.
        ConfigError: a recipe value the model does not fit (e.g. a multiplier for a missing layer);
            ``branch_from`` a run that shares no step.
    """
    if stop_after not in (None, "baseline", "ssl", "compact"):
        raise ConfigError(f"stop_after must be 'baseline', 'ssl' or 'compact', got {stop_after!r}")
    started = time.perf_counter()
    task = load_task(recipe, data_dir)
    model = build_model(recipe)
    run_ = _Run(
        recipe=recipe, run_dir=Path(run_dir) if run_dir is not None else Path("runs") / recipe.name,
        task=task, dense_numel=sum(p.numel() for p in model.parameters()),
        progress=progress,
    )
    run_.run_dir.mkdir(parents=True, exist_ok=True)
    phase = "baseline"
    if resume and (run_.run_dir / "checkpoint.pt").exists():
        model, phase = _restore(run_, model)
    else:
        if resume and branch_from is None:
            log.info("no checkpoint in %s: starting %s from scratch", run_.run_dir, recipe.name)
        branch = _branch(run_, Path(branch_from)) if branch_from is not None else None  # checked before clearing
        _clear_run_dir(run_.run_dir)
        if branch is not None:
            _seed_branch(run_, Path(branch_from), *branch)
            model, phase = _restore(run_, model)
    model, finished = _run_phases(run_, model, phase, stop_after)
    return _results(run_, model, finished, time.perf_counter() - started)


_RUN_FILES = ("checkpoint.pt", "baseline.pt", "sparse.pt", "compacted.pt", "compact.pt", "results.json")


def _clear_run_dir(run_dir: Path) -> None:
    """Remove the files an earlier run left, so that a fresh run never mixes with them."""
    stale = [run_dir / name for name in _RUN_FILES if (run_dir / name).exists()]
    if stale:
        log.info("starting from scratch in %s: replacing the earlier run's files (--resume continues it)", run_dir)
    for path in stale:
        path.unlink()


def _run_phases(run: _Run, model: nn.Module, resumed: str, stop_after: str | None) -> tuple[nn.Module, bool]:
    """Run the phases from ``resumed`` on; returns the last model and whether all phases ran."""
    start = PHASES.index(resumed)
    for phase in PHASES[start:]:
        if phase == "finetune" and resumed != "finetune":
            model = _compact_phase(run, model)
            if stop_after == "compact":
                return model, False
        run_phase(run, phase, model, resumed_phase=resumed)
        if phase == "finetune" and run.recipe.lowrank.lasso:
            model = _cut_ranks(run, model)
        _finish_phase(run, phase, model)
        if stop_after == phase:
            return model, False
    return model, True


def _results(run: _Run, model: nn.Module, finished: bool, seconds: float) -> RunResult:
    """Collect the models, save ``compact.pt`` and ``results.json``."""
    dense = _load_if_exists(run.run_dir / "baseline.pt", run.recipe)
    sparse = _load_if_exists(run.run_dir / "sparse.pt", run.recipe)
    compact_model = model.eval() if "compact" in run.accuracy else None
    if finished and compact_model is not None:
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
    write_results(result)
    return result


def _load_if_exists(path: Path, recipe: Recipe) -> nn.Module | None:
    return load_phase_model(path, recipe)[0].eval() if path.exists() else None


def _param_count(model: nn.Module | None) -> int | None:
    return None if model is None else sum(p.numel() for p in model.parameters())


def write_results(result: RunResult, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``results.json`` (recipe, accuracies, history, parameter counts, ``extra``); returns its path."""
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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path
