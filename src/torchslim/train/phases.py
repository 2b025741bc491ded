"""The phases of a run: baseline → SSL → compact → fine-tune, each from where the run folder left it.

A training phase builds its :class:`torchslim.train.loop.Regularizers` once (the SSL group Lasso, the
fine-tuning :class:`ZeroMask` and rank Lasso, the force regularizer, the distillation teacher, gradient
clipping), then trains the epochs not done yet; each epoch ends with an evaluation, a history record and
a checkpoint (:func:`torchslim.train.rundir.save_run_checkpoint`). The compact step sits between SSL and
fine-tuning and takes no epochs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from torchslim.deploy.serialize import save_compact
from torchslim.errors import CheckpointError, DivergenceError
from torchslim.regularize.budget import SizeBudget
from torchslim.regularize.force import ForceRegularizer
from torchslim.regularize.lasso import GroupLasso
from torchslim.regularize.masking import ZeroMask
from torchslim.structure.groups import Group, families_of, zero_counts
from torchslim.structure.tracing import structures
from torchslim.surgery.compact import compact
from torchslim.surgery.lowrank import lowrank
from torchslim.surgery.verify import nonfinite_params
from torchslim.train.checkpoint import load_optimizer_state_checked
from torchslim.train.distill import Teacher
from torchslim.train.loop import Checkpointing, EpochProgress, Regularizers, lr_at, sgd
from torchslim.train.recipes import PhaseSpec
from torchslim.train.rundir import (
    PHASES,
    EpochRecord,
    Run,
    load_model_file,
    phase_file,
    save_phase_model,
    save_run_checkpoint,
)
from torchslim.train.world import Wrapped

log = logging.getLogger(__name__)

__all__ = ["alive_members", "run_phase", "run_phases", "shrinkage", "zero_fractions"]


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


# ---------------------------------------------------------------------------------------------
# the phases in order


def run_phases(run: Run, model: nn.Module, resumed: str, stop_after: str | None) -> tuple[nn.Module, bool]:
    """Run the phases from ``resumed`` on; returns the last model and whether all phases ran."""
    start = PHASES.index(resumed)
    for phase in PHASES[start:]:
        if phase == "finetune" and resumed != "finetune":
            model = compact_phase(run, model)
            if stop_after == "compact":
                return model, False
        run_phase(run, phase, model, resumed_phase=resumed)
        if phase == "finetune" and run.recipe.lowrank.lasso:
            model = _cut_ranks(run, model)
        _finish_phase(run, phase, model)
        if stop_after == phase:
            return model, False
    return model, True


def run_phase(run: Run, phase: str, model: nn.Module, *, resumed_phase: str | None = None) -> None:
    """Train ``model`` for the epochs of ``phase`` not done yet, checkpointing after each."""
    spec: PhaseSpec = getattr(run.recipe, phase)
    if run.done[phase] >= spec.epochs:
        return
    if spec.dropout is not None:
        _set_dropout(model, spec.dropout)
    optimizer = sgd(model, spec)
    if resumed_phase == phase and run.optimizer_state is not None:
        load_optimizer_state_checked(optimizer, run.optimizer_state, f"{run.run_dir / 'checkpoint.pt'}: optimizer")
    regularizers, groups = _regularizers(run, phase, model, spec)
    without_force = dataclasses.replace(regularizers, force=None)
    wrapped = run.world.wrap(model, run.recipe.distributed, seed=run.recipe.seed)  # DDP under torchrun
    if resumed_phase == phase:
        wrapped.load_state_dict(run.hook_state)
    try:
        for epoch in range(run.done[phase], spec.epochs):
            on = spec.force.epochs is None or epoch < spec.force.epochs
            _one_epoch(run, phase, model, optimizer, epoch, regularizers if on else without_force, groups, wrapped)
    finally:
        wrapped.release()
        if regularizers.mask is not None:
            regularizers.mask.detach()
    if phase == "ssl":
        _warn_if_nothing_zeroed(run, groups)


def _warn_if_nothing_zeroed(run: Run, groups: Sequence[Group]) -> None:
    """Say so when SSL ended with no all-zero group: compaction will then remove nothing."""
    counts = zero_counts(groups)
    if any(zero for zero, _ in counts.values()):
        return
    spec = run.recipe.ssl
    strengths = spec.strength if isinstance(spec.strength, dict) else {"": spec.strength}
    larger = " ".join(f"--set ssl.strength{'.' + k if k else ''}={10 * v:g}" for k, v in strengths.items())
    log.warning("SSL zeroed none of its %d groups (%s), so compaction will remove nothing. Raise ssl.strength "
                "(now %s) or ssl.epochs (now %d), e.g. %s --set ssl.epochs=%d",
                len(groups), ", ".join(counts), spec.strength, spec.epochs, larger, 2 * spec.epochs)


def _one_epoch(run: Run, phase: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
               regularizers: Regularizers, groups: Sequence[Group], wrapped: Wrapped) -> None:
    """Train epoch ``epoch`` (0-based) of ``phase`` through ``wrapped`` (``model``, or its DDP wrapper), from where a
    checkpoint inside it stood; check that the processes' replicas agree, evaluate, record it in the history and
    checkpoint."""
    spec: PhaseSpec = getattr(run.recipe, phase)
    steps = run.task.steps_per_epoch()
    start = time.perf_counter()
    rates = _Rates(spec, epoch, steps)
    checkpointing = _checkpointing(run, phase, epoch, model, optimizer, wrapped)
    if regularizers.lasso is not None and checkpointing.resume.step:  # where the size budget's ramp stands
        regularizers.lasso.steps = epoch * steps + checkpointing.resume.step
    try:
        train_loss, train_acc = run.task.train_epoch(
            wrapped.module, optimizer, lr=rates,
            seed=run.recipe.seed * 1_000_003 + PHASES.index(phase) * 10_007 + epoch,
            regularizers=regularizers, desc=_desc(run, phase, epoch), progress=run.progress, world=run.world,
            checkpointing=checkpointing,
        )
    except DivergenceError as exc:
        what = str(exc).partition(": training diverged")[0]  # "the training loss is nan", from loop._check_finite
        raise _diverged(run, phase, epoch, f"step {rates.last + 1}/{steps}", what) from exc
    bad = nonfinite_params(model)
    if bad:  # a last step that left the weights non-finite: no later loss to show it
        raise _diverged(run, phase, epoch, f"step {steps}/{steps}", f"the weights {', '.join(bad[:5])} are not finite")
    trained = time.perf_counter() - start
    run.world.share_buffers(model)
    run.world.check_replicas(model, f"{phase} epoch {epoch + 1}")
    lasso = regularizers.lasso
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
        seconds=time.perf_counter() - start, valid_acc=valid_acc, valid_loss=valid_loss, train_seconds=trained,
    )
    run.history.append(dataclasses.asdict(record))
    run.done[phase] = epoch + 1
    run.trained[phase] += 1
    _log_epoch(record, spec.epochs)
    save_run_checkpoint(run, phase, model, optimizer, hook=wrapped.state_dict())


def _checkpointing(run: Run, phase: str, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                   wrapped: Wrapped) -> Checkpointing:
    """Checkpoints inside epoch ``epoch`` of ``phase`` every ``recipe.checkpoint_every_steps``, and where the
    run's checkpoint left this epoch (taken once: later epochs start at step 0)."""
    partial, run.partial = run.partial, None
    resume = EpochProgress(**partial["progress"]) if partial and (partial["phase"], partial["epoch"]) == \
        (phase, epoch) else EpochProgress()

    def save(progress: EpochProgress) -> None:
        save_run_checkpoint(run, phase, model, optimizer, hook=wrapped.state_dict(),
                            partial={"phase": phase, "epoch": epoch, "progress": dataclasses.asdict(progress)})
        log.debug("checkpointed %s epoch %d at step %d", phase, epoch + 1, progress.step)

    return Checkpointing(run.recipe.checkpoint_every_steps, save, resume)


