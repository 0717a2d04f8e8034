"""The reference studies' findings: each verdict (holds, does not hold, not measured) from rows
built by hand, so that every rule is seen to decide what its docstring says."""

import itertools

import pytest

from vitcompress.findings import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    THRESHOLD,
    a1_formats,
    a2_moderate_sparsity,
    a3_sparsity_curve,
    a4_two_four,
    a5_distillation,
    a6_large_sparse,
    b1_dynamic_int8,
    b1_svd,
    findings,
    format_findings,
    noise_note,
)

PARAMS = {"nano": 139_018, "tiny": 5_500_000, "small": 21_700_000}
_ids = itertools.count()


def run(
    model: str = "vit-nano",
    top1: float = 0.85,
    *,
    fmt: str = "fp32",
    sparsity: float = 0.0,
    pattern: str | None = None,
    ft: bool = False,
    lowrank: float | None = None,
    dynamic: bool = False,
    nbytes: int | None = None,
    nonzero: int | None = None,
    limit: int | None = None,
) -> dict:
    """One finished run's row, as the runner writes it, from what its recipe did."""
    steps: list[dict] = []
    if lowrank is not None:
        steps.append({"lowrank": {"rank_ratio": lowrank}})
    if pattern == "2:4":
        steps.append({"prune": {"pattern": "2:4"}})
        sparsity = 0.5
    elif sparsity:
        steps.append({"prune": {"sparsity": sparsity, "schedule": "cubic"}})
        pattern = "unstructured"
    if ft:
        steps.append({"finetune": {"max_steps": 10}})
    q = {"weights": fmt, "activations": None if fmt == "fp32" else fmt}
    if dynamic:
        q["dynamic"] = True
    steps.append({"quantize": q})
    family, size = model.split("-")
    params = PARAMS[size]
    i = next(_ids)
    name = f"r{i}"
    return {
        "id": f"{model}-{name}",
        "study": "t",
        "model": model,
        "family": family,
        "size": size,
        "data": "fashion-mnist",
        "recipe": name,
        "status": "ok",
        "top1": top1,
        "params_total": params,
        "params_nonzero": nonzero if nonzero is not None else int(params * (1 - sparsity)),
        "bytes_stored": nbytes or 4 * params,
        "bytes_fp32": 4 * params,
        "format": fmt,
        "activations": q["activations"],
        "sparsity": sparsity,
        "sparsity_target": sparsity,
        "pattern": pattern,
        "rank_ratio": lowrank,
        "base_params": params,
        "config": {"limit": limit, "recipe": {"name": name, "steps": steps}},
        "metrics": {},
    }


def test_a1_holds_within_the_threshold_and_names_formats_not_run():
    rows = [run(top1=0.85), run(top1=0.85 - 0.004, fmt="int8"), run(top1=0.8501, fmt="fp16")]
    f = a1_formats(rows)
    assert f.verdict == HOLDS
    assert "int8: worst -0.40 pts" in f.evidence and "not run: tf32" in f.evidence
    assert set(f.rows) == {r["id"] for r in rows}
    assert f"{THRESHOLD:g} pts" in f.test


def test_a1_does_not_hold_past_the_threshold_and_ignores_fine_tuned_runs():
    ref, bad = run(top1=0.85), run(top1=0.84, fmt="int8")
    tuned = run(top1=0.70, fmt="fp16", ft=True)  # retrained: not post-training, not A1's
    f = a1_formats([ref, bad, tuned])
    assert f.verdict == FAILS
    assert bad["recipe"] in f.evidence and tuned["id"] not in f.rows


def test_a1_not_measured_without_quantized_runs_or_without_the_fp32_row():
    assert a1_formats([run()]).verdict == NOT_MEASURED
    f = a1_formats([run(fmt="int8")])
    assert f.verdict == NOT_MEASURED and "no fp32 run" in f.evidence


def test_a2_moderate_sparsity():
    ref = run(top1=0.85)
    ok = [run(top1=0.852, sparsity=0.5, ft=True), run(top1=0.846, sparsity=0.75, ft=True)]
    far = run(top1=0.60, sparsity=0.9375, ft=True)  # beyond 75 %: not A2's
    assert a2_moderate_sparsity([ref, *ok, far]).verdict == HOLDS
    f = a2_moderate_sparsity([ref, run(top1=0.84, sparsity=0.75, ft=True)])
    assert f.verdict == FAILS and "-1.00 pts" in f.evidence
    f = a2_moderate_sparsity([ref, run(top1=0.80, sparsity=0.5)])
    assert f.verdict == NOT_MEASURED and "one-shot" in f.evidence


