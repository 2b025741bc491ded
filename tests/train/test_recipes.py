"""Recipes: YAML → typed dataclasses, dotted overrides, errors that name the key and the options."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchslim.errors import ConfigError
from torchslim.train.recipes import (
    PhaseSpec,
    Recipe,
    SSLSpec,
    apply_overrides,
    available_recipes,
    load_recipe,
    recipe_from_dict,
)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_parses_and_round_trips(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert isinstance(recipe.ssl, SSLSpec) and isinstance(recipe.baseline, PhaseSpec)
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_demo_recipe_values_are_typed():
    recipe = load_recipe("lenet_ssl")
    assert recipe.model.name == "lenet" and recipe.data.name == "fashion-mnist"
    assert recipe.data.train_limit is None
    assert isinstance(recipe.baseline.lr, float) and isinstance(recipe.ssl.epochs, int)
    assert set(recipe.ssl.strength) == set(recipe.ssl.kinds)
    assert recipe.compact.shapes == "crop"


def test_available_recipes_lists_the_shipped_ones():
    assert {"lenet_ssl", "lenet_ssl_full", "mlp_ssl", "resnet20_ssl"} <= set(available_recipes())


def test_load_from_a_yaml_path_uses_defaults_and_the_file_stem(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("ssl: {epochs: 1, kinds: [channel], strength: 0.001}\n")
    recipe = load_recipe(path)
    assert recipe.name == "tiny"
    assert recipe.ssl.epochs == 1 and recipe.ssl.strength == 0.001
    assert recipe.baseline == Recipe().baseline


def test_overrides_are_dotted_and_yaml_parsed():
    recipe = load_recipe("lenet_ssl", overrides=[
        "ssl.epochs=1", "data.train_limit=512", "ssl.strength.channel=1e-3",  # YAML 1.1: "1e-3" is a string
        "ssl.mode=subgradient", "baseline.lr_schedule=constant", "model.kwargs.num_classes=10",
    ])
    assert recipe.ssl.epochs == 1
    assert recipe.data.train_limit == 512
    assert recipe.ssl.strength["channel"] == pytest.approx(1e-3)
    assert recipe.ssl.mode == "subgradient"
    assert recipe.baseline.lr_schedule == "constant"
    assert recipe.model.kwargs == {"num_classes": 10}


def test_override_of_a_list_and_back_to_null():
    recipe = load_recipe("lenet_ssl", overrides=[
        "ssl.kinds=[channel]", "ssl.strength=0.002", "data.train_limit=100", "data.train_limit=null",
    ])
    assert recipe.ssl.kinds == ["channel"] and recipe.ssl.strength == 0.002
    assert recipe.data.train_limit is None


def test_apply_overrides_does_not_change_its_input():
    raw = {"ssl": {"epochs": 3}}
    out = apply_overrides(raw, ["ssl.epochs=1", "finetune.lr=0.1"])
    assert raw == {"ssl": {"epochs": 3}}
    assert out == {"ssl": {"epochs": 1}, "finetune": {"lr": 0.1}}


@pytest.mark.parametrize("override, words", [
    ("ssl.epoch=1", ["ssl.epoch", "did you mean 'epochs'"]),
    ("baseline.learning_rate=0.1", ["baseline.learning_rate", "valid keys", "lr"]),
    ("sssl.epochs=1", ["sssl", "did you mean 'ssl'"]),
])
def test_unknown_key_names_it_and_suggests(override, words):
    with pytest.raises(ConfigError) as info:
        load_recipe("lenet_ssl", overrides=[override])
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("override, words", [
    ("compact.shapes=cropp", ["compact.shapes", "did you mean 'crop'", "lowered"]),
    ("ssl.mode=proximal", ["ssl.mode", "prox", "subgradient"]),
    ("ssl.kinds=[channel, filterz]", ["ssl.kinds[1]", "did you mean 'filter'"]),
    ("baseline.lr=-1", ["baseline.lr", "> 0"]),
    ("ssl.epochs=two", ["ssl.epochs", "integer"]),
    ("finetune.momentum=1.5", ["finetune.momentum", "[0.0, 1.0)"]),
    ("finetune.dropout=1", ["finetune.dropout", "[0.0, 1.0)"]),
    ("ssl.keep=1.5", ["ssl.keep", "(0, 1]"]),
    ("ssl.keep=0", ["ssl.keep", "(0, 1]"]),
    ("ssl.keep={filter: 0.5}", ["ssl.keep.filter", "not in kinds"]),
    ("ssl.keep_ramp=0.5", ["ssl.keep_ramp", "needs keep"]),
    ("ssl.keep_ramp=2", ["ssl.keep_ramp", "[0, 1]"]),
    ("ssl.keep_cut=step", ["ssl.keep_cut", "needs keep"]),
    ("ssl.keep_cut=always", ["ssl.keep_cut", "end", "step"]),
    ("batch_size=0", ["batch_size", ">= 1"]),
    ("ssl.strength.filter=0.1", ["ssl.strength.filter", "not in kinds"]),
    ("ssl.weight_by_size=maybe", ["ssl.weight_by_size", "true or false"]),
    ("baseline.force.kind=l3", ["baseline.force.kind", "l2", "l1"]),
    ("baseline.force.strength=-1", ["baseline.force.strength", ">= 0"]),
    ("baseline.force.epochs=-2", ["baseline.force.epochs", ">= 0"]),
    ("lowrank.energy=1.5", ["lowrank.energy", "(0, 1]"]),
    ("lowrank.method=qr", ["lowrank.method", "pca", "svd"]),
    ("lowrank.lasso=1e-3", ["lowrank.lasso", "lowrank.energy"]),
    ("data.bptt=0", ["data.bptt", ">= 1"]),
    ("finetune.distill.alpha=1.5", ["finetune.distill.alpha", "[0, 1]"]),
    ("finetune.distill.temperature=0", ["finetune.distill.temperature", "> 0"]),
    ("baseline.distill.alpha=0.5", ["baseline.distill.teacher", "trained model file"]),
])
def test_bad_values_name_the_key_and_the_valid_options(override, words):
    with pytest.raises(ConfigError) as info:
        load_recipe("lenet_ssl", overrides=[override])
    for word in words:
        assert word in str(info.value)


def test_distilling_from_the_runs_own_dense_model_needs_a_baseline():
    with pytest.raises(ConfigError, match="baseline.epochs is 0; train a baseline or set finetune.distill.teacher"):
        load_recipe("lenet_ssl", overrides=["baseline.epochs=0", "finetune.distill.alpha=0.5"])
    recipe = load_recipe("lenet_ssl", overrides=["baseline.epochs=0", "finetune.distill={alpha: 0.5, teacher: t.pt}"])
    assert recipe.finetune.distill.teacher == "t.pt"


def test_strength_mapping_must_cover_every_kind():
    with pytest.raises(ConfigError, match="no value for kind 'shape'"):
        load_recipe("lenet_ssl", overrides=["ssl.kinds=[channel, shape]", "ssl.strength={channel: 0.001}"])


def test_malformed_override_says_how_to_write_it():
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe("lenet_ssl", overrides=["ssl.epochs"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_recipe("lenet_ssl", overrides=["ssl.epochs.x=1"])
    with pytest.raises(ConfigError, match="space after each ':'"):
        load_recipe("lenet_ssl", overrides=["ssl.strength={channel:0.001}"])


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        load_recipe("lenet_sl")
    assert "did you mean 'lenet_ssl'" in str(info.value)
    assert "lenet_ssl_full" in str(info.value)


def test_broken_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("ssl: {epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(path)


def test_yaml_off_reads_as_the_off_option(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("compact: {shapes: off}\n")  # YAML 1.1 reads a bare off as false
    assert load_recipe(path).compact.shapes == "off"


# ---------------------------------------------------------------------------------------------
# base: a recipe that starts from another

RECIPES = Path(__file__).parents[2] / "recipes"


def _leaves(d, prefix=""):
    """``{"a.b": value}`` for every non-mapping value of a nested mapping."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _write(folder, name, text):
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_base_merges_mappings_key_by_key_and_replaces_lists_and_scalars(tmp_path):
    _write(tmp_path, "parent", "seed: 3\nmodel: {name: mlp, kwargs: {hidden: 8, depth: 2}}\n"
                               "ssl: {epochs: 4, kinds: [channel, shape], strength: {channel: 0.1, shape: 0.2}}\n")
    child = load_recipe(_write(tmp_path, "child", "base: parent\nmodel: {kwargs: {hidden: 16}}\n"
                                                  "ssl: {kinds: [channel], strength: 0.5}\n"))
    assert child.name == "child" and child.seed == 3
    assert child.model.name == "mlp" and child.model.kwargs == {"hidden": 16, "depth": 2}
    assert child.ssl.epochs == 4 and child.ssl.kinds == ["channel"] and child.ssl.strength == 0.5


