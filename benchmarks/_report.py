"""What the report generators share: the typed schema of ``results/*.json``, its loader, the machine line
and markdown tables.

A results file is a JSON object written by one benchmark script; each record type below names the top-level
keys the reports read (``NotRequired``: older files may lack them). ``load`` checks those keys and their types
and says which script to re-run when a file does not match.
"""

import json
import types
from pathlib import Path
from typing import Any, NotRequired, Sequence, TypedDict, Union, get_args, get_origin, get_type_hints, is_typeddict

__all__ = ["SchemaError", "load", "machine_line", "table"]

SMOKE = " **Smoke run (tiny settings): not a result.**"


class Machine(TypedDict, total=False):
    """Where a benchmark ran (``_common.machine_info``); every key may be missing."""
    cpu: str
    cores: int
    torch: str
    threads: int
    python: str
    platform: str


class Record(TypedDict):
    """The header every results file has."""
    benchmark: str
    date: str
    machine: Machine
    smoke: NotRequired[bool]


class SSLRun(Record):
    recipe: dict
    accuracy: dict
    params: dict
    macs: dict
    conv_macs: dict
    flop_reduction: float
    conv_flop_reduction: float
    layers: list
    speed: dict
    valid_accuracy: NotRequired[dict]
    branches: NotRequired[dict]
    lowrank: NotRequired[list]
    speed_onnxruntime: NotRequired[dict]
    history_plot: NotRequired[str]


class LMRun(Record):
    recipe: dict
    perplexity: dict
    widths: dict
    params: dict
    macs: dict
    lstm_macs: dict
    flop_reduction: float
    lstm_flop_reduction: float
    direct_design: dict | None  # None when learned from scratch
    speed: dict
    valid_perplexity: NotRequired[dict]
    history_plot: NotRequired[str]


class LMControl(Record):
    recipe: dict
    perplexity: dict
    valid_perplexity: dict
    widths: list
    epochs: dict
    dropout: float
    finetune_history: list
    measured_as: NotRequired[str]


class Overhead(Record):
    batch_size: int
    threads: int
    groups: int
    repeats: int
    overhead: dict
    step_ms: dict


class Modes(Record):
    recipe: str
    modes: dict


class Magnitude(Record):
    recipe: dict
    accuracy: dict
    macs: dict
    params: dict
    magnitude: dict
    finetune: dict
    layers: list
    valid_accuracy: NotRequired[dict]


class Codec(Record):
    numel: int
    repeats: int
    world: int
    rows: list


class ForceSeeds(Record):
    plain_recipe: str
    force_recipe: str
    seeds: list
    runs: dict
    mean: dict
    rank_ratio: float


class ISSAlternatives(Record):
    setup: dict
    dense: dict
    points: list


class TernGradWire(Record):
    steps: dict
    batch_size: int
    rows: list


class TernGradConvergence(Record):
    configs: dict
    recipe: dict
    world_size: int
    batch_size_per_worker: int
    seeds: list
    plot: NotRequired[str]


class TernGradSpeed(Record):
    model: str
    world_size: int
    cores: int
    batch_size_per_worker: int
    steps_per_epoch: int
    epochs: int
    rates: dict
    analytic: dict | None


class ZooSpeed(Record):
    settings: dict
    models: dict
    tool: dict


class ZooExactness(Record):
    fraction_zeroed: float
    rows: list


class DDPRecipe(Record):
    recipe: dict
    workers: int
    rate: str
    timing: dict | None
    quality: dict
    cores: int


class FirstContact(Record):
    commit: str
    cores: int
    make_demo: dict
    install: dict


class ZooTimmHF(Record):
    settings: dict
    summary: dict
    rows: list


class GPTRun(Record):
    recipe: dict
    perplexity: dict
    valid_perplexity: dict
    control_epochs: int
    direct_design: dict
    dense_long: dict
    shape: dict
    block_params: dict
    params: dict
    block_reduction: float
    speed: dict
    train_seconds: float


