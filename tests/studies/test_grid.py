"""Grid expansion: stable run ids, the template syntax, ids pinned across versions."""

import pytest

from vitcompress.studies import expand_study
from vitcompress.studies.grid import label_of, product, resolve_teachers, teacher_hashes


def test_builtin_studies_expand_with_stable_ids(tmp_path):
    seed = expand_study("seed-scratch")
    again = expand_study("seed-scratch")
    assert len(seed.runs) == 46  # 38 of the two studies, 8 structured-pruning runs
    assert seed.run_ids() == again.run_ids()
    assert len(set(seed.run_ids())) == len(seed.run_ids())
    assert {r.model for r in seed.runs} == {"vit-nano", "deit-nano"}
    assert len(seed.baselines) == 3  # the teacher, ViT, DeiT
    smoke = expand_study("smoke")
    assert 3 <= len(smoke.runs) <= 8
    full = expand_study("seed-full", data="imagefolder:/data/RESISC45")
    assert {r.size for r in full.runs} == {"tiny", "small", "base"}
    assert all(r.data == "imagefolder:/data/RESISC45" for r in full.runs)
    # (test_kill_9_mid_sweep_then_resume checks that another process gives the same ids)
    moved = expand_study("seed-scratch", data="fashion-mnist:/elsewhere")
    assert not set(moved.run_ids()) & set(seed.run_ids())


def test_grid_syntax_substitutes_values_labels_and_builtins():
    doc = {
        "name": "g",
        "teachers": {"cnn": {"preset": "resnet-micro", "epochs": 1}},
        "models": {
            "v": {"preset": "vit-nano", "epochs": 1},
            "d": {"preset": "deit-nano", "epochs": 1, "teacher": "cnn", "distill": "soft"},
        },
        "recipes": [
            {
                "name": "s$sp-${q}",
                "grid": {"sp": [0.5, 0.75], "q": {"none": None, "i8": {"weights": "int8"}}},
                "steps": [
                    {"prune": {"sparsity": "$sp", "schedule": "cubic"}},
                    {"finetune": {"max_steps": 3, "distill": "$distill"}},
                    {"quantize": "$q"},
                ],
            },
            {"name": "svd", "models": ["v"], "steps": [{"lowrank": {"rank_ratio": 0.5}}]},
        ],
    }
    st = expand_study(doc)
    names = [(r.model, r.recipe_name) for r in st.runs]
    assert names == [
        ("v", "s0.5-none"), ("v", "s0.5-i8"), ("v", "s0.75-none"), ("v", "s0.75-i8"), ("v", "svd"),
        ("d", "s0.5-none"), ("d", "s0.5-i8"), ("d", "s0.75-none"), ("d", "s0.75-i8"),
    ]  # fmt: skip
    v, d = st.runs[1], st.runs[6]
    assert v.recipe["steps"][0] == {"prune": {"sparsity": 0.5, "schedule": "cubic"}}
    assert v.recipe["steps"][1]["finetune"]["distill"] is None  # no teacher: no distillation
    assert v.recipe["steps"][2] == {"quantize": {"weights": "int8"}}
    assert len(st.runs[0].recipe["steps"]) == 2  # the null quantize step is left out
    distill = d.recipe["steps"][1]["finetune"]["distill"]
    assert distill["kind"] == "soft" and distill["teacher"].startswith("@baseline:")
    assert st.baselines[d.baseline].teacher == distill["teacher"].split(":")[1]


