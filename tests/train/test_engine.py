"""The training engine on a 512-image Fashion-MNIST subset: phases, resume, checkpoints, zeros kept."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from support import needs_fashion_mnist

import torchslim.train.engine as engine
import torchslim.train.tasks as tasks
from torchslim.deploy.serialize import load_compact
from torchslim.errors import CheckpointError, ConfigError
from torchslim.train import rundir
from torchslim.train.recipes import PhaseSpec, load_recipe
from torchslim.train.tasks import load_task

TINY = [
    "data.train_limit=512", "data.test_limit=256", "eval_batch_size=256",
    "baseline.epochs=1", "baseline.lr=0.05",
    # a strong λ so that one short epoch already zeroes whole channels and shape fibers
    "ssl.epochs=1", "ssl.lr=0.05", "ssl.lr_schedule=constant",
    "ssl.kinds=[channel, shape]", "ssl.strength={channel: 0.04, shape: 0.04}",
    "finetune.epochs=1", "finetune.lr=0.01",
]


pytestmark = [needs_fashion_mnist, pytest.mark.usefixtures("one_thread")]


def tiny(*extra: str):
    return load_recipe("lenet_ssl", overrides=[*TINY, *extra])


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_schedules():
    cos = PhaseSpec(epochs=2, lr=0.1, lr_schedule="cosine")
    assert engine.lr_at(cos, 0, 100) == pytest.approx(0.1)
    assert engine.lr_at(cos, 50, 100) == pytest.approx(0.05)
    assert engine.lr_at(cos, 99, 100) < 1e-3
    step = PhaseSpec(epochs=2, lr=0.1, lr_schedule="step")
    assert [engine.lr_at(step, s, 100) for s in (0, 50, 75)] == pytest.approx([0.1, 0.01, 0.001])
    assert engine.lr_at(PhaseSpec(lr=0.1, lr_schedule="constant"), 99, 100) == 0.1


def test_run_goes_through_every_phase(tmp_path):
    result = engine.run(tiny(), run_dir=tmp_path, progress=False)
    assert result.finished
    assert set(result.accuracy) == {"baseline", "ssl", "compact", "finetune"}
    assert all(0.0 <= a <= 1.0 for a in result.accuracy.values())
    assert [(r.phase, r.epoch) for r in result.history] == [("baseline", 1), ("ssl", 1), ("finetune", 1)]
    assert result.epochs_trained == {"baseline": 1, "ssl": 1, "finetune": 1}
    assert all(0 < r.train_seconds < r.seconds for r in result.history)  # the steps alone, evaluation left out
    # SSL zeroed whole groups, and compaction cut them out
    ssl_record = result.history[1]
    assert ssl_record.zero_fraction["channel"] > 0 and ssl_record.density < 1
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(result.compact_model) < n(result.sparse_model) == n(result.dense_model)
    # compacting did not change the function: same accuracy before fine-tuning
    assert result.accuracy["compact"] == pytest.approx(result.accuracy["ssl"], abs=1 / 256)
    # files: the compact model reloads to the same outputs, results.json has the numbers
    for name in ("checkpoint.pt", "baseline.pt", "sparse.pt", "compacted.pt", "compact.pt", "results.json"):
        assert (tmp_path / name).is_file(), name
    x = result.example
    torch.testing.assert_close(load_compact(tmp_path / "compact.pt")(x), result.compact_model(x))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"] == pytest.approx(result.accuracy)
    assert saved["structure"][0]["name"] == "conv1" and len(saved["history"]) == 3


def test_validation_split_is_held_out_of_training_and_reported(tmp_path):
    result = engine.run(tiny("data.valid_size=128", "ssl.epochs=0", "finetune.epochs=0"),
                        run_dir=tmp_path, progress=False, stop_after="baseline")
    assert set(result.valid_accuracy) == {"baseline"}
    assert result.history[0].valid_acc == result.valid_accuracy["baseline"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["valid_accuracy"] == pytest.approx(result.valid_accuracy)
    task = load_task(tiny("data.valid_size=128"))
    train, valid = task.splits["train"], task.splits["valid"]
    assert len(train[1]) == 384 and len(valid[1]) == 128
    assert not any(torch.equal(valid[0][0], img) for img in train[0])
    with pytest.raises(ConfigError, match="valid_size"):
        load_task(tiny("data.valid_size=512"))


def test_history_records_groups_alive_per_layer_and_plots_them(tmp_path):
    from torchslim.train.plots import plot_history

    result = engine.run(tiny(), run_dir=tmp_path, progress=False)
    ssl = [r for r in result.history if r.phase == "ssl"][-1]
    assert ssl.alive["conv1:channel"] < 20 and ssl.alive["conv2:shape"] <= 500      # groups the Lasso zeroed
    assert result.history[-1].alive == {}                                              # fine-tuning: compacted
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["history"][1]["alive"] == ssl.alive
    assert plot_history(result.history, tmp_path / "h.png").stat().st_size > 10_000


def test_keep_ramp_reaches_the_budget_gradually_over_the_phase(tmp_path):
    budget = ["ssl.epochs=2", "ssl.kinds=[channel]", "ssl.strength=0.2", "ssl.keep=0.25", "compact.shapes=off"]
    alive = {}
    for ramp in (0.0, 1.0):
        result = engine.run(tiny(*budget, f"ssl.keep_ramp={ramp}"), run_dir=tmp_path / str(ramp), progress=False,
                            stop_after="ssl")
        alive[ramp] = [r.alive for r in result.history if r.phase == "ssl"]
    assert alive[0.0][1] == alive[1.0][1]                   # the same budget in the end
    assert sum(alive[1.0][0].values()) > sum(alive[0.0][0].values())  # halfway, the ramp still keeps more


def test_keep_cut_step_makes_a_weak_lambda_follow_the_ramp(tmp_path):
    weak = ["ssl.epochs=2", "ssl.kinds=[channel]", "ssl.strength=1e-6", "ssl.keep=0.25", "ssl.keep_ramp=1",
            "compact.shapes=off"]
    alive = {}
    for cut in ("end", "step"):
        result = engine.run(tiny(*weak, f"ssl.keep_cut={cut}"), run_dir=tmp_path / cut, progress=False,
                            stop_after="ssl")
        alive[cut] = [r.alive for r in result.history if r.phase == "ssl"]
    widths = {"conv1:channel": 20, "conv2:channel": 50}  # LeNet's channels
    assert all(alive["end"][0][layer] == n for layer, n in widths.items())          # λ alone thins nothing
    assert all(n // 4 < alive["step"][0][layer] < n for layer, n in widths.items())  # halfway down the ramp
    assert alive["end"][1] == alive["step"][1] == {layer: n // 4 for layer, n in widths.items()}


def test_finetuning_keeps_removed_structures_at_zero(tmp_path):
    result = engine.run(tiny("compact.shapes=off", "finetune.lr=0.05"), run_dir=tmp_path, progress=False)
    before = load_compact(tmp_path / "compacted.pt")  # the compact model before fine-tuning
    after = result.compact_model
    zero_fibers = 0
    for name, w in before.state_dict().items():
        if name.endswith("weight") and w.dim() == 4:  # conv: shape fibers W[:, c, i, j] that were all zero
            dead = (w != 0).sum(0) == 0
            zero_fibers += int(dead.sum())
            assert torch.all(after.state_dict()[name][:, dead] == 0), name
        if name.endswith("weight"):
            assert not torch.equal(after.state_dict()[name], w), f"{name} was not trained"
    assert zero_fibers > 0, "the test needs zero shape fibers inside the compact model"


def test_resume_does_not_redo_finished_epochs_and_matches_a_straight_run(tmp_path):
    straight = engine.run(tiny(), run_dir=tmp_path / "straight", progress=False)

    first = engine.run(tiny(), run_dir=tmp_path / "resumed", progress=False, stop_after="baseline")
    assert not first.finished and first.epochs_trained == {"baseline": 1, "ssl": 0, "finetune": 0}
    second = engine.run(tiny(), run_dir=tmp_path / "resumed", progress=False, resume=True)
    assert second.finished
    assert second.epochs_trained == {"baseline": 0, "ssl": 1, "finetune": 1}
    assert [r.phase for r in second.history] == ["baseline", "ssl", "finetune"]
    assert second.accuracy == pytest.approx(straight.accuracy)
    for k, v in straight.compact_model.state_dict().items():
        torch.testing.assert_close(second.compact_model.state_dict()[k], v)

    third = engine.run(tiny(), run_dir=tmp_path / "resumed", progress=False, resume=True)
    assert third.epochs_trained == {"baseline": 0, "ssl": 0, "finetune": 0}  # all done: nothing to redo


@pytest.mark.parametrize("extra", [[], ["ssl.keep=0.25", "ssl.keep_ramp=1"]], ids=["lasso", "budget-ramp"])
def test_resume_in_the_middle_of_a_phase_restores_the_optimizer(tmp_path, monkeypatch, extra):
    recipe = tiny("ssl.epochs=2", *extra)
    straight = engine.run(recipe, run_dir=tmp_path / "straight", progress=False)

    real, calls = tasks.train_epoch, []

    def dies_in_second_ssl_epoch(*args, **kwargs):
        calls.append(kwargs["desc"])
        if kwargs["desc"].startswith("ssl 2/"):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "train_epoch", dies_in_second_ssl_epoch)
    with pytest.raises(KeyboardInterrupt):
        engine.run(recipe, run_dir=tmp_path / "resumed", progress=False)
    monkeypatch.setattr(tasks, "train_epoch", real)
    resumed = engine.run(recipe, run_dir=tmp_path / "resumed", progress=False, resume=True)
    assert resumed.epochs_trained == {"baseline": 0, "ssl": 1, "finetune": 1}
    assert resumed.accuracy == pytest.approx(straight.accuracy)
    for k, v in straight.sparse_model.state_dict().items():
        torch.testing.assert_close(resumed.sparse_model.state_dict()[k], v)


def test_resume_in_finetuning_rebuilds_the_compact_model(tmp_path):
    engine.run(tiny(), run_dir=tmp_path, progress=False, stop_after="compact")
    resumed = engine.run(tiny(), run_dir=tmp_path, progress=False, resume=True)
    assert resumed.epochs_trained == {"baseline": 0, "ssl": 0, "finetune": 1}
    assert sum(p.numel() for p in resumed.compact_model.parameters()) < 431_080


def test_corrupt_checkpoint_is_a_checkpoint_error_on_resume(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint"):
        engine.run(tiny(), run_dir=tmp_path, progress=False, resume=True)


def test_truncated_checkpoint_is_a_checkpoint_error_on_resume(tmp_path):
    engine.run(tiny(), run_dir=tmp_path, progress=False, stop_after="baseline")
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        engine.run(tiny(), run_dir=tmp_path, progress=False, resume=True)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    engine.run(tiny("baseline.epochs=0", "ssl.epochs=0", "finetune.epochs=0"), run_dir=tmp_path,
               progress=False, stop_after="baseline")
    other = tiny("model.name=mlp", "ssl.kinds=[neuron]", "ssl.strength=0.1")
    with pytest.raises(CheckpointError, match="another --out folder"):
        engine.run(other, run_dir=tmp_path, progress=False, resume=True)


def test_multiplier_for_a_missing_layer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'conv1'"):
        engine.run(tiny("baseline.epochs=0", "ssl.multipliers={conv_1: 2.0}"), run_dir=tmp_path, progress=False)


def test_subgradient_mode_and_mlp_neurons(tmp_path):
    recipe = tiny("model.name=mlp", "ssl.kinds=[neuron]", "ssl.strength=0.05", "ssl.mode=subgradient",
                  "compact.shapes=off")
    result = engine.run(recipe, run_dir=tmp_path, progress=False)
    assert result.finished and math.isfinite(result.history[1].train_loss)
    assert "neuron" in result.history[1].zero_fraction


def test_a_fresh_run_does_not_mix_with_an_earlier_one(tmp_path):
    engine.run(tiny(), run_dir=tmp_path, progress=False)
    again = engine.run(tiny(), run_dir=tmp_path, progress=False, stop_after="baseline", overwrite=True)
    assert again.sparse_model is None and again.compact_model is None
    assert not (tmp_path / "compact.pt").exists() and [r.phase for r in again.history] == ["baseline"]


def _kl(teacher, student, x) -> float:
    """Mean KL(teacher ‖ student) of the two models' class distributions on ``x``."""
    with torch.no_grad():
        return float(torch.nn.functional.kl_div(student.eval()(x).log_softmax(-1), teacher.eval()(x).log_softmax(-1),
                                                reduction="batchmean", log_target=True))