def test_base_chains_and_takes_paths_relative_to_the_recipe(tmp_path):
    (tmp_path / "shared").mkdir()
    _write(tmp_path / "shared", "grand", "name: grand\nseed: 1\nbatch_size: 8\nbaseline: {epochs: 5, lr: 0.5}\n")
    _write(tmp_path / "shared", "mid", "name: mid\nbase: grand\nbaseline: {epochs: 3}\n")
    leaf = load_recipe(_write(tmp_path, "leaf", "base: shared/mid.yaml\nseed: 2\n"), overrides=["batch_size=16"])
    assert leaf.name == "leaf"  # neither base's name
    assert (leaf.seed, leaf.batch_size, leaf.baseline.epochs, leaf.baseline.lr) == (2, 16, 3, 0.5)


def test_a_shipped_base_is_found_by_name_from_any_folder(tmp_path):
    recipe = load_recipe(_write(tmp_path, "mine", "base: lenet_ssl\nssl: {epochs: 1}\n"))
    assert recipe.name == "mine"
    assert recipe.to_dict() == {**load_recipe("lenet_ssl", overrides=["ssl.epochs=1"]).to_dict(), "name": "mine"}


def test_a_base_cycle_names_the_files_and_the_available_recipes(tmp_path):
    _write(tmp_path, "a", "base: b\n")
    _write(tmp_path, "b", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml → base" in str(info.value) and "b.yaml" in str(info.value)
    assert "lenet_ssl" in str(info.value)
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(_write(tmp_path, "itself", "base: itself\n"))


def test_a_missing_base_names_the_chain_and_the_available_recipes(tmp_path):
    _write(tmp_path, "mid", "base: nowhere\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, "top", "base: mid\n"))
    message = str(info.value)
    assert "base 'nowhere'" in message and "top.yaml → base" in message and "mid.yaml" in message
    assert "lenet_ssl" in message and "mid" in message
    with pytest.raises(ConfigError, match="base 3 "):
        load_recipe(_write(tmp_path, "bad", "base: 3\n"))


def test_a_merged_recipe_is_validated_as_a_whole(tmp_path):
    _write(tmp_path, "parent", "ssl: {kinds: [channel, shape], strength: {channel: 0.1, shape: 0.2}}\n")
    with pytest.raises(ConfigError, match="strength.shape") as info:  # mappings merge: shape stays in strength
        load_recipe(_write(tmp_path, "child", "base: parent\nssl: {kinds: [channel], strength: {channel: 0.3}}\n"))
    assert "child.yaml → base" in str(info.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml") if "\nbase:" in "\n" + p.read_text()))
def test_a_shipped_recipe_with_a_base_is_its_base_with_the_keys_it_states(name):
    import yaml

    stated = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    base, own = _leaves(load_recipe(stated.pop("base")).to_dict()), _leaves(stated)
    recipe = _leaves(load_recipe(name).to_dict())

    def overridden(key):  # the child states this leaf, a mapping inside it, or a value that replaces it
        return any(key == o or o.startswith(key + ".") or key.startswith(o + ".") for o in own)

    assert recipe == {**{k: v for k, v in base.items() if not overridden(k)}, **own}
    assert any(base.get(key) != value for key, value in own.items() if key != "name")  # a real change


def test_long_kd_is_long_with_a_distilled_finetuning():
    long, kd = (_leaves(load_recipe(name).to_dict()) for name in ("kjv_lm_iss_650_long", "kjv_lm_iss_650_long_kd"))
    changed = {key for key in long if long[key] != kd[key]}
    assert changed == {"name", "finetune.distill.alpha"}
    assert kd["finetune.distill.alpha"] == 0.5


# ---------------------------------------------------------------------------------------------
# values are refused when the recipe loads, by the rules of the API that uses them


@pytest.mark.parametrize("override, key", [
    ("lowrank.energy=0", "lowrank.energy"),
    ("lowrank.ranks={conv1: 0}", "lowrank.ranks.conv1"),
    ("compact.channel_multiple=0", "compact.channel_multiple"),
    ("data.valid_size=-1", "data.valid_size"),
    ("data.train_limit=0", "data.train_limit"),
    ("data.test_limit=-5", "data.test_limit"),
    ("ssl.strength.channel=.nan", "ssl.strength.channel"),
    ("ssl.strength=.inf", "ssl.strength"),
    ("ssl.multipliers={conv1: .nan}", "ssl.multipliers.conv1"),
    ("ssl.threshold=.nan", "ssl.threshold"),
    ("baseline.force.strength=.nan", "baseline.force.strength"),
    ("baseline.force.multipliers={conv1: .inf}", "baseline.force.multipliers.conv1"),
    ("baseline.weight_decay=.nan", "baseline.weight_decay"),
    ("baseline.lr=.inf", "baseline.lr"),
    ("finetune.distill.temperature=.inf", "finetune.distill.temperature"),
    ("distributed.terngrad.clip_sigma=0", "distributed.terngrad.clip_sigma"),
    ("distributed.terngrad.clip_sigma=.nan", "distributed.terngrad.clip_sigma"),
])
def test_bad_values_are_refused_at_load_naming_the_key_once(override, key):
    with pytest.raises(ConfigError) as info:
        load_recipe("lenet_ssl", overrides=[override])
    message = str(info.value)
    assert f"'{key}'" in message
    section = key.split(".")[0]
    assert f"{section}.{section}." not in message


def test_values_the_api_accepts_load():
    recipe = load_recipe("lenet_ssl", overrides=["lowrank.energy=1.0", "finetune.distill={alpha: 1.0, teacher: t.pt}"])
    assert recipe.lowrank.energy == 1.0 and recipe.finetune.distill.alpha == 1.0


def _accepts(call) -> bool:
    try:
        call()
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("value", [0.0, -0.1, 1e-6, 0.5, 1.0, 1.000001, float("nan"), float("inf")])
def test_lowrank_energy_loads_exactly_when_lowrank_accepts_it(value):
    import torch

    from torchslim import lowrank

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    api = _accepts(lambda: lowrank(net, energy=value, require_saving=False))
    assert _accepts(lambda: load_recipe("lenet_ssl", overrides=[f"lowrank.energy={value}"])) == api


@pytest.mark.parametrize("value", [0.0, -1.0, 1e-3, float("nan"), float("inf")])
def test_force_strength_loads_exactly_when_the_force_accepts_it(value):
    import torch

    from torchslim.regularize.force import ForceRegularizer

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    api = _accepts(lambda: ForceRegularizer(net, value)) and _accepts(lambda: ForceRegularizer(net, 1.0,
                                                                                               multipliers={"0": value}))
    overrides = [f"baseline.force.strength={value}", f"baseline.force.multipliers={{conv1: {value}}}"]
    assert all(_accepts(lambda o=o: load_recipe("lenet_ssl", overrides=[o])) == api for o in overrides)


@pytest.mark.parametrize("name", ["lenet_ssl-2.v1", ".hidden", "A"])
def test_a_plain_recipe_name_loads(name):
    assert load_recipe("lenet_ssl", overrides=[f"name={name}"]).name == name


def test_terngrad_without_clipping_is_clip_sigma_inf():
    recipe = load_recipe("lenet_terngrad", overrides=["distributed.terngrad.clip_sigma=inf"])
    assert recipe.distributed.terngrad.clip_sigma == float("inf")