@dataclasses.dataclass
class _Rates:
    """The learning rate of each step of one epoch, for the loops' ``lr(i)``; ``last``: the step asked for last."""

    spec: PhaseSpec
    epoch: int  # 0-based
    steps: int  # per epoch
    last: int = 0

    def __call__(self, i: int) -> float:
        self.last = i
        return lr_at(self.spec, self.epoch * self.steps + i, self.spec.epochs * self.steps)


def _diverged(run: Run, phase: str, epoch: int, step: str, what: str) -> DivergenceError:
    """The error that stops ``phase``: where it diverged, what is still safe on disk, and the recipe keys to change."""
    spec: PhaseSpec = getattr(run.recipe, phase)
    checkpoint = run.run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        kept = "Nothing was checkpointed yet"
    else:
        done = f"after {phase} epoch {run.done[phase]}" if run.done[phase] else f"from before {phase}"
        kept = f"{checkpoint} still holds the last finite state ({done})"
    clip = f"{spec.grad_clip / 10:g}" if spec.grad_clip is not None else "1.0"
    again = (f"--resume --allow-changed {phase}.lr (or {phase}.grad_clip: {phase} epochs 1-{run.done[phase]} ran "
             "with the old value)") if run.done[phase] else "--resume"
    return DivergenceError(
        f"{phase} diverged in epoch {epoch + 1}/{spec.epochs}, {step}: {what}. {kept}. Lower the learning rate "
        f"({phase}.lr, now {spec.lr:g}: e.g. --set {phase}.lr={spec.lr / 10:g}) or clip the gradient norm "
        f"({phase}.grad_clip, now {spec.grad_clip}: e.g. --set {phase}.grad_clip={clip}), then continue with {again}")


