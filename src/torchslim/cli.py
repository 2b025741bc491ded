"""The ``torchslim`` command: ``train``, ``compact``, ``profile`` and ``demo``.

The only module that prints. Library errors (:class:`TorchSlimError`) end as one ``error: ...`` line
and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from torchslim import __version__
from torchslim.errors import CheckpointError, ConfigError, TorchSlimError
from torchslim.train.recipes import GradMode

log = logging.getLogger(__name__)

DEMO_RECIPE, DEMO_FULL_RECIPE = "lenet_ssl", "lenet_ssl_full"


# ---------------------------------------------------------------------------------------------
# arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchslim",
        description="Learn structured sparsity (SSL), cut it out into a smaller dense model, measure it.",
        epilog="Start with `torchslim demo`: LeNet on Fashion-MNIST, dense vs SSL vs compact, in one table.",
    )
    parser.add_argument("--version", action="version", version=f"torchslim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (every module, DEBUG)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_compact(sub)
    _add_profile(sub)
    _add_demo(sub)
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the dataset's idx files (default: $TORCHSLIM_DATA, "
                                      "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", help="run folder for checkpoints, results and plots (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh, deleting an earlier run's results there")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set ssl.epochs=6 (repeatable)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (nor the lines printed instead when stderr is not a terminal)")


# one epoch per phase on all of Fashion-MNIST, with λ 2x the demo's as SSL has a third of its steps
TRAIN_EXAMPLE = (
    "example, about a minute on 2 cores; SSL cuts about two thirds of LeNet's weights:\n"
    "  torchslim train lenet_ssl --out runs/quick --set baseline.epochs=1 --set ssl.epochs=1 \\\n"
    '      --set finetune.epochs=1 --set "ssl.strength={channel: 3e-3, neuron: 3e-3, shape: 8e-3}"'
)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a recipe: baseline → SSL → compact → fine-tune",
                       description="Run a recipe (a YAML file, or a name from recipes/): baseline → SSL → "
                                   "compact → fine-tune. Writes checkpoints, compact.pt, results.json and plots.",
                       epilog=TRAIN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe name (e.g. lenet_ssl) or path to a YAML file")
    _add_run_options(p)
    p.add_argument("--grad", choices=typing.get_args(GradMode),
                   help="under torchrun: how the processes exchange gradients (default: the recipe's "
                        "distributed.grad, fp32)")
    p.add_argument("--stop-after", choices=("baseline", "ssl", "compact"), help="stop after this step")
    p.add_argument("--from", dest="branch_from", metavar="RUN_DIR",
                   help="start after the steps another run's recipe trains alike (its dense baseline, its SSL, ...), "
                        "copying them from its folder")
    p.add_argument("--allow-changed", nargs="+", default=[], metavar="KEY",
                   help="with --resume: continue although the recipe changed these keys (e.g. ssl.strength) since "
                        "the finished epochs ran; results.json records which epochs ran with which value")
    p.set_defaults(func=cmd_train)


def _add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="cut the zeros out of a trained model",
                       description="Cut the all-zero groups out of a dense model into a smaller dense model "
                                   "file. Input: a run folder's sparse.pt (the model after SSL) or baseline.pt, "
                                   "its checkpoint.pt while the run is in the baseline or SSL phase, or a state "
                                   "dict saved with torch.save(model.state_dict()) together with --recipe.")
    p.add_argument("checkpoint", help="sparse.pt, baseline.pt, checkpoint.pt (baseline or SSL phase), or a "
                                      "state dict file with --recipe")
    p.add_argument("--out", required=True, help="the compact model file to write (torchslim.save_compact format)")
    p.add_argument("--shapes", choices=("crop", "lowered", "auto", "off"), default=None,
                   help="zero shape fibers: crop kernels, lowered GEMM, auto (measured), off (default: recipe's)")
    p.add_argument("--channel-multiple", type=int, default=None,
                   help="keep every width a multiple of this, e.g. 8 for onnxruntime (default: recipe's)")
    p.add_argument("--recipe", help="recipe that builds the model (needed for a plain state dict)")
    p.set_defaults(func=cmd_compact)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="dense vs compact: parameters, MACs, CPU latency",
                       description="Compare a compact model file with the dense model it came from.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="recipe whose model is the dense reference")
    src.add_argument("--model", help="model name for the dense reference (lenet, mlp, resnet20, ...)")
    p.add_argument("--compact", required=True, help="compact model file (from `train` or `compact`)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (default: 1)")
    p.add_argument("--repeats", type=int, default=50, help="timed forward passes per measurement")
    p.add_argument("--input-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="one input's shape (default: the recipe's dataset, or 1 28 28)")
    p.set_defaults(func=cmd_profile)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="LeNet on Fashion-MNIST: dense → SSL → compact → fine-tune, one table",
                       description=f"Train recipe {DEMO_RECIPE} ({DEMO_FULL_RECIPE} with --full) and print one "
                                   "table: accuracy, filters and channels per layer, MACs, parameters, CPU "
                                   "latency at batch 1 and 64, speedup. Writes structure.png and history.png.")
    p.add_argument("--full", action="store_true", help=f"the full recipe ({DEMO_FULL_RECIPE}); longer")
    _add_run_options(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing latency (default: 1)")
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------
# logging that does not break progress bars


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


_RUN_LOGS = tuple(f"torchslim.train.{m}" for m in ("engine", "phases", "rundir", "branch"))  # a run's story


def _setup_logging(verbose: bool, quiet: bool) -> None:
    root = logging.getLogger("torchslim")
    for h in list(root.handlers):
        if isinstance(h, _TqdmHandler):
            root.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(name)s: %(message)s"))
    root.addHandler(handler)
    root.propagate = False
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in _RUN_LOGS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


# ---------------------------------------------------------------------------------------------
# commands


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _train(args: argparse.Namespace, recipe_name: str):
    from torchslim.train.engine import run
    from torchslim.train.recipes import load_recipe

    grad = getattr(args, "grad", None)
    recipe = load_recipe(recipe_name, overrides=[*args.overrides, *([f"distributed.grad={grad}"] if grad else [])])
    out = Path(args.out) if args.out else None
    from torchslim.train.world import restarted

    # a worker torchrun restarted (--max-restarts) continues from the run's last checkpoint
    return run(recipe, data_dir=args.data_dir, run_dir=out, resume=args.resume or restarted(),
               stop_after=getattr(args, "stop_after", None), progress=_progress(args),
               branch_from=getattr(args, "branch_from", None), overwrite=args.overwrite,
               allow_changed=getattr(args, "allow_changed", []), world=args.world)


def _write_plots(result) -> list[Path]:
    from torchslim.train.plots import plot_history, plot_structure

    paths = []
    if result.sparse_model is not None:
        paths.append(plot_structure(result.sparse_model, result.run_dir / "structure.png",
                                    title=f"{result.recipe.name}: structure learned by SSL",
                                    example_inputs=result.example))
    if result.history:
        paths.append(plot_history(result.history, result.run_dir / "history.png",
                                  title=f"{result.recipe.name}: accuracy and sparsity per epoch"))
    return paths


def cmd_train(args: argparse.Namespace) -> int:
    result = _train(args, args.recipe)
    if not args.world.is_main:  # rank 0 reports and draws
        return 0
    from torchslim.train.phases import shrinkage

    print(_accuracy_line(result.accuracy))
    if result.report is not None:
        print(result.report.format())
    if result.compact_model is not None and result.dense_model is not None:
        print(f"compact model: {shrinkage(result.dense_model, result.compact_model)}")
    plots = _write_plots(result)
    print(f"run folder: {result.run_dir} ({_files(result.run_dir, plots)})")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from torchslim.deploy.serialize import save_compact
    from torchslim.surgery.compact import compact, verify
    from torchslim.train.engine import check_compact_input, example_inputs, load_phase_model
    from torchslim.train.phases import shrinkage
    from torchslim.train.recipes import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    check_compact_input(args.checkpoint)
    model, recipe = load_phase_model(args.checkpoint, recipe)
    x = example_inputs(recipe, batch=8)
    small = compact(model, x, shapes=args.shapes or recipe.compact.shapes,
                    channel_multiple=args.channel_multiple or recipe.compact.channel_multiple)
    report = verify(model, small, x)
    save_compact(small, args.out, arch=getattr(model, "arch", None))
    print(f"compacted {args.checkpoint} → {args.out}: {shrinkage(model, small)}; outputs {report}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from torchslim.deploy.profile import compare, machine_info, profile
    from torchslim.deploy.serialize import load_compact
    from torchslim.models import create_model
    from torchslim.train.engine import build_model
    from torchslim.train.recipes import load_recipe

    path = Path(args.compact)
    if not path.is_file():
        raise CheckpointError(f"compact model file {path} does not exist; write one with `torchslim train` "
                              f"(runs/<recipe>/compact.pt) or `torchslim compact`")
    _check_positive("--threads", args.threads)
    _check_positive("--repeats", args.repeats)
    for b in args.batch:
        _check_positive("--batch", b)
    recipe = load_recipe(args.recipe) if args.recipe else None
    if recipe is not None:
        dense = build_model(recipe)
    else:
        small_arch = _stored_arch(path)
        name = args.model or (small_arch or {}).get("name")
        if name is None:
            raise ConfigError(f"{path} names no architecture; pass --model or --recipe for the dense reference")
        dense = create_model(name, **({} if args.model else small_arch.get("kwargs", {})))
    small = load_compact(path, model=dense)
    shape = tuple(args.input_shape) if args.input_shape else _input_shape(recipe)
    info = machine_info()
    print(f"{path} vs dense {getattr(dense, 'arch', {}).get('name', type(dense).__name__)} on {info['cpu']} "
          f"(torch {info['torch']})")
    for b in args.batch:
        x = torch.randn(b, *shape)
        print()
        print(compare(profile(dense, x, threads=args.threads, repeats=args.repeats),
                      profile(small, x, threads=args.threads, repeats=args.repeats)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _check_positive("--threads", args.threads)
    name = DEMO_FULL_RECIPE if args.full else DEMO_RECIPE
    result = _train(args, name)
    if not result.finished or result.compact_model is None:
        raise ConfigError(f"the run of {name} did not finish; run the demo again with --resume")
    from torchslim.train.demo import demo_table, measure

    measured = measure(result, threads=args.threads)
    plots = _write_plots(result)
    from torchslim.train.engine import write_results

    write_results(result, extra={"demo": measured.as_dict()})
    print()
    print(demo_table(result, measured))
    print(f"\nrun folder: {result.run_dir} ({_files(result.run_dir, plots)})")
    for p in plots:
        print(f"wrote {p}")
    return 0


def _accuracy_line(acc: dict[str, float]) -> str:
    names = {"baseline": "dense", "ssl": "SSL", "compact": "compact", "finetune": "compact+fine-tuned"}
    from torchslim.train.demo import percent

    return "test accuracy: " + ", ".join(f"{names[k]} {percent(acc[k])}" for k in names if k in acc)


def _files(folder: Path, plots: Sequence[Path]) -> str:
    names = sorted({p.name for p in folder.iterdir() if p.suffix in (".pt", ".json")} | {p.name for p in plots})
    return ", ".join(names)


def _check_positive(flag: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{flag} must be >= 1, got {value}")


def _stored_arch(path: Path) -> dict | None:
    """The ``arch`` a compact model file stores (``{"name", "kwargs"}``), or None."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(raw["arch"]) if isinstance(raw, dict) and raw.get("arch") else None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a compact model file ({type(exc).__name__}: {exc}); "
                              f"write it with `torchslim compact` or `torchslim train`") from exc


def _input_shape(recipe) -> tuple[int, ...]:
    if recipe is None:
        return (1, 28, 28)
    from torchslim.train.engine import example_inputs

    return tuple(example_inputs(recipe, batch=1).shape[1:])


# ---------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``torchslim`` command line; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    from torchslim.train.world import SOLO, join, leave

    args.world = join() if args.func is cmd_train else SOLO  # torchrun's processes, or this one
    _setup_logging(args.verbose, args.quiet)
    if not args.world.is_main:  # rank 0 tells the run's story; the others would repeat it
        for name in ("torchslim", *_RUN_LOGS):
            logging.getLogger(name).setLevel(logging.ERROR)
    ok = False
    try:
        status = args.func(args)
        ok = True
        return status
    except TorchSlimError as exc:
        rank = f"rank {args.world.rank}: " if args.world.distributed else ""
        print(f"error: {rank}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last finished epoch is checkpointed: run again with --resume", file=sys.stderr)
        return 130
    finally:
        leave(args.world, clean=ok)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
