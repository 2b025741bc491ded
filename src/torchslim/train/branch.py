"""Branching (``--from``): a run that starts from the steps another run trained the same way.

Two recipes alike in model, data, seed and batch sizes share their leading steps up to the first whose
recipe sections differ (:func:`shared_steps`). A branch copies those steps' files from the source run and
writes a checkpoint set back to their end, from which :func:`torchslim.train.rundir.restore` continues.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from torchslim.deploy.serialize import load_compact
from torchslim.errors import CheckpointError, ConfigError
from torchslim.train.checkpoint import load_checkpoint, save_checkpoint
from torchslim.train.resume import check_engine_state
from torchslim.train.rundir import RUN_FILES, Run, with_defaults

log = logging.getLogger(__name__)

__all__ = ["branch", "seed_branch", "shared_steps"]

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
    source, target = with_defaults(source), with_defaults(target)
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


def branch(run: Run, source_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """What ``source_dir``'s run trained as ``run.recipe`` would: a checkpoint at the end of the shared steps,
    from which :func:`torchslim.train.rundir.restore` continues, and the names of their files to copy
    (:func:`seed_branch`). Recipes alike throughout continue from wherever the source is.

    The branch's RNG is not the source's at that point: dropout masks differ from an unbroken run's.

    Raises:
        CheckpointError: ``source_dir`` holds no engine checkpoint (or a damaged one), or has not finished the
            shared steps.
        ConfigError: the recipes share no step, or ``source_dir`` is the run's own folder.
    """
    if source_dir.resolve() == run.run_dir.resolve():
        raise ConfigError(f"cannot branch {run.run_dir} from itself; use --resume to continue it")
    state = load_checkpoint(source_dir / "checkpoint.pt")
    if state.get("kind") != "engine":
        raise CheckpointError(f"{source_dir / 'checkpoint.pt'} is not an engine checkpoint; branch from a run folder")
    check_engine_state(source_dir / "checkpoint.pt", state)
    shared = shared_steps(state["recipe"], run.recipe.to_dict())
    if not shared:
        raise ConfigError(f"{run.recipe.name} and {state['recipe']['name']} differ from their baseline on; "
                          f"there is nothing to branch from, run without it")
    last = shared[-1]
    if last == "finetune":
        files = [name for name in RUN_FILES[1:-1] if (source_dir / name).is_file()]
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


def seed_branch(run: Run, source_dir: Path, state: dict[str, Any], files: list[str]) -> None:
    """Write :func:`branch`'s checkpoint and copy its files into the (cleared) run folder."""
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