def _curve(model: str, base: float, drops: list[float]) -> list[dict]:
    rows = [run(model, base)]
    for sp, d in zip((0.5, 0.75, 0.875), drops, strict=True):
        rows.append(run(model, base - d, sparsity=sp, ft=True))
    return rows


def test_a3_holds_when_the_smallest_model_falls_fastest():
    rows = _curve("vit-tiny", 0.80, [0.01, 0.03, 0.08]) + _curve("vit-small", 0.85, [0, 0.01, 0.03])
    f = a3_sparsity_curve(rows)
    assert f.verdict == HOLDS, f.evidence
    assert "vit-tiny" in f.evidence and "pts per halving" in f.evidence


def test_a3_does_not_hold_when_a_larger_model_falls_faster_or_a_curve_is_flat():
    rows = _curve("vit-tiny", 0.80, [0, 0.01, 0.02]) + _curve("vit-small", 0.85, [0.01, 0.04, 0.1])
    f = a3_sparsity_curve(rows)
    assert f.verdict == FAILS and "steepest is vit-small" in f.evidence
    flat = _curve("vit-nano", 0.85, [0.0, 0.001, 0.002])
    f = a3_sparsity_curve(flat)
    assert f.verdict == FAILS and "flat: vit-nano" in f.evidence


def test_a3_not_measured_with_one_size_but_the_fall_is_still_reported():
    f = a3_sparsity_curve(_curve("vit-nano", 0.85, [0.01, 0.03, 0.08]))
    assert f.verdict == NOT_MEASURED
    assert "falls for 1 of 1" in f.evidence and "needs two sizes of one family" in f.evidence
    assert a3_sparsity_curve([run()]).verdict == NOT_MEASURED
    # a larger size with one sparse run has no slope of its own: named, not silently dropped
    one = [run("vit-small", 0.88), run("vit-small", 0.87, sparsity=0.75, ft=True)]
    f = a3_sparsity_curve(_curve("vit-nano", 0.85, [0.01, 0.03, 0.08]) + one)
    assert f.verdict == NOT_MEASURED and "not on a curve: vit-small" in f.evidence
    f = a3_sparsity_curve(
        _curve("vit-tiny", 0.80, [0.01, 0.03, 0.08])
        + _curve("vit-small", 0.85, [0, 0.01, 0.03])
        + [run("deit-small", 0.86), run("deit-small", 0.85, sparsity=0.5, ft=True)]
    )
    assert f.verdict == HOLDS and "each family compared" in f.evidence
    assert "not on a curve: deit-small" in f.evidence


def test_a4_two_four_against_fifty_percent_unstructured():
    un = run(top1=0.85, sparsity=0.5, ft=True)
    assert a4_two_four([un, run(top1=0.84, pattern="2:4", ft=True)]).verdict == HOLDS
    assert a4_two_four([un, run(top1=0.851, pattern="2:4", ft=True)]).verdict == FAILS
    # different formats do not pair; nor a one-shot 2:4
    f = a4_two_four([un, run(top1=0.8, pattern="2:4", ft=True, fmt="int8"), run(pattern="2:4")])
    assert f.verdict == NOT_MEASURED


def test_a5_deit_above_vit_dense_and_sparse():
    rows = [run("vit-nano", 0.84), run("deit-nano", 0.85),
            run("vit-nano", 0.82, sparsity=0.75, ft=True),
            run("deit-nano", 0.83, sparsity=0.75, ft=True)]  # fmt: skip
    f = a5_distillation(rows)
    assert f.verdict == HOLDS and "1 dense, 1 sparse" in f.evidence
    rows[3]["top1"] = 0.81
    f = a5_distillation(rows)
    assert f.verdict == FAILS and "not ahead" in f.evidence
    f = a5_distillation(rows[:2])
    assert f.verdict == HOLDS and "no sparse pair" in f.evidence
    assert a5_distillation([run("vit-nano")]).verdict == NOT_MEASURED


def test_a6_larger_sparse_against_smaller_dense_at_equal_non_zeros():
    tiny = run("vit-tiny", 0.80)
    small = run("vit-small", 0.82, sparsity=0.75, ft=True)  # 5.4 M non-zeros against 5.5 M
    f = a6_large_sparse([tiny, small])
    assert f.verdict == HOLDS and set(f.rows) == {tiny["id"], small["id"]}
    small["top1"] = 0.79
    assert a6_large_sparse([tiny, small]).verdict == FAILS
    # the dense runs of both sizes go beside the verdict: here the larger is weaker to begin with
    f = a6_large_sparse([tiny, small, run("vit-small", 0.795)])
    assert f.verdict == FAILS
    assert "Dense fp32: vit-small 79.50 vs vit-tiny 80.00 % (not above it before" in f.evidence
    far = run("vit-small", 0.9, sparsity=0.5, ft=True)  # 10.9 M non-zeros: not "about equal"
    f = a6_large_sparse([tiny, far])
    assert f.verdict == NOT_MEASURED and "within 25%" in f.evidence
    f = a6_large_sparse([run("vit-nano"), run("vit-nano", sparsity=0.5, ft=True)])
    assert f.verdict == NOT_MEASURED and "one size per family" in f.evidence