# Recorded from the code before the studies/ split. A run id and a baseline hash are digests of
# the resolved run, so a change here renames runs: every user's next sweep would rerun from scratch.
PINNED = {
    ("seed-scratch", None): {  # the seed study before the zoo, renamed: its ids are kept
        "runs": ("vit-nano-dense-fp32-387900e2", "vit-nano-cubic96.875-int8-1f9c332b",
                 "deit-nano-cubic50-int8-00ddf184", "deit-nano-dynamic-int8-fc0261a9"),
        "baselines": ("5a7708d75249", "4859e0fc8ba1", "7df85f3f1f1c"),  # resnet, vit, deit
    },
    ("smoke", None): {
        "runs": ("vit-nano-fp32-206cf730", "vit-nano-fp16-c761610d", "vit-nano-int8-bb4cbfda",
                 "vit-nano-2of4-ft-int8-8e8790be", "vit-nano-cubic75-ft-f7d76f9d"),
        "baselines": ("8a1d005a7aee",),
    },
    ("seed-full", "imagefolder:/tmp/x"): {
        "runs": ("vit-tiny-dense-fp32-a8f33953", "vit-base-svd25-df71aecd",
                 "deit-small-shrink-mlp50-heads25-int8-4299c3c8",
                 "deit-base-dynamic-int8-07fa208e"),
        "baselines": ("22d66533a512", "6027e5738e77", "66e011b69e32", "01dca992c4d9",
                      "ff800ccfc5ec", "9eb713a6c1bc", "efffa066c782"),
    },
}  # fmt: skip


@pytest.mark.parametrize("name,data", list(PINNED))
def test_run_ids_and_baseline_hashes_are_pinned(name, data, tmp_path):
    st = expand_study(name, data=data)
    ids = st.run_ids()
    for rid in PINNED[name, data]["runs"]:
        assert rid in ids
    assert tuple(st.baselines) == PINNED[name, data]["baselines"]  # teachers first
    for h, b in st.baselines.items():
        assert b.directory(tmp_path) == tmp_path / "baselines" / h
    deit = next((r for r in st.runs if r.id == "deit-nano-cubic50-int8-00ddf184"), None)
    if deit is not None:  # a fine-tune distils from its teacher, named by the teacher's hash
        distill = deit.recipe["steps"][1]["finetune"]["distill"]
        assert distill == {"teacher": "@baseline:5a7708d75249", "kind": "hard"}


def test_product_varies_the_last_axis_fastest_and_labels_values():
    axes = [("a", [("x", 1), ("y", 2)]), ("b", [("none", None), ("true", True)])]
    got = list(product(axes))
    assert [v for v, _ in got] == [
        {"a": 1, "b": None}, {"a": 1, "b": True}, {"a": 2, "b": None}, {"a": 2, "b": True},
    ]  # fmt: skip
    assert got[1][1] == {"a": "x", "b": "true"}
    assert [label_of(v) for v in (None, True, False, 0.5, "s")] == ["none", "true", "false",
                                                                      "0.5", "s"]  # fmt: skip


def test_teacher_symbols_resolve_to_directories_only_at_run_time(tmp_path):
    st = expand_study("seed-scratch")
    run = next(r for r in st.runs if r.id == "deit-nano-cubic50-int8-00ddf184")
    (teacher,) = teacher_hashes(run.recipe)
    assert st.baselines[teacher].label == "resnet"
    resolved = resolve_teachers(run.recipe, lambda h: st.baselines[h].directory(tmp_path))
    assert resolved["steps"][1]["finetune"]["distill"]["teacher"] == str(
        tmp_path / "baselines" / teacher
    )
    assert run.recipe["steps"][1]["finetune"]["distill"]["teacher"] == f"@baseline:{teacher}"
    assert not teacher_hashes(resolved)


def test_a_grid_too_large_to_expand_is_refused_before_expanding():
    from vitcompress.errors import VitcompressError
    from vitcompress.studies import expand_study
    from vitcompress.studies.grid import MAX_RUNS

    axis = list(range(40))
    doc = {"models": {"v": {"preset": "vit-nano"}}, "recipes": [
        {"name": "a$x$y$z$w", "grid": {"x": axis, "y": axis, "z": axis, "w": axis},
         "steps": [{"quantize": {"weights": "int$x", "activations": "$y$z$w"}}]},
    ]}  # fmt: skip
    with pytest.raises(VitcompressError, match=f"more than {MAX_RUNS:,} recipes"):
        expand_study(doc)