class CaptureSpeed(Record):
    resnet50: dict
    llama_2layer_7b_widths: dict


SCRIPTS: dict[type, str] = {
    Record: "the benchmark named in its \"benchmark\" key", SSLRun: "ssl_recipe.py", LMRun: "iss_lm.py",
    LMControl: "iss_lm_control.py", Overhead: "lasso_overhead.py", Modes: "prox_vs_subgradient.py",
    Magnitude: "ssl_vs_magnitude.py", Codec: "codec_throughput.py", ForceSeeds: "force_seeds.py",
    ISSAlternatives: "iss_alternatives.py", TernGradWire: "terngrad_wire.py",
    TernGradConvergence: "terngrad_convergence.py", TernGradSpeed: "terngrad_speed.py", ZooSpeed: "zoo_speed.py",
    ZooExactness: "zoo_exactness.py", ZooTimmHF: "zoo_timm_hf.py", GPTRun: "gpt_kjv.py",
    CaptureSpeed: "capture_speed.py"}


class SchemaError(ValueError):
    """A results file lacks a key the reports read, or holds the wrong type there."""


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits an annotation (int counts as float, bool as neither)."""
    if get_origin(tp) is NotRequired:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        return any(_fits(value, t) for t in get_args(tp))
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if is_typeddict(tp):
        return isinstance(value, dict)
    if tp in (int, float):
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return isinstance(value, get_origin(tp) or tp)


def _problems(d: Any, schema: type, where: str = "") -> list[str]:
    """What is wrong with ``d`` as a ``schema``: missing keys and mistyped values, nested records included."""
    if not isinstance(d, dict):
        return [f"{where or 'the file'} is a {type(d).__name__}, not a JSON object"]
    out = []
    for key, tp in get_type_hints(schema).items():
        name = f"{where}{key}"
        if key not in d:
            out += [] if key not in schema.__required_keys__ else [f"missing key {name!r}"]
        elif not _fits(d[key], tp):
            out.append(f"key {name!r} is {type(d[key]).__name__} {d[key]!r:.40}, expected {_name(tp)}")
        elif is_typeddict(tp):
            out += _problems(d[key], tp, f"{name}.")
    return out


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def load(path: str | Path, schema: type = Record) -> dict[str, Any]:
    """The results file at ``path``, checked against ``schema``; ``SchemaError`` names the file and every
    missing or mistyped key, and the script that writes the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON ({e}); re-run benchmarks/{SCRIPTS[schema]} to rewrite it") from e
    if problems := _problems(d, schema):
        raise SchemaError(f"{path} does not match the {schema.__name__} schema: {'; '.join(problems)}. It may come "
                          f"from an older version of the script: re-run benchmarks/{SCRIPTS[schema]} to rewrite it.")
    return d


def machine_line(d: dict[str, Any], *, cores: str | None = None, sentence: bool = False, note: str = "") -> str:
    """``cpu, N cores, torch V, date`` of a results record; ``cores`` replaces the ``N cores`` part. With
    ``sentence``: a full stop, then ``note`` and, for a smoke run, the warning that it is not a result."""
    m = d["machine"]
    line = f"{m.get('cpu', '?')}, {cores or str(m.get('cores', '?')) + ' cores'}, torch {m.get('torch', '?')}, "
    line += str(d["date"])
    return line + f".{note}{SMOKE if d.get('smoke') else ''}" if sentence else line


def _row(cells: Sequence[Any]) -> str:
    """``| a | b |``; an empty cell is ``| |``."""
    return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"


def table(head: Sequence[Any], rows: Sequence[str | Sequence[Any]] = ()) -> list[str]:
    """A markdown table: the header, the alignment row (``|---|``), then the rows; a row is a list of cells or
    a line already formatted."""
    return [_row(head), "|---" * len(head) + "|", *(r if isinstance(r, str) else _row(r) for r in rows)]
