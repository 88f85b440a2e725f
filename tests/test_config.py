"""Configs: typed fields, unknown keys with the nearest valid key, bad values with the expected type, recipes."""

from __future__ import annotations

import pytest
import yaml

from posttrain.config import EvalConfig, SFTConfig, build_config
from posttrain.errors import ConfigError
from posttrain.pipeline import load_recipe, stage_config


def test_values_are_typed_and_ints_widen_to_floats():
    cfg = build_config(SFTConfig, {"lr": 1, "lora_targets": "q_proj,v_proj", "resume": True}, path="sft")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.resume is True


def test_config_is_frozen():
    cfg = build_config(SFTConfig, {}, path="sft")
    with pytest.raises(AttributeError):
        cfg.lr = 2.0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"batchsize": 8}, "sft.batchsize: unknown key (did you mean 'batch_size'?)"),
        ({"max_steps": "ten"}, "sft.max_steps: expected an integer, got 'ten'"),
        ({"max_steps": 2.5}, "sft.max_steps: expected an integer, got 2.5"),
        ({"resume": "yes"}, "sft.resume: expected true or false, got 'yes'"),
        ({"schedule": "exp"}, "sft.schedule: expected one of 'cosine', 'linear', 'constant', got 'exp'"),
        ({"lr": True}, "sft.lr: expected a number, got True"),
    ],
)
def test_bad_keys_and_values_name_the_path(values, message):
    with pytest.raises(ConfigError) as err:
        build_config(SFTConfig, values, path="sft")
    assert str(err.value) == message


def test_every_field_is_documented():
    import dataclasses

    for cls in (SFTConfig, EvalConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no documentation"


def test_recipe_overrides_and_paths(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "sft", "lr": 0.1}]}))
    recipe = load_recipe(path, ["sft.lr=0.5", "sft.max_steps=7"])
    kind, cfg = stage_config(recipe["stages"][0], index=0, out=tmp_path, previous_model="prev/final")
    assert kind == "sft" and cfg.lr == 0.5 and cfg.max_steps == 7
    assert cfg.model == "prev/final" and cfg.out == str(tmp_path / "sft")
    with pytest.raises(ConfigError, match="no such stage"):
        load_recipe(path, ["rl.lr=1"])


def test_recipe_stage_errors_name_the_stage(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "sft", "lerning_rate": 0.1}]}))
    recipe = load_recipe(path)
    with pytest.raises(ConfigError, match=r"stages\[0\]\(sft\)\.lerning_rate: unknown key"):
        stage_config(recipe["stages"][0], index=0, out=tmp_path, previous_model=None)
    path.write_text("stages: []")
    with pytest.raises(ConfigError, match="non-empty 'stages'"):
        load_recipe(path)


def test_recipe_search_section_errors_name_the_entry(tmp_path):
    from posttrain.pipeline import search_configs

    recipe = {"evaluate": {"tasks": ["arithmetic"]}, "stages": [{"name": "sft"}]}
    recipe["search"] = {"limit": 5, "strategies": [{"strategy": "greedy"}, {"strategy": "beam", "widht": 4}]}
    with pytest.raises(ConfigError, match=r"search.strategies\[1\].widht: unknown key"):
        search_configs(recipe)
    recipe["search"] = {"strategies": [{"strategy": "beam", "n": 4}]}
    assert [(c.strategy, c.n, c.task) for c in search_configs(recipe)] == [("beam", 4, "arithmetic")]
    recipe["search"] = {"strategy": "beam"}
    with pytest.raises(ConfigError, match="search: expected"):
        search_configs(recipe)


def test_recipe_stage_refers_to_an_earlier_stage_result(tmp_path):
    stage = {"name": "ppo", "type": "ppo", "reward": ["rm:@rm", "format"], "lr": 1e-4}
    kind, cfg = stage_config(
        stage, index=3, out=tmp_path, previous_model="runs/sft/final", artifacts={"rm": "runs/rm/final"}
    )
    assert kind == "ppo" and cfg.reward == ["rm:runs/rm/final", "format"] and cfg.model == "runs/sft/final"
    with pytest.raises(ConfigError, match=r"stages\[3\].type: unknown stage type 'ppx' \(choose one of .*ppo"):
        stage_config({"name": "ppx"}, index=3, out=tmp_path, previous_model=None)
