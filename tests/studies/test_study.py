"""Reading a study: built-in names, one-line errors for bad studies, frozen results."""

import dataclasses
from pathlib import Path

import pytest

import vitcompress.studies
from vitcompress.errors import VitcompressError
from vitcompress.studies import BUILTIN, expand_study, load_study


@pytest.mark.parametrize(
    "text,match",
    [
        ("models: {v: {preset: vit-nano}}\nrecipes: []\nsteps: 1\n", r"unknown key 'steps'"),
        ("models: {v: {preset: vit-nano, epoch: 2}}\nrecipes: [{name: a, steps: "
         "[quantize: {}]}]\n", r"models\.v: unknown key 'epoch'"),
        ("models: {v: {preset: vit-giant}}\nrecipes: [{name: a, steps: [quantize: {}]}]\n",
         r"unknown preset 'vit-giant'"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, stesp: []}]\n",
         r"recipe 'a': unknown key 'stesp'"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [prune: {sparsity: $s}]}]\n",
         r"\$s is not an axis"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a$s, grid: {s: [1, 2], t: [3]}, "
         "steps: [prune: {sparsity: $s}]}]\n", r"grid axis 't' is used nowhere"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [prune: {sparsty: 0.5}]}]\n",
         r"recipe 'a': step 1 \(prune\): unknown key 'sparsty'"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [prune: {sparsity: 1.5}]}]\n",
         r"recipe 'a'.*sparsity"),
        ("models: {v: {preset: vit-nano, teacher: nobody}}\nrecipes: [{name: a, steps: "
         "[quantize: {}]}]\n", r"teacher 'nobody' is neither"),
        ("models: [vit-nano]\nrecipes: [{name: a, steps: [quantize: {}]}]\n",
         r"'models' must be a non-empty mapping"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [quantize: {}]}, "
         "{name: a, steps: [quantize: {}]}]\n", r"comes out twice"),
        ("models: {v: {preset: vit-nano}\nrecipes: [\n", r"not valid YAML"),
        ("models: {v: {preset: vit-nano, amp: fp8}}\nrecipes: [{name: a, steps: "
         "[quantize: {}]}]\n", r"models\.v: amp must be one of null, bf16, fp16"),
    ],
)  # fmt: skip
def test_malformed_study_is_one_line_error_naming_file_and_key(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(VitcompressError, match=match) as e:
        expand_study(p)
    assert "\n" not in str(e.value)
    assert str(p) in str(e.value)


def test_study_not_found_names_builtins(tmp_path):
    with pytest.raises(VitcompressError, match="built-in: smoke, seed, seed-scratch, seed-full"):
        load_study(tmp_path / "nope.yaml")


def test_builtin_studies_are_package_files():
    for name in BUILTIN:
        doc, src = load_study(name)
        assert Path(src).is_file() and Path(src).parent.name == "builtin"
        assert doc["name"] == name


def test_an_expanded_study_is_read_only():
    st = expand_study("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.runs[0].id = "other"
    with pytest.raises(TypeError):
        st.baselines["x"] = st.baselines[st.runs[0].baseline]
    with pytest.raises(TypeError):
        st.resources["cpus"] = 4
    assert isinstance(st.runs, tuple)


def test_every_public_name_resolves():
    assert sorted(vitcompress.studies.__all__) == sorted(vitcompress.studies._EXPORTS)
    for name in vitcompress.studies.__all__:
        assert getattr(vitcompress.studies, name) is not None
    with pytest.raises(AttributeError):
        vitcompress.studies.no_such_name  # noqa: B018


def test_an_existing_run_takes_a_teacher_for_its_fine_tunes(tmp_path):
    import json

    from vitcompress.models import model_config
    from vitcompress.zoo import ZOO_DIR

    run = tmp_path / "my-deit"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": model_config("deit-nano",
                                                                        in_chans=1)}))  # fmt: skip
    doc = {
        "teachers": {"cnn": {"run": "zoo:resnet-micro-fmnist"}},
        "models": {"d": {"run": str(run), "teacher": "cnn", "distill": "soft"},
                   "plain": {"run": str(run)}},
        "recipes": [{"name": "ft", "steps": [{"prune": {"sparsity": 0.5}},
                                             {"finetune": {"max_steps": 3,
                                                           "distill": "$distill"}}]}],
    }  # fmt: skip
    st = expand_study(doc)
    d, plain = (next(r for r in st.runs if r.model == m) for m in ("d", "plain"))
    cnn = next(h for h, b in st.baselines.items() if b.label == "cnn")
    assert d.recipe["steps"][1]["finetune"]["distill"] == {"teacher": f"@baseline:{cnn}",
                                                           "kind": "soft"}  # fmt: skip
    assert plain.recipe["steps"][1]["finetune"]["distill"] is None
    assert d.baseline != plain.baseline  # one run, two baselines: with and without a teacher
    assert st.baselines[cnn].directory(tmp_path) == ZOO_DIR / "resnet-micro-fmnist"
    # a shipped model is named by its zoo name and weights, not where the package is installed
    ident = vitcompress.studies.study._run_identity("zoo:resnet-micro-fmnist",
                                                    ZOO_DIR / "resnet-micro-fmnist")  # fmt: skip
    assert ident.startswith("zoo:resnet-micro-fmnist@") and str(ZOO_DIR) not in ident
    with pytest.raises(VitcompressError, match="distill needs a teacher"):
        expand_study({**doc, "models": {"x": {"run": str(run), "distill": "hard"}}})
