"""Recipes: one YAML file per experiment, parsed into typed dataclasses.

A recipe names the model, the data and the three training phases of SSL (Wen et al., NIPS 2016):
a dense baseline, group-Lasso training, and fine-tuning of the compacted model with the Lasso off.
Every field has a default, so a recipe states only what differs; ``base: other_recipe`` starts it from
another recipe's keys. Unknown keys and bad values raise :class:`~torchslim.errors.ConfigError` naming
the key and the valid options. Every key is in docs/recipes.md.

Example::

    recipe = load_recipe("lenet_ssl", overrides=["ssl.epochs=1", "data.train_limit=512"])
    recipe.ssl.strength        # {'channel': 0.0002, 'shape': 0.0002}
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from torchslim.errors import ConfigError
from torchslim.train._typed import _build, _check_min, _check_positive, _check_range, _FieldError, _suggest

__all__ = ["CompactSpec", "DataSpec", "DistillSpec", "DistributedSpec", "ForceSpec", "GradMode", "LowRankSpec",
           "ModelSpec", "PhaseSpec", "Recipe", "SSLSpec", "apply_overrides", "available_recipes", "load_recipe",
           "recipe_from_dict", "recipe_dirs"]

Schedule = Literal["cosine", "constant", "step"]
GradMode = Literal["fp32", "fp16", "bf16", "powersgd", "terngrad"]  # how processes under torchrun share gradients
GroupKind = Literal["channel", "neuron", "filter", "in_channel", "shape", "depth", "hidden", "hidden_row",
                    "hidden_col", "rank", "head", "embed"]


@dataclass
class ModelSpec:
    """Which network to build: ``torchslim.models.create_model(name, **kwargs)``."""

    name: str = "lenet"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    """Which dataset; ``*_limit`` keep only the first N images (or tokens of a corpus: quick runs and tests).

    Images: ``"fashion-mnist"``, ``"mnist"``. Word corpora (language models): ``"kjv"``, ``"ptb"``;
    for those ``bptt`` and ``vocab_size`` apply, ``test_limit`` cuts valid and test, and the corpus's
    own validation split is used instead of ``valid_size``.
    """

    name: str = "fashion-mnist"
    train_limit: int | None = None  # None: all 60k training images (all tokens)
    test_limit: int | None = None  # None: all 10k test images (all tokens)
    valid_size: int = 0  # hold out the last N training images to tune hyper-parameters on, not on test
    bptt: int = 35  # corpora: truncated-BPTT steps per chunk (Zaremba et al.'s PTB models)
    vocab_size: int = 10_000  # corpora: words with their own id, besides <unk> and <eos>

    def __post_init__(self) -> None:
        for key in ("train_limit", "test_limit"):
            if getattr(self, key) is not None:  # as load_dataset's limit: a positive count, or null for all
                _check_min(key, getattr(self, key), 1)
        _check_min("valid_size", self.valid_size, 0)
        _check_min("bptt", self.bptt, 1)
        _check_min("vocab_size", self.vocab_size, 1)


@dataclass
class ForceSpec:
    """Force regularization (Wen et al., ICCV 2017) on the filters of every Conv/Linear layer while training."""

    strength: float = 0.0  # λ_s (the solver's force_decay); 0: off
    kind: Literal["l2", "l1"] = "l2"  # l2: f_ji = w_j − w_i (Caffe "Degradation"); l1: unit force ("Constant")
    multipliers: dict[str, float] = field(default_factory=dict)  # per-layer λ_s scale (force_mult); 0 disables
    exclude: list[str] = field(default_factory=list)  # layers left alone
    adaptive: bool = False  # force_decay_type "adaptive": ||force|| = λ_s·mult·||data gradient|| per layer
    epochs: int | None = None  # the authors' force_iter: the force stops after this many epochs of its phase; None: all

    def __post_init__(self) -> None:
        _check_min("strength", self.strength, 0.0)
        if self.epochs is not None:
            _check_min("epochs", self.epochs, 0)
        for layer, mult in self.multipliers.items():
            _check_min(f"multipliers.{layer}", mult, 0.0)


@dataclass
class DistillSpec:
    """Knowledge distillation (Hinton et al., 2015) from a teacher while a phase trains (:mod:`torchslim.train.distill`)."""

    alpha: float = 0.0  # α: the weight of the teacher's softened outputs against the labels' 1 − α; 0: off
    temperature: float = 1.0  # T: softens teacher and student alike; the soft term is scaled by T²
    teacher: str | None = None  # a model file (compact.pt, baseline.pt, a state dict); None: this run's baseline.pt

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:  # as distill_loss: 1 fits the teacher's outputs alone
            raise _FieldError("alpha", f"must be in [0, 1], the teacher's weight, got {self.alpha}")
        _check_positive("temperature", self.temperature)


@dataclass
class PhaseSpec:
    """One training phase: momentum SGD (or AdamW) with weight decay, a learning-rate schedule, optionally a force."""

    epochs: int = 1
    lr: float = 0.01
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: transformers (betas 0.9, 0.95; decoupled weight decay)
    momentum: float = 0.9  # the paper's Caffe solvers all use 0.9 (SGD only)
    weight_decay: float = 5.0e-4  # Caffe LeNet's L2 decay; SSL keeps it beside the group Lasso
    lr_schedule: Schedule = "cosine"  # per-step cosine to 0; "step" divides by 10 at 50% and 75%
    grad_clip: float | None = None  # clip the gradients' global L2 norm (LSTMs; PTB's word LM uses 0.25)
    force: ForceSpec = field(default_factory=ForceSpec)  # coordinate filters toward low rank (off by default)
    dropout: float | None = None  # every dropout's p during this phase (a compact model needs less); None: the model's
    distill: DistillSpec = field(default_factory=DistillSpec)  # fit a teacher's outputs too (off by default)

    def __post_init__(self) -> None:
        _check_min("epochs", self.epochs, 0)
        if self.dropout is not None:
            _check_range("dropout", self.dropout, 0.0, 1.0)
        _check_positive("lr", self.lr)
        _check_range("momentum", self.momentum, 0.0, 1.0)
        _check_min("weight_decay", self.weight_decay, 0.0)
        if self.grad_clip is not None:
            _check_positive("grad_clip", self.grad_clip)


@dataclass
class SSLSpec(PhaseSpec):
    """The group-Lasso phase: ``E(W) = E_D(W) + λ_wd·R(W) + Σ_kind λ_kind Σ_g ||w_g||_2``."""

    mode: Literal["prox", "subgradient"] = "prox"  # prox: exact zeros; subgradient: Caffe + 1e-4 zero-out
    kinds: list[GroupKind] = field(default_factory=lambda: ["channel", "shape"])
    strength: float | dict[str, float] = 2.0e-4  # λ, one value or one per kind
    multipliers: dict[str, float] = field(default_factory=dict)  # per-layer λ scale, as Caffe's decay_mult
    weight_by_size: bool = True  # λ_g = λ·sqrt(|g|): the usual group-Lasso weighting
    threshold: float = 1.0e-4  # subgradient mode: |w| below this is set to 0 (Caffe's ZEROUT_THRESHOLD)
    reset_momentum: bool = False  # zero the momentum of weights the Lasso set to 0, so zero groups stay zero
    keep: float | dict[str, float] | None = None  # size budget: a layer's Lasso stops at this fraction of its groups
    keep_ramp: float = 0.0  # reach keep over this fraction of the phase, on Zhu & Gupta's cubic; 0: from the start
    keep_cut: Literal["end", "step"] = "end"  # cut a layer λ left above budget by magnitude: at the end, every step

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kinds:
            kinds = ", ".join(typing.get_args(GroupKind))
            raise _FieldError("kinds", f"is empty; give at least one of {kinds}")
        if isinstance(self.strength, dict):
            for kind in self.strength:
                if kind not in self.kinds:
                    raise _FieldError(f"strength.{kind}",
                                      f"is for a kind not in kinds {self.kinds}; add it there or remove it")
            for kind in self.kinds:
                if kind not in self.strength:
                    raise _FieldError("strength", f"has no value for kind '{kind}'; give one per kind in {self.kinds}")
                _check_min(f"strength.{kind}", self.strength[kind], 0.0)
        else:
            _check_min("strength", self.strength, 0.0)
        for layer, mult in self.multipliers.items():
            _check_min(f"multipliers.{layer}", mult, 0.0)
        _check_min("threshold", self.threshold, 0.0)
        if self.keep is not None:
            if self.mode != "prox":
                raise _FieldError("keep", "needs mode: prox (the budget holds exact zeros); remove it or set the mode")
            for kind, fraction in (self.keep.items() if isinstance(self.keep, dict) else [("", self.keep)]):
                if kind and kind not in self.kinds:
                    raise _FieldError(f"keep.{kind}", f"is for a kind not in kinds {self.kinds}; add it there or remove it")
                if not 0 < fraction <= 1:
                    raise _FieldError(f"keep.{kind}" if kind else "keep",
                                      f"must be in (0, 1], the fraction of each layer's groups to keep, got {fraction}")
        if not 0 <= self.keep_ramp <= 1:
            raise _FieldError("keep_ramp", f"must be in [0, 1], the fraction of the phase, got {self.keep_ramp}")
        if self.keep_ramp and self.keep is None:
            raise _FieldError("keep_ramp", "needs keep, the budget it ramps down to; set keep or remove keep_ramp")
        if self.keep_cut == "step" and self.keep is None:
            raise _FieldError("keep_cut", "'step' needs keep, the budget it cuts to; set keep or remove keep_cut")


@dataclass
class CompactSpec:
    """How :func:`torchslim.surgery.compact.compact` handles zero shape fibers and rounds widths."""

    shapes: Literal["crop", "lowered", "auto", "off"] = "crop"  # crop: shrink kernels at zero borders
    channel_multiple: int = 1  # 8: widths stay multiples of 8 (onnxruntime's blocked convolutions)

    def __post_init__(self) -> None:
        _check_min("channel_multiple", self.channel_multiple, 1)


@dataclass
class LowRankSpec:
    """Low-rank decomposition after compaction (:func:`torchslim.surgery.lowrank.lowrank`), before fine-tuning."""

    energy: float | None = None  # None: no decomposition; 0.95: the paper's "<= 5% PCA reconstruction error"
    method: Literal["pca", "svd"] = "pca"  # pca: uncentered, energy by eigenvalues (the original tool's default)
    ranks: dict[str, int] = field(default_factory=dict)  # explicit r per layer (wins over energy)
    skip: list[str] = field(default_factory=list)  # layers left alone (e.g. ResNet projection shortcuts)
    lasso: float = 0.0  # λ on each rank group (scaled by √|g|) while fine-tuning; zero ranks are cut at the end

    def __post_init__(self) -> None:
        # the rules of torchslim.surgery.lowrank.lowrank, checked before any training
        if self.energy is not None and not 0 < self.energy <= 1:
            raise _FieldError("energy", f"must be a fraction in (0, 1], e.g. 0.95 (the paper's), got {self.energy}")
        for layer, rank in self.ranks.items():
            _check_min(f"ranks.{layer}", rank, 1)
        _check_min("lasso", self.lasso, 0.0)
        if self.lasso and not self.enabled:
            raise _FieldError("lasso", "needs a decomposition: set lowrank.energy or lowrank.ranks")

    @property
    def enabled(self) -> bool:
        return self.energy is not None or bool(self.ranks)


@dataclass
class TernGradSpec:
    """TernGrad's options (Wen et al., NIPS 2017; :class:`torchslim.comm.TernGradState`)."""

    scheme: Literal["base3", "2bit"] = "base3"  # code packing: 5 codes a byte (1.6 bits) or 4 (2 bits)
    reduce: Literal["auto", "allgather", "allreduce", "twophase"] = "auto"  # twophase: fewest bytes, two roundings
    clip_sigma: float = 2.5  # s = min(max|g|, c·σ) per layer, the paper's gradient clipping; inf: none
    min_numel: int = 1  # layers with fewer elements stay fp32
    warmup_steps: int = 0  # the first K steps of each phase send fp32 gradients
    quantize_last: bool = False  # ternarize the last layer too (the paper keeps it fp32)

    def __post_init__(self) -> None:
        if not self.clip_sigma > 0:  # nan too; inf is allowed: no clipping
            raise _FieldError("clip_sigma", f"must be > 0 (inf: no clipping), got {self.clip_sigma}")
        _check_min("min_numel", self.min_numel, 1)
        _check_min("warmup_steps", self.warmup_steps, 0)


