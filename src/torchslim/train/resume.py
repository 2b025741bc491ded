"""What ``--resume`` accepts: an intact engine checkpoint, and the recipe its finished epochs ran with.

A checkpoint's fields are checked for their types, and for agreeing with each other (``done`` counts the
epochs ``history`` records), before anything is restored: a hand-edited or damaged file is a
:class:`CheckpointError` naming the field, never a traceback or a phase silently trained again.

The recipe may differ from the checkpoint's only where the finished steps did not read it (fine-tuning's
rate before fine-tuning has started, say). Any other difference is refused with two ways out: ``--from``
(a new run that reuses the steps still alike) or a fresh ``--out``. A key named in ``allow_changed`` is let
through and recorded, so that ``results.json`` says which epochs ran with which value
(:func:`changed_values`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from torchslim.errors import CheckpointError, ConfigError
from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.loop import EpochProgress
from torchslim.train.rundir import PHASES, EpochRecord, Run, changed_keys, with_defaults

log = logging.getLogger(__name__)

__all__ = ["changed_values", "check_engine_state", "resume_state"]

# What every step's batches and updates depend on (the model is checked apart: another model cannot continue,
# and eval_batch_size changes no result). A step's own sections follow, as branch.shared_steps reads them.
_RUN_KEYS = ("seed", "data", "batch_size", "distributed")
_STEP_SECTIONS = {"baseline": ("baseline",), "ssl": ("ssl",), "compact": ("compact", "lowrank"),
                  "finetune": ("finetune",)}
_NUMBER = (int, float)
_RECORD_FIELDS = {f.name: f for f in dataclasses.fields(EpochRecord)}
_PROGRESS_FIELDS = {f.name for f in dataclasses.fields(EpochProgress)}


def resume_state(run: Run, allow_changed: Sequence[str] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``run``'s checkpoint, checked, and the recipe changes ``allow_changed`` lets through (to record).

    Raises:
        CheckpointError: the checkpoint is unreadable, or a field has the wrong type or disagrees with another.
        ConfigError: ``run.recipe`` differs from the checkpoint's in a value the finished steps used, and
            ``allow_changed`` does not name it.
    """
    path = run.run_dir / "checkpoint.pt"
    state = load_checkpoint(path)
    if state.get("kind") != "engine":
        return state, []  # restore() says what it is instead
    check_engine_state(path, state)
    old, new = with_defaults(state["recipe"]), run.recipe.to_dict()
    used = _used_sections(state)
    differ = [k for k in changed_keys(old, new) if k.split(".")[0] in used]
    allowed = [k for k in differ if any(k == a or k.startswith(f"{a}.") for a in allow_changed)]
    refused = [k for k in differ if k not in allowed]
    if refused:
        raise ConfigError(_refusal(run, state, refused, old, new))
    unused = [a for a in allow_changed if not any(k == a or k.startswith(f"{a}.") for k in differ)]
    if unused:
        log.warning("--allow-changed %s: the recipe differs in no such value the finished epochs used",
                    ", ".join(unused))
    changes = [{"key": k, "old": _value(old, k), "new": _value(new, k), "done": dict(state["done"])}
               for k in allowed]
    for c in changes:
        log.warning("resuming with %s changed from %r to %r after epochs %s (recorded in results.json)",
                    c["key"], c["old"], c["new"], c["done"])
    return state, changes


def _used_sections(state: Mapping[str, Any]) -> set[str]:
    """The recipe's top-level keys that the checkpoint's finished steps read."""
    done = state["done"]
    partial = state.get("partial") or {}  # a phase stopped inside its first epoch read its section too
    steps = [p for p in PHASES if done[p] > 0 or p == partial.get("phase")] + \
        (["compact"] if state.get("compacted") else [])
    sections = {s for step in steps for s in _STEP_SECTIONS[step]}
    return sections | set(_RUN_KEYS) if steps else sections


def _refusal(run: Run, state: Mapping[str, Any], keys: list[str], old: Mapping[str, Any],
             new: Mapping[str, Any]) -> str:
    done = ", ".join(f"{p} {n}" for p, n in state["done"].items() if n) or "compaction"
    lines = "\n".join(f"  {k}: {_value(old, k)!r} → {_value(new, k)!r}" for k in keys)
    return (
        f"cannot resume {run.run_dir}: the recipe differs from the one its finished epochs ({done}) ran with in\n"
        f"{lines}\nEither branch a new run that reuses the steps still alike: torchslim train <recipe> "
        f"--from {run.run_dir} --out <new folder>; or start afresh in another folder: --out <new folder>. "
        f"To continue this run anyway, its results then mixing both values (results.json records which epochs "
        f"ran with which): --resume --allow-changed {' '.join(keys)}"
    )


