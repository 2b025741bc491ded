"""Tasks: the engine trains a word LM on PTB-format files and a force-regularized, decomposed LeNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support import needs_fashion_mnist

import torchslim.train.engine as engine
from torchslim import LowRank, verify
from torchslim.deploy.serialize import load_compact
from torchslim.errors import ConfigError
from torchslim.train.recipes import load_recipe
from torchslim.train.tasks import TextTask, load_task, random_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _ptb(folder: Path, lines: int = 600) -> Path:
    """PTB-format files of a learnable toy language: cycles of 9 words with one random word in 8."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(30)]
    for split, n in (("train", lines), ("valid", lines // 6), ("test", lines // 6)):
        out = []
        for _ in range(n):
            start = int(torch.randint(0, 9, (1,), generator=gen))
            ids = [(start + k) % 9 if torch.rand(1, generator=gen) > 0.125 else int(torch.randint(9, 30, (1,),
                   generator=gen)) for k in range(8)]
            out.append(" ".join(words[i] for i in ids))
        (folder / f"ptb.{split}.txt").write_text("\n".join(out) + "\n")
    return folder


LM = [
    "data.name=ptb", "batch_size=8", "eval_batch_size=4", "data.bptt=12",
    "model.kwargs={vocab_size: 32, hidden_size: 24, num_layers: 2, dropout: 0.0, per_layer: true}",
    "baseline.epochs=3", "baseline.lr=20.0", "ssl.epochs=2", "ssl.lr=10.0", "ssl.strength={hidden: 2.0e-3}",
    "finetune.epochs=1", "finetune.lr=2.0",
]


def test_engine_trains_iss_on_a_word_lm_and_reports_perplexity(tmp_path):
    data = _ptb(tmp_path / "ptb", lines=600)
    recipe = load_recipe("kjv_lm_iss", overrides=LM)
    result = engine.run(recipe, data_dir=data, run_dir=tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["perplexity"]["baseline"] < 12 < 32                    # far below the 32-word uniform rate
    assert saved["perplexity"]["compact"] == pytest.approx(saved["perplexity"]["ssl"], rel=1e-4)
    assert saved["perplexity"] == pytest.approx({k: math.exp(v) for k, v in result.loss.items()})
    sizes = [layer.hidden_size for layer in result.compact_model.layers]
    assert max(sizes) < 24 and result.compact_model.encoder.embedding_dim == sizes[-1]   # units removed per layer
    x = result.example
    assert x.shape == (12, 4) and x.dtype == torch.long
    back = load_compact(tmp_path / "run" / "compact.pt")
    assert verify(result.compact_model, back, x).ok


@pytest.mark.parametrize("lam", [2.0e-2, 1.0e-4])  # λ alone leaves 1 unit per layer, or all 24
def test_keep_ends_iss_at_the_budget_in_every_layer(tmp_path, lam):
    data = _ptb(tmp_path / "ptb", lines=200)
    recipe = load_recipe("kjv_lm_iss", overrides=[
        *LM, "baseline.epochs=1", f"ssl.strength={{hidden: {lam}}}", "ssl.keep=0.5", "finetune.epochs=0"])
    result = engine.run(recipe, data_dir=data, run_dir=tmp_path / "run", progress=False)
    assert [layer.hidden_size for layer in result.compact_model.layers] == [12, 12]
    assert result.loss["compact"] == pytest.approx(result.loss["ssl"], rel=1e-5)  # cut before the last evaluation


def test_a_phase_dropout_replaces_the_models_for_that_phase(tmp_path):
    data = _ptb(tmp_path / "ptb", lines=200)
    recipe = load_recipe("kjv_lm_iss", overrides=[
        *LM, "model.kwargs.dropout=0.5", "baseline.epochs=1", "ssl.epochs=1", "ssl.strength={hidden: 1.0e-4}",
        "finetune.dropout=0.0"])
    result = engine.run(recipe, data_dir=data, run_dir=tmp_path / "run", progress=False)
    assert min(layer.hidden_size for layer in result.compact_model.layers) > 0
    x = result.example
    with torch.no_grad():
        dense, small = result.dense_model.train(), result.compact_model.train()
        assert not torch.equal(dense(x), dense(x))           # the baseline kept the model's dropout 0.5
        torch.testing.assert_close(small(x), small(x))       # fine-tuning ran without dropout


def test_text_task_rejects_a_model_of_another_vocabulary(tmp_path):
    data = _ptb(tmp_path, lines=60)
    recipe = load_recipe("kjv_lm_iss", overrides=[*LM, "model.kwargs.vocab_size=100"])
    with pytest.raises(ConfigError, match="vocab_size: 32"):
        load_task(recipe, data)


def test_text_task_batches_columns_and_random_inputs_are_tokens(tmp_path):
    recipe = load_recipe("kjv_lm_iss", overrides=LM)
    task = load_task(recipe, _ptb(tmp_path, lines=60))
    assert isinstance(task, TextTask) and task.columns["train"].shape[1] == 8
    assert task.steps_per_epoch() == math.ceil((len(task.columns["train"]) - 1) / 12)
    tokens = random_inputs(recipe, batch=3)
    assert tokens.shape == (12, 3) and int(tokens.max()) < 32


@needs_fashion_mnist
def test_engine_force_then_lowrank_decomposes_and_fine_tunes(tmp_path):
    recipe = load_recipe("lenet_force_lowrank", overrides=[
        "data.train_limit=512", "data.test_limit=256", "data.valid_size=128", "eval_batch_size=256",
        "baseline.epochs=1", "baseline.lr=0.05", "baseline.force.strength=1e-2", "finetune.epochs=1",
        "lowrank.energy=0.5"])
    result = engine.run(recipe, run_dir=tmp_path, progress=False)
    rows = {r["name"]: r for r in result.lowrank}
    assert set(rows) == {"conv1", "conv2", "fc1", "fc2"} and rows["fc1"]["decomposed"]
    small = result.compact_model
    assert isinstance(small.fc1, LowRank) and small.fc1.rank == rows["fc1"]["rank"] < 500
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["lowrank"] == result.lowrank and "finetune" in saved["accuracy"]
    assert isinstance(load_compact(tmp_path / "compact.pt").fc1, LowRank)


@needs_fashion_mnist
def test_force_epochs_stops_the_force_after_that_many_epochs(tmp_path):
    def weights(*overrides: str) -> dict[str, torch.Tensor]:
        recipe = load_recipe("lenet_force_lowrank", overrides=[
            "data.train_limit=256", "data.test_limit=128", "data.valid_size=0", "eval_batch_size=128",
            "baseline.epochs=2", "baseline.lr=0.05", "baseline.force.strength=1e-2", *overrides])
        out = tmp_path / "_".join(overrides).replace("=", "")
        return engine.run(recipe, run_dir=out, progress=False, stop_after="baseline").dense_model.state_dict()

    plain = weights("baseline.force.strength=0")
    off = weights("baseline.force.epochs=0")
    first = weights("baseline.force.epochs=1")
    always = weights("baseline.force.epochs=2")
    assert all(torch.equal(plain[k], off[k]) for k in plain)  # a force stopped before it starts is no force
    assert not torch.equal(first["fc1.weight"], always["fc1.weight"])  # fc1: the layer the recipe forces
    assert not torch.equal(first["fc1.weight"], plain["fc1.weight"])


@needs_fashion_mnist
def test_engine_rank_lasso_while_fine_tuning_cuts_zero_ranks(tmp_path):
    recipe = load_recipe("lenet_lowrank", overrides=[
        "data.train_limit=512", "data.test_limit=256", "data.valid_size=128", "eval_batch_size=256",
        "baseline.epochs=1", "baseline.lr=0.05", "finetune.epochs=1", "finetune.lr=0.05",
        "lowrank.energy=0.9", "lowrank.lasso=0.5"])
    result = engine.run(recipe, run_dir=tmp_path, progress=False)
    rows = [r for r in result.lowrank if r["decomposed"]]
    assert rows and all(r["rank_final"] <= r["rank"] for r in rows)
    assert any(r["rank_final"] < r["rank"] for r in rows)  # the Lasso zeroed some components, compact cut them
    small = load_compact(tmp_path / "compact.pt")
    for r in rows:
        assert small.get_submodule(r["name"]).rank == r["rank_final"]
    # the saved model is the one that was evaluated: cutting zero ranks is exact
    loss, acc = load_task(recipe, None).evaluate(small, "test")
    assert acc == pytest.approx(result.accuracy["finetune"])
    assert result.history[-1].alive  # fine-tuning records the rank groups alive