@dataclass
class PowerSGDSpec:
    """PyTorch's PowerSGD hook (Vogels et al., 2019; ``torch.distributed.algorithms.ddp_comm_hooks``)."""

    rank: int = 1  # matrix_approximation_rank
    warmup_steps: int = 10  # start_powerSGD_iter: fp32 all-reduce before it (PyTorch needs 2 at least)
    min_compression_rate: float = 2.0  # smaller tensors go uncompressed

    def __post_init__(self) -> None:
        _check_min("rank", self.rank, 1)
        _check_min("warmup_steps", self.warmup_steps, 2)
        _check_positive("min_compression_rate", self.min_compression_rate)


@dataclass
class DistributedSpec:
    """How gradients travel when the run is started by torchrun with several processes (ignored in one)."""

    grad: GradMode = "fp32"  # --grad overrides it
    terngrad: TernGradSpec = field(default_factory=TernGradSpec)
    powersgd: PowerSGDSpec = field(default_factory=PowerSGDSpec)
    bucket_cap_mb: float = 25.0  # DDP's gradient bucket size

    def __post_init__(self) -> None:
        _check_positive("bucket_cap_mb", self.bucket_cap_mb)


@dataclass
class Recipe:
    """A whole experiment: baseline → SSL → compact → fine-tune."""

    name: str = "recipe"
    seed: int = 0  # seeds the model's initialization and every epoch's shuffling
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    batch_size: int = 64  # Caffe's LeNet batch size
    eval_batch_size: int = 1000  # evaluation only: larger is faster, same result
    checkpoint_every_steps: int | None = None  # also checkpoint inside an epoch, every N steps; None: at its end
    baseline: PhaseSpec = field(default_factory=lambda: PhaseSpec(epochs=2, lr=0.01))
    ssl: SSLSpec = field(default_factory=SSLSpec)
    finetune: PhaseSpec = field(default_factory=lambda: PhaseSpec(epochs=1, lr=0.001))
    compact: CompactSpec = field(default_factory=CompactSpec)
    lowrank: LowRankSpec = field(default_factory=LowRankSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)  # under torchrun only

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_min("batch_size", self.batch_size, 1)
        _check_min("eval_batch_size", self.eval_batch_size, 1)
        if self.checkpoint_every_steps is not None:
            _check_min("checkpoint_every_steps", self.checkpoint_every_steps, 1)
        if self.baseline.distill.alpha and self.baseline.distill.teacher is None:
            raise ConfigError("baseline.distill needs baseline.distill.teacher, a trained model file: the run's own "
                              "dense model is what the baseline phase trains")
        for phase in ("ssl", "finetune"):
            d = getattr(self, phase).distill
            if d.alpha and d.teacher is None and self.baseline.epochs == 0:
                raise ConfigError(f"{phase}.distill's teacher is the run's dense model, but baseline.epochs is 0; "
                                  f"train a baseline or set {phase}.distill.teacher to a trained model file")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON/checkpoint safe); ``recipe_from_dict(r.to_dict()) == r``."""
        return dataclasses.asdict(self)


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


def _check_name(name: str) -> None:
    """``name`` is the run folder ``runs/<name>``: one path component, so a recipe cannot write elsewhere."""
    if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise _FieldError("name", f"must be a single folder name of letters, digits, '-', '_' and '.' (not '.' or "
                                  f"'..'), got {name!r}; it names the run folder runs/<name>: give the recipe a "
                                  f"plain name, and choose another folder with --out")


# ---------------------------------------------------------------------------------------------
# loading


def recipe_dirs() -> list[Path]:
    """Folders searched for a recipe given by bare name: the package's (``torchslim/recipes``, installed with it;
    the repository's ``recipes/`` links to it)."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    return [folder] if folder.is_dir() else []


