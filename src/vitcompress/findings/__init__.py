"""The reference studies' findings (REFERENCE.md), each tested on a sweep's own results.

Every finding is a pure function ``rows -> Finding``: the study's claim in our words, how it is
tested here (which rows are compared, the threshold), this sweep's numbers and a verdict:
``holds``, ``does not hold`` or ``not measured`` (with why: the grid has no such runs). Rows are
chosen by what their recipe did (``results.describe``), never by their names, and only finished
runs count. Accuracies are top-1 in percentage points ("pts").

A loss is *significant* when it exceeds ``THRESHOLD`` (0.5 pts). An ordering claim ("2:4 below
50 % unstructured") holds when it holds in every pair compared; the evidence gives the margins
so that a reader can see which ones are smaller than the threshold or than the sampling error
of the test images (``noise_note``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vitcompress.findings.common import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    THRESHOLD,
    Finding,
    finished_rows,
)
from vitcompress.findings.study_a import (
    a1_formats,
    a2_moderate_sparsity,
    a3_sparsity_curve,
    a4_two_four,
    a5_distillation,
    a6_large_sparse,
)
from vitcompress.findings.study_b import (
    b1_dynamic_int8,
    b1_svd,
)
from vitcompress.results import eval_images

FINDINGS: tuple[Callable[[list[dict]], Finding], ...] = (
    a1_formats,
    a2_moderate_sparsity,
    a3_sparsity_curve,
    a4_two_four,
    a5_distillation,
    a6_large_sparse,
    b1_svd,
    b1_dynamic_int8,
)


def findings(rows: list[dict]) -> list[Finding]:
    """Every finding of the two studies, tested on ``rows`` (a results file's rows)."""
    return [f(rows) for f in FINDINGS]


def noise_note(rows: list[dict]) -> str:
    """How fine a top-1 difference these test images can resolve, in one sentence or two."""
    ok = finished_rows(rows)
    ns = [n for r in ok if (n := eval_images(r)[0])]
    if not ns:
        return (
            "These results do not record how many test images each top-1 used, so the sampling "
            "error of a top-1 cannot be given here."
        )
    n = min(ns)
    p = sorted(r["top1"] for r in ok)[len(ok) // 2]
    se = 100 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return (
        f"On {n:,} test images one image is {100 / n:.2f} pts and a top-1 near {p * 100:.0f} % "
        f"has a binomial standard error of {se:.2f} pts; a difference between two runs can owe "
        f"up to \u00b1{1.96 * math.sqrt(2) * se:.1f} pts to the sample of images (95 %; an upper "
        "bound, as runs scored on the same images err together). Verdicts decided inside that "
        "margin are marked 'may be noise'."
    )


def format_findings(found: list[Finding]) -> str:
    """Plain text: one finding per block, verdict first."""
    lines = [
        f"Findings of the reference studies on these results (significant: more than "
        f"{THRESHOLD:g} top-1 pts):"
    ]
    for f in found:
        lines.append(f"  {f.key:<4} {f.verdict:<14} {f.statement}")
        lines.append(f"  {'':<4} {'':<14} {f.evidence}" + (f" {f.caveat}" if f.caveat else ""))
    return "\n".join(lines)


__all__ = [
    "FAILS",
    "FINDINGS",
    "HOLDS",
    "NOT_MEASURED",
    "THRESHOLD",
    "Finding",
    "a1_formats",
    "a2_moderate_sparsity",
    "a3_sparsity_curve",
    "a4_two_four",
    "a5_distillation",
    "a6_large_sparse",
    "b1_dynamic_int8",
    "b1_svd",
    "findings",
    "format_findings",
    "noise_note",
]
