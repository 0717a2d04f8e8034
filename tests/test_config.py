import pytest

from vitcompress.config import (
    MAX_YAML_NODES,
    as_patterns,
    build_config,
    check_int,
    check_number,
    load_yaml,
    parse_yaml,
)
from vitcompress.errors import VitcompressError
from vitcompress.steps.prune import PruneConfig
from vitcompress.steps.recipe import parse_recipe


def test_yaml_reads_exponents_as_numbers_in_recipes_and_studies():
    assert parse_yaml("lr: 1e-4\nb: 2E3\nc: 1.5\nd: '1e-4'") == {
        "lr": 1e-4, "b": 2000.0, "c": 1.5, "d": "1e-4",
    }  # fmt: skip
    # DESIGN.md's example recipe, which the recipe loader used to refuse (lr: 1e-4 was a string)
    recipe = parse_recipe(
        parse_yaml(
            """
name: deit-small-2of4-int8
steps:
  - prune:    {pattern: "2:4", method: magnitude, layers: "blocks.*"}
  - finetune: {epochs: 2, lr: 1e-4, distill: {teacher: self, kind: hard}}
  - quantize: {weights: int8, activations: int8, granularity: per_channel,
               calibration: {method: percentile, batches: 16}, attention_matmul: fp32}
"""
        )
    )
    assert recipe.steps[1].config.train.lr == 1e-4


def test_yaml_alias_bomb_and_self_reference_are_refused_before_anything_walks_them():
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 7):  # 10**7 values once expanded, from a few hundred bytes
        prev = chr(ord("a") + i - 1)
        levels.append(
            f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [" + ", ".join([f"*{prev}"] * 10) + "]"
        )
    text = "\n".join(levels)
    assert len(text) < 1000
    with pytest.raises(VitcompressError, match=f"more than {MAX_YAML_NODES:,} values"):
        parse_yaml(text, "bomb.yaml")
    with pytest.raises(VitcompressError, match="more than"):
        parse_yaml("a: &a [*a]", "loop.yaml")
    assert parse_yaml("a: &a [1, 2]\nb: *a") == {"a": [1, 2], "b": [1, 2]}  # plain aliases work


def test_yaml_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(VitcompressError, match="recipe not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml", "recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(VitcompressError, match="bad.yaml: not valid YAML") as e:
        load_yaml(bad)
    assert "\n" not in str(e.value)
    bad.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(VitcompressError, match="not valid YAML"):
        load_yaml(bad)


def test_build_config_names_unknown_keys_and_takes_layers_for_targets():
    cfg = build_config(PruneConfig, {"sparsity": 0.5, "layers": ["blocks.0.*"]}, "prune")
    assert cfg.targets == ("blocks.0.*",)
    with pytest.raises(VitcompressError, match="prune: unknown key 'sparsty'; valid keys: "):
        build_config(PruneConfig, {"sparsty": 0.5}, "prune")
    with pytest.raises(VitcompressError, match="give 'layers' or 'targets', not both"):
        build_config(PruneConfig, {"sparsity": 0.5, "layers": "a", "targets": "b"}, "prune")
    with pytest.raises(VitcompressError, match="expected a mapping"):
        build_config(PruneConfig, [0.5], "prune")


def test_value_checks():
    assert as_patterns(["a", "re:b.*"], "x") == ("a", "re:b.*")
    with pytest.raises(VitcompressError, match="bad regular expression"):
        as_patterns("re:(", "x")
    with pytest.raises(VitcompressError, match="x must be an integer >= 1, got True"):
        check_int(True, "x", 1)
    with pytest.raises(VitcompressError, match="x must be a number > 0, got nan"):
        check_number(float("nan"), "x", positive=True)
    check_int(None, "x", 1, optional=True)