def available_recipes() -> list[str]:
    """Names of the recipes found in :func:`recipe_dirs`."""
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def _resolve(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if found := path if path.is_file() else _find(path, near=None):
        return found
    names = available_recipes()
    raise ConfigError(f"recipe '{path_or_name}' not found: give a YAML file or one of {names or '(none found)'}"
                      f"{_suggest(path.stem, names)} (searched {[str(d) for d in recipe_dirs()]})")


def _find(ref: Path, near: Path | None) -> Path | None:
    """The file of a bare recipe name (in ``near``, then :func:`recipe_dirs`) or of a path relative to ``near``."""
    named = ref.suffix not in (".yaml", ".yml") and len(ref.parts) == 1
    folders = ([near] if near else []) + (recipe_dirs() if named else [])
    candidates = [d / (f"{ref.name}.yaml" if named else ref) for d in folders]
    return next((c for c in candidates if c.is_file()), None)


def load_recipe(path_or_name: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe from a YAML file or by name (``"lenet_ssl"`` → ``recipes/lenet_ssl.yaml``).

    ``base: other`` starts it from another recipe (:func:`_read_with_bases`); its name stays its own.

    Args:
        path_or_name: a path to a YAML file, or the bare name of a recipe in :func:`recipe_dirs`.
        overrides: ``"dotted.key=value"`` strings applied after the bases, before validation; values are YAML
            (``ssl.epochs=1``, ``ssl.kinds=[channel]``, ``data.train_limit=null``).
    Raises:
        ConfigError: the recipe or a base is missing, the bases form a cycle, a file is not valid YAML, or the
            merged recipe has an unknown key or a bad value.
    """
    path = _resolve(path_or_name)
    raw, chain = _read_with_bases(path, ())
    raw.setdefault("name", path.stem)
    return recipe_from_dict(apply_overrides(raw, overrides), source=" → base ".join(map(str, chain)))


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """The mapping in ``path`` merged (:func:`_merge`) over its ``base:``'s (:func:`_find`); the files read."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(raw).__name__}")
    chain = (*seen, path)
    if "base" not in raw:
        return raw, chain
    ref = raw.pop("base")
    base = _find(Path(ref), near=path.parent) if isinstance(ref, str) and ref.strip() else None
    cycle = base is not None and base.resolve() in [p.resolve() for p in chain]
    if base is None or cycle:
        read = " → base ".join(map(str, chain))
        problem = (f"its bases form a cycle ({read} → base {base}); start one of them from a recipe outside it"
                   if cycle else f"base {ref!r} of {path} not found (read: {read}); give a recipe name or a YAML "
                   f"path relative to {path.parent}")
        available = sorted({*available_recipes(), *(p.stem for p in path.parent.glob("*.yaml"))})
        raise ConfigError(f"recipe {chain[0]}: {problem}; available recipes: {', '.join(available)}")
    parent, chain = _read_with_bases(base, chain)
    parent.pop("name", None)  # a recipe's name is its own, never its base's
    return _merge(parent, raw), chain


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: a mapping in both merges key by key (recursively); lists and scalars replace."""
    out = _deep_copy(base)
    for key, value in child.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else _deep_copy(value)
    return out


def recipe_from_dict(raw: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
    """Validate plain data (parsed YAML, or :meth:`Recipe.to_dict`) into a :class:`Recipe`."""
    try:
        return _build(Recipe, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``"a.b.c=value"`` set; the value is parsed as YAML."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not key=value, e.g. ssl.epochs=1")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({exc})") from exc
        if isinstance(value, dict) and any(":" in str(k) and v is None for k, v in value.items()):
            # YAML reads {conv1:0.5} as the key "conv1:0.5" with no value: a mapping needs "conv1: 0.5"
            raise ConfigError(f"override '{item}': put a space after each ':' in a mapping "
                              f"(e.g. {key.strip()}='{{conv1: 0.5}}')")
        _set_dotted(out, key.strip().split("."), value, key.strip())
    return out


def _set_dotted(d: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set '{key}': '{where}' is {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value


def _deep_copy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _deep_copy(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_deep_copy(x) for x in v]
    return v