def test_finetuning_distills_from_the_runs_dense_model(tmp_path):
    engine.run(tiny(), run_dir=tmp_path / "plain", progress=False, stop_after="compact")
    shutil.copytree(tmp_path / "plain", tmp_path / "distilled")
    images = load_task(tiny()).splits["test"][0]
    kl = {}
    for name, extra in (("plain", []), ("distilled", ["finetune.distill={alpha: 0.9, temperature: 2}"])):
        result = engine.run(tiny("finetune.lr=0.05", "finetune.epochs=2", *extra), run_dir=tmp_path / name,
                            progress=False, resume=True)
        kl[name] = _kl(result.dense_model, result.compact_model, images)
    assert kl["distilled"] < 0.7 * kl["plain"]


def test_a_missing_teacher_is_a_checkpoint_error_that_says_what_to_set(tmp_path):
    recipe = tiny(f"ssl.distill={{alpha: 0.5, teacher: {tmp_path / 'dense.pt'}}}")
    with pytest.raises(CheckpointError, match=r"dense\.pt, which is missing; set ssl\.distill\.teacher"):
        engine.run(recipe, run_dir=tmp_path / "run", progress=False)


def test_resuming_a_checkpoint_from_before_a_recipe_key_existed_does_not_warn(tmp_path, caplog):
    engine.run(tiny(), run_dir=tmp_path, progress=False, stop_after="baseline")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    for phase in ("baseline", "ssl", "finetune"):
        del state["recipe"][phase]["distill"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with caplog.at_level("WARNING", logger="torchslim.train.engine"):
        engine.run(tiny(), run_dir=tmp_path, progress=False, resume=True, stop_after="ssl")
    assert "differs" not in caplog.text


def test_a_teacher_can_be_any_model_file_the_library_writes(tmp_path):
    first = engine.run(tiny(), run_dir=tmp_path, progress=False)
    torch.save(first.dense_model.state_dict(), tmp_path / "dense_state.pt")
    x = first.example
    for name, model in (("compact.pt", first.compact_model), ("baseline.pt", first.dense_model),
                        ("dense_state.pt", first.dense_model)):
        torch.testing.assert_close(rundir.load_model_file(tmp_path / name, tiny()).eval()(x), model.eval()(x))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a model file torchslim reads"):
        rundir.load_model_file(tmp_path / "junk.pt", tiny())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole tiny run, for branches to start from."""
    path, threads = tmp_path_factory.mktemp("source"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine.run(tiny(), run_dir=path, progress=False)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.mark.parametrize("change, trained", [
    ("finetune.lr=0.02", {"baseline": 0, "ssl": 0, "finetune": 1}),
    ("compact.shapes=off", {"baseline": 0, "ssl": 0, "finetune": 1}),
    ("ssl.strength={channel: 0.02, shape: 0.02}", {"baseline": 0, "ssl": 1, "finetune": 1}),
], ids=["finetune", "compact", "ssl"])
def test_a_branch_trains_only_what_differs_and_ends_as_a_straight_run(tmp_path, finished_run, change, trained):
    straight = engine.run(tiny(change), run_dir=tmp_path / "straight", progress=False)
    branch = engine.run(tiny(change), run_dir=tmp_path / "branch", progress=False, branch_from=finished_run)
    assert branch.finished and branch.epochs_trained == trained
    assert [r.phase for r in branch.history] == ["baseline", "ssl", "finetune"]
    assert (tmp_path / "branch" / "baseline.pt").is_file()  # the default distillation teacher is there too
    # LeNet has no dropout and each epoch's batches are seeded: the branch trains as the straight run did
    assert branch.accuracy == pytest.approx(straight.accuracy)
    for k, v in straight.compact_model.state_dict().items():
        torch.testing.assert_close(branch.compact_model.state_dict()[k], v)
    again = engine.run(tiny(change), run_dir=tmp_path / "branch", progress=False, resume=True,
                       branch_from=finished_run)
    assert again.epochs_trained == {"baseline": 0, "ssl": 0, "finetune": 0}  # resume wins over the branch


def test_a_branch_of_the_same_recipe_copies_the_finished_run(tmp_path, finished_run):
    branch = engine.run(tiny(), run_dir=tmp_path, progress=False, branch_from=finished_run)
    assert branch.finished and branch.epochs_trained == {"baseline": 0, "ssl": 0, "finetune": 0}
    assert branch.accuracy == pytest.approx(json.loads((finished_run / "results.json").read_text())["accuracy"])


def test_branch_errors_say_what_is_missing(tmp_path, finished_run):
    with pytest.raises(ConfigError, match="baseline on"):
        engine.run(tiny("baseline.lr=0.1"), run_dir=tmp_path / "a", progress=False, branch_from=finished_run)
    with pytest.raises(ConfigError, match="differ in data"):
        engine.run(tiny("data.train_limit=256"), run_dir=tmp_path / "a", progress=False, branch_from=finished_run)
    with pytest.raises(ConfigError, match="itself"):
        engine.run(tiny(), run_dir=finished_run, progress=False, branch_from=finished_run)
    with pytest.raises(CheckpointError, match="does not exist"):
        engine.run(tiny(), run_dir=tmp_path / "a", progress=False, branch_from=tmp_path / "nowhere")
    engine.run(tiny(), run_dir=tmp_path / "dense", progress=False, stop_after="baseline")
    with pytest.raises(CheckpointError, match=r"not finished its ssl step \(sparse.pt missing\).*--stop-after ssl"):
        engine.run(tiny("compact.shapes=off"), run_dir=tmp_path / "a", progress=False, branch_from=tmp_path / "dense")
    assert (finished_run / "compact.pt").is_file()  # a refused branch removed nothing


def test_an_ssl_phase_that_zeroed_nothing_warns_what_to_raise(tmp_path, caplog):
    with caplog.at_level("INFO", logger="torchslim.train.phases"):
        engine.run(tiny("ssl.strength={channel: 0, shape: 0}"), run_dir=tmp_path, progress=False,
                   stop_after="compact")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("SSL zeroed none" in w and "ssl.strength" in w and "ssl.epochs" in w for w in warnings), warnings
    assert "compact: nothing to remove" in caplog.text and "compacted:" not in caplog.text


def test_an_ssl_phase_that_zeroed_groups_does_not_warn(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="torchslim.train.phases"):
        engine.run(tiny(), run_dir=tmp_path, progress=False, stop_after="ssl")
    assert "zeroed none" not in caplog.text