def _value(recipe: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        recipe = recipe.get(part) if isinstance(recipe, Mapping) else None
    return recipe


# ---------------------------------------------------------------------------------------------
# results.json: which epochs ran with which value


def changed_values(changes: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per key changed on a resume (``Run.recipe_changes``), its values in order and the epochs each ran::

        [{"key": "ssl.strength", "values": [{"value": 0.04, "epochs": {"ssl": [1]}},
                                             {"value": 0.08, "epochs": {"ssl": [2, 3]}}]}]

    A phase's key counts that phase's epochs; compact and lowrank keys fine-tuning's; others every epoch.
    """
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for change in changes:
        by_key.setdefault(change["key"], []).append(change)
    out = []
    for key, events in by_key.items():
        section = key.split(".")[0]
        scope = (section,) if section in PHASES else ("finetune",) if section in ("compact", "lowrank") else PHASES
        values = [{"value": events[0]["old"], "epochs": {}}] + [{"value": e["new"], "epochs": {}} for e in events]
        for record in history:
            phase, epoch = record["phase"], record["epoch"]
            if phase in scope:
                i = next((i for i, e in enumerate(events) if epoch <= e["done"].get(phase, 0)), len(events))
                values[i]["epochs"].setdefault(phase, []).append(epoch)
        out.append({"key": key, "values": values})
    return out


# ---------------------------------------------------------------------------------------------
# the checkpoint's fields


def check_engine_state(path: Path, state: Mapping[str, Any]) -> None:
    """Check an engine checkpoint's fields (``phase``, ``done``, ``history``, metrics, ``optimizer``...).

    Raises:
        CheckpointError: naming the first field of the wrong type or value, or that disagrees with another.
    """
    if state.get("kind") != "engine":
        return  # not an engine checkpoint: restore() says so
    _need(path, "recipe", isinstance(state.get("recipe"), Mapping), "a dict (the recipe)")
    _need(path, "phase", state.get("phase") in PHASES, f"one of {', '.join(PHASES)}")
    done = state.get("done")
    _need(path, "done", isinstance(done, Mapping) and set(done) == set(PHASES)
          and all(type(n) is int and n >= 0 for n in done.values()),
          f"a dict of epochs done per phase ({', '.join(PHASES)}: integers >= 0)")
    _need(path, "compacted", state.get("compacted", state["phase"] == "finetune") is (state["phase"] == "finetune"),
          f"{state['phase'] == 'finetune'} for phase {state['phase']!r}")
    history = state.get("history")
    _need(path, "history", type(history) is list, "a list of epoch records")
    for i, record in enumerate(history):
        _check_record(path, f"history[{i}]", record)
    for phase in PHASES:
        epochs = [r["epoch"] for r in history if r["phase"] == phase]
        _need(path, f"done[{phase!r}]", epochs == list(range(1, done[phase] + 1)),
              f"the number of {phase} epochs in history ({len(epochs)}, numbered 1, 2, ...); it is {done[phase]}")
    for key in ("accuracy", "valid_accuracy", "loss", "valid_loss"):
        metrics = state.get(key, {})
        _need(path, key, isinstance(metrics, Mapping) and all(_is_number(v) for v in metrics.values()),
              "a dict of numbers")
    for key in ("lowrank", "recipe_changes"):
        rows = state.get(key, [])
        _need(path, key, type(rows) is list and all(isinstance(r, Mapping) for r in rows), "a list of dicts")
    for i, change in enumerate(state.get("recipe_changes", [])):
        _need(path, f"recipe_changes[{i}]", isinstance(change.get("key"), str) and isinstance(change.get("done"),
              Mapping) and all(type(n) is int for n in change["done"].values()), "{key, old, new, done}")
    model = state.get("model")
    _need(path, "model", isinstance(model, Mapping) and all(isinstance(v, Tensor) for v in model.values()),
          "a state dict (parameter names → tensors)")
    optimizer = state.get("optimizer")
    _need(path, "optimizer", optimizer is None or (isinstance(optimizer, Mapping) and isinstance(
        optimizer.get("state"), Mapping) and isinstance(optimizer.get("param_groups"), list)),
          "None or an optimizer's state_dict() ({'state': ..., 'param_groups': [...]})")
    partial = state.get("partial")
    if partial is not None:
        progress = partial.get("progress") if isinstance(partial, Mapping) else None
        _need(path, "partial", isinstance(progress, Mapping) and partial.get("phase") == state["phase"]
              and partial.get("epoch") == done[state["phase"]] and set(progress) == _PROGRESS_FIELDS
              and all(type(progress[k]) is int and progress[k] >= 0 for k in ("step", "correct", "seen"))
              and _is_number(progress["loss_sum"]),
              f"None or where the unfinished epoch {done[state['phase']] + 1} of {state['phase']!r} stands "
              f"({{'phase', 'epoch', 'progress': {{{', '.join(sorted(_PROGRESS_FIELDS))}}}}})")


def _check_record(path: Path, where: str, record: Any) -> None:
    """One ``history`` entry: the fields of :class:`EpochRecord`, of their types."""
    _need(path, where, isinstance(record, Mapping), "a dict (an epoch record)")
    unknown = [k for k in record if k not in _RECORD_FIELDS]
    missing = [k for k, f in _RECORD_FIELDS.items() if k not in record and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    problems = ", ".join([f"unknown fields {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing))
    _need(path, where, not problems, f"an epoch record ({problems})")
    _need(path, f"{where}['phase']", record["phase"] in PHASES, f"one of {', '.join(PHASES)}")
    _need(path, f"{where}['epoch']", type(record["epoch"]) is int and record["epoch"] >= 1, "an integer >= 1")
    for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "density", "seconds"):
        _need(path, f"{where}[{key!r}]", _is_number(record[key]), "a number")
    for key in ("valid_acc", "valid_loss", "train_seconds"):
        _need(path, f"{where}[{key!r}]", record.get(key) is None or _is_number(record[key]), "a number or None")
    for key in ("zero_fraction", "alive"):
        value = record.get(key, {})
        _need(path, f"{where}[{key!r}]", isinstance(value, Mapping) and all(_is_number(v) for v in value.values()),
              "a dict of numbers")


def _is_number(value: Any) -> bool:
    return type(value) in _NUMBER  # exact types: a bool is no number here


def _need(path: Path, field: str, ok: bool, expected: str) -> None:
    if not ok:
        raise CheckpointError(
            f"{path}: {field} is not {expected}. The checkpoint was edited or damaged: restore it, or delete it "
            "and train again without --resume")