def test_b1_svd_and_dynamic_int8_at_their_compression():
    ref = run(top1=0.85, nbytes=4 * PARAMS["nano"])
    size = 4 * PARAMS["nano"]
    assert b1_svd([ref, run(top1=0.848, lowrank=0.2, nbytes=size // 3)]).verdict == HOLDS
    f = b1_svd([ref, run(top1=0.80, lowrank=0.2, nbytes=size // 3)])
    assert f.verdict == FAILS and "3.00x" in f.evidence
    # the most compressed SVD run keeps the accuracy but is far from 3.3x: not measured
    f = b1_svd([ref, run(top1=0.85, lowrank=0.5, nbytes=int(size / 1.4))])
    assert f.verdict == NOT_MEASURED and "1.40x" in f.evidence
    # it loses accuracy already at 1.4x: 3.3x will not keep it either
    assert b1_svd([ref, run(top1=0.83, lowrank=0.5, nbytes=int(size / 1.4))]).verdict == FAILS
    dyn = run(top1=0.849, fmt="int8", dynamic=True, nbytes=size // 4)
    assert b1_dynamic_int8([ref, dyn]).verdict == HOLDS
    static = run(top1=0.849, fmt="int8", nbytes=size // 4)  # static INT8 is A1's, not B1's
    assert b1_dynamic_int8([ref, static]).verdict == NOT_MEASURED
    assert b1_svd([ref]).verdict == NOT_MEASURED


def test_failed_runs_and_unfinished_ones_are_no_evidence():
    ref = run(top1=0.85)
    broken = {**run(top1=0.1, fmt="int8"), "status": "failed"}
    assert a1_formats([ref, broken]).verdict == NOT_MEASURED


def test_every_finding_is_reported_and_printed():
    rows = [run(), run(fmt="int8", top1=0.849)]
    found = findings(rows)
    assert [f.key for f in found] == ["A1", "A2", "A3", "A4", "A5", "A6", "B1a", "B1b"]
    text = format_findings(found)
    for f in found:
        assert f.key in text and f.verdict in text


@pytest.mark.parametrize(
    ("limit", "expect"), [(512, "On 512 test images"), (None, "do not record how many")]
)
def test_noise_note_gives_the_sampling_error_of_the_images_used(limit, expect):
    note = noise_note([run(top1=0.85, limit=limit)])
    assert expect in note
    if limit:  # sqrt(0.85 * 0.15 / 512) = 1.58 pts
        assert "1.58 pts" in note


def test_a_verdict_decided_inside_the_sampling_noise_says_so():
    # 512 images: a 1-point loss past the 0.5-point threshold may be chance
    rows = [run(top1=0.85, limit=512), run(top1=0.84, sparsity=0.75, ft=True, limit=512)]
    f = a2_moderate_sparsity(rows)
    assert f.verdict == FAILS and "may be chance" in f.caveat and "512 test images" in f.caveat
    assert f.caveat in format_findings([f])
    # the same numbers on 100,000 images decide it (sqrt(2 * .85 * .15 / 1e5) * 196 = 0.31 pts)
    rows = [run(top1=0.85, limit=100_000), run(top1=0.84, sparsity=0.75, ft=True, limit=100_000)]
    assert a2_moderate_sparsity(rows).caveat == ""
    # an image count not recorded: no claim either way
    rows = [run(top1=0.85), run(top1=0.84, sparsity=0.75, ft=True)]
    assert a2_moderate_sparsity(rows).caveat == ""
    # a holding ordering with a margin of 0.2 pts on 512 images: that pair may be chance
    pair = [run("vit-nano", 0.840, limit=512), run("deit-nano", 0.842, limit=512)]
    f = a5_distillation(pair)
    assert f.verdict == HOLDS and "1 of 1 margins" in f.caveat
    # a holding "no loss" whose threshold the images cannot resolve
    f = a1_formats([run(top1=0.85, limit=512), run(top1=0.85, fmt="int8", limit=512)])
    assert f.verdict == HOLDS and "0.5 pts is finer than" in f.caveat
