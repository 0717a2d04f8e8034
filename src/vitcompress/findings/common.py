"""What every finding shares: the ``Finding`` record, thresholds, and how rows are chosen and
compared (pure functions over result rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vitcompress.results import DENSE, SIZE_ORDER, describe, eval_images

THRESHOLD = 0.5  # top-1 points: a loss above this is significant
NONZERO_TOLERANCE = 0.25  # A6: two runs have "about equal" non-zero weights within 25 %
RATIO_TOLERANCE = 0.85  # B1: "about 3.3x smaller" is at least 85 % of 3.3x

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"
A1_FORMATS = ("tf32", "fp16", "int8")


@dataclass(frozen=True)
class Finding:
    """One finding of a reference study, tested on this sweep's results.

    ``evidence`` is one or two sentences with the numbers (or, when not measured, why);
    ``details`` one line per comparison; ``rows`` the ids of every row compared; ``caveat``
    says when the differences that decide the verdict are within the sampling noise of the
    test images (empty when they are not, or when the image count is not recorded).
    """

    key: str
    statement: str
    test: str
    verdict: str
    evidence: str
    details: tuple[str, ...] = ()
    rows: tuple[str, ...] = field(default=())
    caveat: str = ""


# --------------------------------------------------------------------------------------------
# Choosing rows
# --------------------------------------------------------------------------------------------


def finished_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("top1") is not None]


def top1_pts(r: dict) -> float:
    return r["top1"] * 100


def mkey(r: dict) -> tuple:
    """One model on one data set."""
    return (r.get("data"), r.get("model"))


def plain(d: dict) -> bool:
    return d["lowrank"] is None and d["shrink"] is None


def like(r: dict) -> tuple:
    """What a recipe did, so that two models' runs of the same recipe pair up."""
    d = describe(r)
    return (
        d["format"],
        r.get("activations"),
        d["sparsity"],
        d["lowrank"],
        d["shrink"],
        d["finetuned"],
    )


def is_reference(r: dict) -> bool:
    d = describe(r)
    return d["format"] == "fp32" and d["sparsity"] == DENSE and plain(d) and not d["finetuned"]


def references(rows: list[dict]) -> dict[tuple, dict]:
    """The dense fp32 one-shot row of each model (the first if there are several)."""
    out: dict[tuple, dict] = {}
    for r in finished_rows(rows):
        if is_reference(r):
            out.setdefault(mkey(r), r)
    return out


def unstructured(d: dict, r: dict) -> bool:
    sp = d["sparsity"]
    return sp != DENSE and ":" not in sp and r.get("pattern") in (None, "unstructured")


def size_key(r: dict) -> tuple:
    size = r.get("size") or ""
    return (
        SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER),
        r.get("base_params") or r.get("params_total") or 0,
    )


def larger(a: dict, b: dict) -> bool:
    """Is ``a``'s model a larger size than ``b``'s: by size name, else (sizes not named) by
    the baseline's parameters, more than 25 % apart."""
    (ka, pa), (kb, pb) = size_key(a), size_key(b)
    if ka < len(SIZE_ORDER) and kb < len(SIZE_ORDER):
        return ka > kb
    return bool(pa and pb and pa > 1.25 * pb)


def name(r: dict) -> str:
    return f"{r['model']} {r['recipe']}"


def row_ids(*groups) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for g in groups:
        for r in g:
            seen.setdefault(r["id"], None)
    return tuple(seen)


def signed(v: float) -> str:
    return f"{v:+.2f}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def half_width(a: dict, b: dict) -> tuple[float, int] | None:
    """The most (pts, at 95 %) a top-1 difference between runs ``a`` and ``b`` can owe to the
    sample of test images, and that sample's size; None when a count is not recorded.

    The runs are treated as independent samples. Runs scored on the same images err together
    (two versions of one model disagree on few images), so the true figure is smaller: this
    bound can say "may be chance", never "is significant".
    """
    n = min(eval_images(a)[0] or 0, eval_images(b)[0] or 0)
    if n <= 0:
        return None
    pa, pb = a["top1"], b["top1"]
    return 196 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / n), n


def inside(pairs) -> tuple[list, float, int] | None:
    """The pairs (first run, second run, ...) whose top-1 difference is inside their own
    noise, with the widest noise and the fewest images among those; None when a pair's image
    count is not recorded."""
    hw = [half_width(p[0], p[1]) for p in pairs]
    if not pairs or any(h is None for h in hw):
        return None
    inside = [
        (p, h)
        for p, h in zip(pairs, hw, strict=True)
        if abs(top1_pts(p[0]) - top1_pts(p[1])) < h[0]
    ]
    if not inside:
        return [], 0.0, 0
    return [p for p, _ in inside], max(h[0] for _, h in inside), min(h[1] for _, h in inside)


def noise_words(widest: float, n: int) -> str:
    return f"the sampling noise of {n:,} test images (at most \u00b1{widest:.1f} pts at 95 %)"


def loss_caveat(verdict: str, pairs: list, bad: list) -> str:
    """For a "no significant loss" finding (pairs of (run, reference, ...)): say when the
    verdict is decided inside the noise, or when the images cannot resolve the threshold."""
    if verdict == FAILS and (got := inside(bad)) and len(got[0]) == len(bad):
        return f"The deciding losses are inside {noise_words(*got[1:])}: they may be chance."
    if verdict == HOLDS and pairs:
        hw = [h for p in pairs if (h := half_width(p[0], p[1]))]
        if len(hw) == len(pairs) and max(h[0] for h in hw) > THRESHOLD:
            widest, n = max(h[0] for h in hw), min(h[1] for h in hw)
            return (
                f"{THRESHOLD:g} pts is finer than {noise_words(widest, n)}: a loss that small "
                "may go unseen."
            )
    return ""


def not_measured(key: str, statement: str, test: str, why: str, rows=()) -> Finding:
    return Finding(key, statement, test, NOT_MEASURED, why, rows=row_ids(rows))
