"""Study B's findings (a ViT on a Raspberry Pi: SVD and dynamic INT8)."""

from __future__ import annotations

from vitcompress.findings.common import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    RATIO_TOLERANCE,
    THRESHOLD,
    Finding,
    finished_rows,
    half_width,
    loss_caveat,
    mkey,
    name,
    not_measured,
    plain,
    references,
    row_ids,
    signed,
    top1_pts,
)
from vitcompress.results import DENSE, describe

# --------------------------------------------------------------------------------------------
# Study B
# --------------------------------------------------------------------------------------------


def _ratio(r: dict) -> float | None:
    if r.get("bytes_stored") and r.get("bytes_fp32"):
        return r["bytes_fp32"] / r["bytes_stored"]
    return None


def _keeps_at(
    key: str, statement: str, method: str, target: float, runs: list[dict], refs: dict
) -> Finding:
    floor = target * RATIO_TOLERANCE
    test = (
        f"each {method} run against the dense fp32 run of the same model; size ratio = "
        f"bytes_fp32 / bytes as stored. Holds when a run at least {floor:.2f}x smaller "
        f"({RATIO_TOLERANCE:.0%} of {target:g}x) is at most {THRESHOLD:g} pts below; does not "
        f"hold when such runs, or less compressed ones, lose more"
    )
    if not runs:
        return not_measured(key, statement, test, f"no {method} run in this sweep")
    pairs = [(r, refs[mkey(r)], _ratio(r)) for r in runs if mkey(r) in refs and _ratio(r)]
    if not pairs:
        return not_measured(
            key,
            statement,
            test,
            "no dense fp32 run of the same model (or no bytes recorded) to compare with",
            runs,
        )
    details = [
        f"{name(r)}: {x:.2f}x smaller, {top1_pts(ref):.2f} -> {top1_pts(r):.2f} % "
        f"({signed(top1_pts(r) - top1_pts(ref))} pts)"
        for r, ref, x in pairs
    ]
    kept = [(r, ref, x) for r, ref, x in pairs if top1_pts(r) - top1_pts(ref) >= -THRESHOLD]
    lost = [(r, ref, x) for r, ref, x in pairs if top1_pts(r) - top1_pts(ref) < -THRESHOLD]
    ids = row_ids([p[0] for p in pairs], [p[1] for p in pairs])

    def say(t: tuple) -> str:
        r, ref, x = t
        return f"{r['model']} {x:.2f}x, {signed(top1_pts(r) - top1_pts(ref))} pts"

    best_kept = max(kept, key=lambda t: t[2]) if kept else None
    if best_kept and best_kept[2] >= floor:
        verdict = HOLDS
        evidence = f"kept at {say(best_kept)}"
    elif lost:  # at the claimed ratio, or already at less compression than claimed
        verdict = FAILS
        # the least compressed run that lost, preferring a loss beyond the sampling noise
        beyond = [t for t in lost if (h := half_width(t[0], t[1])) is None
                  or top1_pts(t[1]) - top1_pts(t[0]) >= h[0]]  # fmt: skip
        worst = min(beyond or lost, key=lambda t: t[2])
        evidence = f"loses more than {THRESHOLD:g} pts already at {say(worst)}"
        if best_kept:
            evidence += f"; kept only up to {say(best_kept)}"
    else:
        verdict = NOT_MEASURED
        evidence = (
            f"no {method} run reached {floor:.2f}x; the most compressed, "
            f"{say(best_kept)}, keeps the accuracy"
        )
    caveat = loss_caveat(verdict, [best_kept] if verdict == HOLDS else [], lost)
    return Finding(key, statement, test, verdict, evidence + ".", tuple(details), ids, caveat)


def b1_svd(rows: list[dict]) -> Finding:
    """B1a: truncated SVD keeps the accuracy at about 3.3x smaller."""
    rows = finished_rows(rows)
    runs = [
        r
        for r in rows
        if (d := describe(r))["lowrank"] is not None
        and d["shrink"] is None
        and d["sparsity"] == DENSE
        and not d["finetuned"]
        and d["format"] == "fp32"
    ]
    statement = "Low-rank SVD keeps the accuracy (0.62 -> 0.62) at 3.3x smaller."
    return _keeps_at("B1a", statement, "SVD (low-rank, no retraining)", 3.3, runs, references(rows))


def b1_dynamic_int8(rows: list[dict]) -> Finding:
    """B1b: dynamic INT8 keeps the accuracy at about 4x smaller."""
    rows = finished_rows(rows)
    runs = [
        r
        for r in rows
        if (d := describe(r))["format"] == "int8-dyn"
        and plain(d)
        and d["sparsity"] == DENSE
        and not d["finetuned"]
    ]
    statement = "Dynamic INT8 quantization keeps the accuracy (0.62 -> 0.62) at 4x smaller."
    return _keeps_at("B1b", statement, "dynamic INT8", 4.0, runs, references(rows))