def _desc(run: Run, phase: str, epoch: int) -> str:
    """The progress bar's label: ``ssl 2/3``, with the number of processes under torchrun."""
    world = f" ×{run.world.size} processes" if run.world.distributed else ""
    return f"{phase} {epoch + 1}/{getattr(run.recipe, phase).epochs}{world}"


def _log_epoch(record: EpochRecord, epochs: int) -> None:
    zeros = ", ".join(f"{k} {v:.0%}" for k, v in record.zero_fraction.items())
    valid = f"valid acc {100 * record.valid_acc:.2f}%, " if record.valid_acc is not None else ""
    log.info("%s %d/%d: train loss %.4f, acc %.2f%% | %stest acc %.2f%% | non-zero weights %.1f%%%s | %.0f s",
             record.phase, record.epoch, epochs, record.train_loss, 100 * record.train_acc, valid,
             100 * record.test_acc, 100 * record.density, f" | all-zero groups: {zeros}" if zeros else "",
             record.seconds)


def _set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability: ``nn.Dropout*`` layers and stacked ``nn.LSTM``/``nn.GRU`` between layers."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
        elif isinstance(module, nn.RNNBase) and module.num_layers > 1:
            module.dropout = p
    log.info("dropout p=%s", p)


# ---------------------------------------------------------------------------------------------
# what acts on a phase's steps


def _regularizers(run: Run, phase: str, model: nn.Module, spec: PhaseSpec) -> tuple[Regularizers, list[Group]]:
    """The phase's regularizers, and the groups its history reports (SSL's kinds; fine-tuning: the masked
    groups, or the rank groups under the rank Lasso). Fine-tuning's mask comes attached."""
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
        lasso = _ssl_lasso(run, groups) if phase == "ssl" else None
    teacher = _teacher(run, phase)
    return Regularizers(lasso=lasso, mask=mask, force=force, teacher=teacher, grad_clip=spec.grad_clip), groups


