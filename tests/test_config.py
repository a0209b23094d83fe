"""Recipes and overrides: typed, and every mistake names the key."""

import dataclasses
import re
from pathlib import Path

import pytest

from lmforge.config import from_dict, load_yaml, option, parse_overrides
from lmforge.errors import UserError
from lmforge.tasks import task_module
from lmforge.tasks.causal_lm import load_recipe


def test_overrides_take_natural_types_and_both_spellings():
    assert parse_overrides(["--train.lr", "0.001", "--model.num-layers=4", "--data.source", "x.txt"]) == {
        "train": {"lr": 1e-3},
        "model": {"num_layers": 4},
        "data": {"source": "x.txt"},
    }


def test_recipe_file_plus_overrides(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model:\n  num_layers: 3\ntrain:\n  max_steps: 10\n")
    recipe = load_recipe(recipe_file, parse_overrides(["--train.max_steps", "20", "--train.lr", "1e-3"]))
    assert (recipe.model.num_layers, recipe.train.max_steps, recipe.train.lr) == (3, 20, 1e-3)


def test_an_empty_override_clears_a_recipe_string(tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("train:\n  best_metric: valid_loss\n")
    for arguments in (["--train.best_metric="], ["--train.best_metric", ""]):
        assert load_recipe(recipe_file, parse_overrides(arguments)).train.best_metric == ""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--train.lrr", "1"], "unknown config key train.lrr"),
        (["--train.max_steps", "many"], "train.max_steps must be int"),
        (["--train.precision", "fp8"], "train.precision must be one of auto, fp32, bf16"),
        (["--model.num_heads", "3"], "hidden_size 256 must be divisible by num_heads 3"),
        (["--train.max_steps"], "needs a value"),
    ],
)
def test_mistakes_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_recipe(None, parse_overrides(overrides))


def test_missing_recipe_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_a_partial_section_keeps_the_recipes_own_defaults_for_that_section():
    @dataclasses.dataclass
    class Data:
        source: str = "builtin:reviews"
        limit: int = 0

    @dataclasses.dataclass
    class Recipe:
        data: Data = option(Data(source="qa.jsonl"), "data")

    assert from_dict(Recipe, {"data": {"limit": 5}}).data == Data(source="qa.jsonl", limit=5)


RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[path.name for path in RECIPES])
def test_every_shipped_recipe_is_a_valid_recipe_of_the_command_its_header_shows(path):
    # A recipe's header says how to run it; a key that drifted from its task's Recipe would only fail at run time.
    header = path.read_text()
    task = re.search(rf"--task (\w+) --config recipes/{re.escape(path.name)}", header)
    if task:
        from_dict(task_module(task.group(1)).TASK.Recipe, load_yaml(path))
    else:  # causal-LM pretraining, from `lmforge pretrain` or a benchmark
        assert re.search(rf"pretrain --config recipes/{re.escape(path.name)}|python bench/", header), path.name
        load_recipe(path)