def _ssl_lasso(run: Run, groups: Sequence[Group]) -> GroupLasso:
    """SSL's regularizer over ``groups`` (it checks that every multiplier selects a layer)."""
    spec, steps = run.recipe.ssl, run.task.steps_per_epoch()
    budget = SizeBudget(spec.keep, round(spec.keep_ramp * spec.epochs * steps), spec.keep_cut) if spec.keep else None
    lasso = GroupLasso(
        groups, spec.strength, multipliers=spec.multipliers, weight_by_size=spec.weight_by_size,
        mode=spec.mode, threshold=spec.threshold, reset_momentum=spec.reset_momentum, budget=budget,
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


def _mask_groups(run: Run, model: nn.Module) -> list[Group]:
    """Groups of the compact model whose zeros fine-tuning must keep: SSL's kinds and shape fibers."""
    kinds = tuple(dict.fromkeys([*run.recipe.ssl.kinds, "shape"]))
    return structures(model, run.task.example, kinds=kinds)


def _teacher(run: Run, phase: str) -> Teacher | None:
    """The frozen model that ``phase.distill`` learns from: its ``teacher`` file, else the run's baseline.pt.

    Raises:
        CheckpointError: that file is missing or is no model file the library reads.
    """
    spec = getattr(run.recipe, phase).distill
    if not spec.alpha:
        return None
    path = Path(spec.teacher) if spec.teacher is not None else phase_file(run, "baseline")
    if not path.is_file():
        raise CheckpointError(f"{phase}.distill learns from {path}, which is missing; set {phase}.distill.teacher "
                              f"to a trained model file, or {phase}.distill.alpha: 0 to train without a teacher")
    log.info("%s learns from the teacher %s: α=%s, T=%s", phase, path, spec.alpha, spec.temperature)
    return Teacher(load_model_file(path, run.recipe), spec.alpha, spec.temperature)


# ---------------------------------------------------------------------------------------------
# compaction between SSL and fine-tuning


def shrinkage(dense: nn.Module, small: nn.Module) -> str:
    """``"61,706 → 20,146 parameters (3.06x fewer)"``, or "nothing to remove" when no group was all zero."""
    before, after = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in small.parameters())
    if after >= before:
        return f"nothing to remove: no group is all zero, the model keeps its {before:,} parameters"
    return f"{before:,} → {after:,} parameters ({before / after:.2f}x fewer)"


def compact_phase(run: Run, model: nn.Module) -> nn.Module:
    """Cut the zeros out; the result is checked against ``model`` and saved as ``compacted.pt``."""
    small = _compact(run, model)
    spec = run.recipe.lowrank
    if spec.enabled:
        result = lowrank(small, run.task.example, energy=spec.energy, ranks=spec.ranks, method=spec.method,
                         exclude=spec.skip)
        small = result.model
        run.lowrank = [dataclasses.asdict(row) for row in result.layers]
        log.info("low rank:\n%s", result.format())
    _record_test(run, "compact", small)
    _record_valid(run, "compact", small)
    if run.world.is_main:
        save_compact(small, run.run_dir / "compacted.pt", arch=getattr(model, "arch", None))
    log.info("compact: %s, test acc %.2f%%", shrinkage(model, small), 100 * run.accuracy["compact"])
    small.train()
    save_run_checkpoint(run, "finetune", small, None)
    return small


def _compact(run: Run, model: nn.Module) -> nn.Module:
    """``compact()`` with the recipe's ``compact`` section."""
    return compact(model, run.task.example, shapes=run.recipe.compact.shapes,
                   channel_multiple=run.recipe.compact.channel_multiple)


def _cut_ranks(run: Run, model: nn.Module) -> nn.Module:
    """After fine-tuning with the rank Lasso: cut the zero rank groups; each low-rank row gains ``rank_final``."""
    small = _compact(run, model)
    for row in run.lowrank:
        if row["decomposed"]:
            row["rank_final"] = small.get_submodule(row["name"]).rank
    log.info("rank Lasso: ranks %s", ", ".join(f"{r['name']} {r['rank']} → {r['rank_final']}"
                                               for r in run.lowrank if r["decomposed"]))
    return small


# ---------------------------------------------------------------------------------------------
# metrics


def _record_test(run: Run, key: str, model: nn.Module) -> tuple[float, float]:
    """``(loss, accuracy)`` on the test split, kept under ``key``."""
    run.loss[key], run.accuracy[key] = run.task.evaluate(model, "test")
    return run.loss[key], run.accuracy[key]


def _record_valid(run: Run, key: str, model: nn.Module) -> tuple[float | None, float | None]:
    """``(loss, accuracy)`` on the validation split (None without one), kept under ``key``."""
    if not run.task.has_valid:
        return None, None
    run.valid_loss[key], run.valid_accuracy[key] = run.task.evaluate(model, "valid")
    return run.valid_loss[key], run.valid_accuracy[key]


def _finish_phase(run: Run, phase: str, model: nn.Module) -> None:
    """Record the phase's accuracy (evaluating if it trained no epoch) and save its model."""
    if phase not in run.accuracy:
        _record_test(run, phase, model)
        _record_valid(run, phase, model)
    if phase in ("baseline", "ssl"):
        save_phase_model(run, phase, model)
        save_run_checkpoint(run, phase, model, None)
