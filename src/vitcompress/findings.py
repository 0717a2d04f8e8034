"""The reference studies' findings (REFERENCE.md), each tested on a sweep's own results.

Every finding is a pure function ``rows -> Finding``: the study's claim in our words, how it is
tested here (which rows are compared, the threshold), this sweep's numbers and a verdict:
``holds``, ``does not hold`` or ``not measured`` (with why: the grid has no such runs). Rows are
chosen by what their recipe did (``report.describe``), never by their names, and only finished
runs count. Accuracies are top-1 in percentage points ("pts").

A loss is *significant* when it exceeds ``THRESHOLD`` (0.5 pts). An ordering claim ("2:4 below
50 % unstructured") holds when it holds in every pair compared; the evidence gives the margins
so that a reader can see which ones are smaller than the threshold or than the sampling error
of the test images (``noise_note``).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from vitcompress.report import DENSE, SIZE_ORDER, describe, eval_images

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


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("top1") is not None]


def _pts(r: dict) -> float:
    return r["top1"] * 100


def _mkey(r: dict) -> tuple:
    """One model on one data set."""
    return (r.get("data"), r.get("model"))


def _plain(d: dict) -> bool:
    return d["lowrank"] is None and d["shrink"] is None


def _like(r: dict) -> tuple:
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


def _is_reference(r: dict) -> bool:
    d = describe(r)
    return d["format"] == "fp32" and d["sparsity"] == DENSE and _plain(d) and not d["finetuned"]


def references(rows: list[dict]) -> dict[tuple, dict]:
    """The dense fp32 one-shot row of each model (the first if there are several)."""
    out: dict[tuple, dict] = {}
    for r in _ok(rows):
        if _is_reference(r):
            out.setdefault(_mkey(r), r)
    return out


def _unstructured(d: dict, r: dict) -> bool:
    sp = d["sparsity"]
    return sp != DENSE and ":" not in sp and r.get("pattern") in (None, "unstructured")


def _size_key(r: dict) -> tuple:
    size = r.get("size") or ""
    return (
        SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER),
        r.get("base_params") or r.get("params_total") or 0,
    )


def _larger(a: dict, b: dict) -> bool:
    """Is ``a``'s model a larger size than ``b``'s: by size name, else (sizes not named) by
    the baseline's parameters, more than 25 % apart."""
    (ka, pa), (kb, pb) = _size_key(a), _size_key(b)
    if ka < len(SIZE_ORDER) and kb < len(SIZE_ORDER):
        return ka > kb
    return bool(pa and pb and pa > 1.25 * pb)


def _name(r: dict) -> str:
    return f"{r['model']} {r['recipe']}"


def _ids(*groups) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for g in groups:
        for r in g:
            seen.setdefault(r["id"], None)
    return tuple(seen)


def _signed(v: float) -> str:
    return f"{v:+.2f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _half_width(a: dict, b: dict) -> tuple[float, int] | None:
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


def _inside(pairs) -> tuple[list, float, int] | None:
    """The pairs (first run, second run, ...) whose top-1 difference is inside their own
    noise, with the widest noise and the fewest images among those; None when a pair's image
    count is not recorded."""
    hw = [_half_width(p[0], p[1]) for p in pairs]
    if not pairs or any(h is None for h in hw):
        return None
    inside = [(p, h) for p, h in zip(pairs, hw, strict=True) if abs(_pts(p[0]) - _pts(p[1])) < h[0]]
    if not inside:
        return [], 0.0, 0
    return [p for p, _ in inside], max(h[0] for _, h in inside), min(h[1] for _, h in inside)


def _noise_words(widest: float, n: int) -> str:
    return f"the sampling noise of {n:,} test images (at most \u00b1{widest:.1f} pts at 95 %)"


def _loss_caveat(verdict: str, pairs: list, bad: list) -> str:
    """For a "no significant loss" finding (pairs of (run, reference, ...)): say when the
    verdict is decided inside the noise, or when the images cannot resolve the threshold."""
    if verdict == FAILS and (got := _inside(bad)) and len(got[0]) == len(bad):
        return f"The deciding losses are inside {_noise_words(*got[1:])}: they may be chance."
    if verdict == HOLDS and pairs:
        hw = [h for p in pairs if (h := _half_width(p[0], p[1]))]
        if len(hw) == len(pairs) and max(h[0] for h in hw) > THRESHOLD:
            widest, n = max(h[0] for h in hw), min(h[1] for h in hw)
            return (
                f"{THRESHOLD:g} pts is finer than {_noise_words(widest, n)}: a loss that small "
                "may go unseen."
            )
    return ""


def _not_measured(key: str, statement: str, test: str, why: str, rows=()) -> Finding:
    return Finding(key, statement, test, NOT_MEASURED, why, rows=_ids(rows))


# --------------------------------------------------------------------------------------------
# Study A
# --------------------------------------------------------------------------------------------


def a1_formats(rows: list[dict]) -> Finding:
    """A1: TF32, FP16 and INT8 after training lose no significant accuracy."""
    key = "A1"
    statement = "Post-training TF32, FP16 and even INT8 cost no significant accuracy."
    test = (
        f"each dense one-shot TF32/FP16/INT8 run against the fp32 run of the same model: "
        f"holds when none is more than {THRESHOLD:g} pts below it"
    )
    rows = _ok(rows)
    refs = references(rows)
    runs = [
        r
        for r in rows
        if (d := describe(r))["format"] in A1_FORMATS
        and d["sparsity"] == DENSE
        and _plain(d)
        and not d["finetuned"]
    ]
    if not runs:
        return _not_measured(key, statement, test, "no dense post-training TF32, FP16 or INT8 run")
    pairs = [(r, refs[_mkey(r)]) for r in runs if _mkey(r) in refs]
    if not pairs:
        return _not_measured(
            key, statement, test, "no fp32 run of the same model to compare with", runs
        )
    details, worst = [], {}
    for r, ref in pairs:
        delta = _pts(r) - _pts(ref)
        fmt = describe(r)["format"]
        details.append(
            f"{r['model']} {fmt}: {_pts(ref):.2f} -> {_pts(r):.2f} % ({_signed(delta)} pts)"
        )
        if fmt not in worst or delta < worst[fmt][0]:
            worst[fmt] = (delta, r)
    bad = [(r, ref) for r, ref in pairs if _pts(r) - _pts(ref) < -THRESHOLD]
    parts = [
        f"{f}: worst {_signed(worst[f][0])} pts ({worst[f][1]['model']})"
        for f in A1_FORMATS
        if f in worst
    ]
    missing = [f for f in A1_FORMATS if f not in worst]
    evidence = "; ".join(parts) + (f"; not run: {', '.join(missing)}" if missing else "")
    if bad:
        evidence += f". Significant loss in {len(bad)} of {len(pairs)}: " + ", ".join(
            f"{_name(r)}" for r, _ in bad
        )
    verdict = FAILS if bad else HOLDS
    return Finding(
        key,
        statement,
        test,
        verdict,
        evidence + ".",
        tuple(details),
        _ids([p[0] for p in pairs], [p[1] for p in pairs]),
        _loss_caveat(verdict, pairs, bad),
    )


def a2_moderate_sparsity(rows: list[dict]) -> Finding:
    """A2: 50-75 % unstructured sparsity after fine-tuning matches or beats the dense model."""
    key = "A2"
    statement = "50 % and 75 % sparse models, fine-tuned, match or beat their dense versions."
    test = (
        f"each fine-tuned unstructured 50-75 % fp32 run against the dense fp32 run of the "
        f"same model (as trained, without the extra fine-tune): holds when none is more than "
        f"{THRESHOLD:g} pts below it"
    )
    rows = _ok(rows)
    refs = references(rows)
    sparse = [
        r
        for r in rows
        if (d := describe(r))["format"] == "fp32"
        and _plain(d)
        and _unstructured(d, r)
        and 0.5 <= (r.get("sparsity_target") or 0) <= 0.75
    ]
    runs = [r for r in sparse if describe(r)["finetuned"]]
    if not runs:
        why = (
            "only one-shot pruned runs at 50-75 % (the finding is about fine-tuned ones)"
            if sparse
            else "no unstructured 50-75 % sparse fp32 run"
        )
        return _not_measured(key, statement, test, why, sparse)
    pairs = [(r, refs[_mkey(r)]) for r in runs if _mkey(r) in refs]
    if not pairs:
        return _not_measured(key, statement, test, "no dense fp32 run of the same model", runs)
    details = []
    for r, ref in pairs:
        details.append(
            f"{r['model']} {r['sparsity_target'] * 100:g} %: {_pts(ref):.2f} -> "
            f"{_pts(r):.2f} % ({_signed(_pts(r) - _pts(ref))} pts)"
        )
    deltas = [_pts(r) - _pts(ref) for r, ref in pairs]
    bad = [p for p, dl in zip(pairs, deltas, strict=True) if dl < -THRESHOLD]
    beat = sum(dl > 0 for dl in deltas)
    evidence = (
        f"{_plural(len(pairs), 'run')} against the dense model: {beat} above it, worst "
        f"{_signed(min(deltas))} pts, best {_signed(max(deltas))} pts"
    )
    if bad:
        evidence += "; more than the threshold below: " + ", ".join(_name(r) for r, _ in bad)
    verdict = FAILS if bad else HOLDS
    return Finding(
        key,
        statement,
        test,
        verdict,
        evidence + ".",
        tuple(details),
        _ids([p[0] for p in pairs], [p[1] for p in pairs]),
        _loss_caveat(verdict, pairs, bad),
    )


def _halvings(target: float) -> float:
    """How many times the non-zero weights were halved: 50 % -> 1, 75 % -> 2, 87.5 % -> 3."""
    return math.log2(1 / (1 - target))


def _slope(pts: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def _curves(rows: list[dict]) -> dict[tuple, dict[float, dict]]:
    """Per model: top-1 rows by halvings of the non-zeros (0: the dense fp32 run)."""
    refs = references(rows)
    out: dict[tuple, dict[float, dict]] = defaultdict(dict)
    for r in rows:
        d = describe(r)
        if d["format"] == "fp32" and _plain(d) and d["finetuned"] and _unstructured(d, r):
            t = r.get("sparsity_target") or 0.0
            if 0 < t < 1:
                out[_mkey(r)].setdefault(round(_halvings(t), 6), r)
    for m in list(out):
        if m in refs:
            out[m][0.0] = refs[m]
    return out


def a3_sparsity_curve(rows: list[dict]) -> Finding:
    """A3: accuracy falls as sparsity rises, fastest for the smallest model."""
    key = "A3"
    statement = "Accuracy falls as sparsity rises, most for the smallest model."
    test = (
        "per model, the least-squares slope of top-1 against the number of halvings of the "
        "non-zero weights (dense 0, 50 % 1, 75 % 2, 87.5 % 3, ...; fine-tuned unstructured "
        f"fp32 runs and the dense fp32 run): 'falls' when the fitted drop over the range "
        f"exceeds {THRESHOLD:g} pts; 'most for the smallest' compares the slopes of the sizes "
        "of one family on the sparsities they share"
    )
    rows = _ok(rows)
    curves = {m: c for m, c in _curves(rows).items() if len(c) >= 3}
    if not curves:
        return _not_measured(
            key,
            statement,
            test,
            "no model has fine-tuned unstructured fp32 "
            "runs at two or more sparsities besides its dense run",
        )
    used = [r for c in curves.values() for r in c.values()]
    details, flat, own = [], [], []
    for c in curves.values():
        pts = sorted((x, _pts(r)) for x, r in c.items())
        s = _slope(pts)
        drop = -s * (pts[-1][0] - pts[0][0])
        top = next(iter(c.values()))
        hi = max(c[x].get("sparsity_target") or 0 for x in c) * 100
        details.append(
            f"{top['model']}: {s:+.2f} pts per halving, fitted drop {drop:.2f} pts "
            f"from {'dense' if 0.0 in c else 'the least sparse'} to {hi:g} %"
        )
        own.append(f"{top['model']} {s:+.2f}")
        if drop <= THRESHOLD:
            flat.append(top["model"])
    # sizes of one family on one data set, compared on the sparsities they all have
    fams: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for m, c in curves.items():
        r0 = next(iter(c.values()))
        fams[(r0.get("data"), r0.get("family"))][m] = c
    compared, wrong = [], []
    for fam, models in fams.items():
        sizes = {next(iter(c.values())).get("size") for c in models.values()}
        if len(models) < 2 or len(sizes) < 2:
            continue
        common = set.intersection(*(set(c) for c in models.values()))
        if len(common) < 2:
            details.append(f"{fam[1]}: sizes share fewer than two sparsities: not compared")
            continue
        slopes = []
        for c in models.values():
            r0 = next(iter(c.values()))
            slopes.append(
                (_size_key(r0), r0["model"], _slope(sorted((x, _pts(c[x])) for x in common)))
            )
        slopes.sort()
        steepest = min(slopes, key=lambda t: t[2])
        line = ", ".join(f"{m} {s:+.2f}" for _, m, s in slopes)
        compared.append(f"{fam[1]} on {len(common)} shared sparsities: {line} pts per halving")
        if steepest[1] != slopes[0][1]:
            wrong.append(f"{fam[1]}: steepest is {steepest[1]}, not the smallest {slopes[0][1]}")
    falls = (
        f"top-1 falls for {len(curves) - len(flat)} of {len(curves)} models "
        f"({', '.join(own)} pts per halving of the non-zeros)"
        + (f"; flat: {', '.join(flat)}" if flat else "")
    )
    details += compared
    if flat or wrong:
        return Finding(
            key,
            statement,
            test,
            FAILS,
            "; ".join([falls, *wrong]) + ".",
            tuple(details),
            _ids(used),
        )
    if not compared:
        sizes = sorted({f"{r['model']}" for r in used})
        return Finding(
            key,
            statement,
            test,
            NOT_MEASURED,
            f"{falls}, but 'most for the smallest' needs two sizes of one family and "
            f"this sweep has one size per family ({', '.join(sizes)}).",
            tuple(details),
            _ids(used),
        )
    return Finding(
        key,
        statement,
        test,
        HOLDS,
        f"{falls}; smallest steepest in every family: " + "; ".join(compared) + ".",
        tuple(details),
        _ids(used),
    )


def _ordering(
    key: str, statement: str, test: str, pairs: list[tuple[dict, dict, str]], what: str
) -> Finding:
    """Holds when the first row of every pair is above the second; ``what`` names the sides."""
    details, behind = [], []
    margins = []
    for pair in pairs:
        better, worse, label = pair
        m = _pts(better) - _pts(worse)
        margins.append(m)
        details.append(f"{label}: {_pts(better):.2f} vs {_pts(worse):.2f} % ({_signed(m)} pts)")
        if m <= 0:
            behind.append(pair)
    clear = sum(m > THRESHOLD for m in margins)
    spread = (
        f"margin {_signed(margins[0])} pts"
        if len(margins) == 1
        else f"margins {_signed(min(margins))} to {_signed(max(margins))} pts"
    )
    evidence = (
        f"{what} in {len(pairs) - len(behind)} of {_plural(len(pairs), 'pair')} ({clear} by "
        f"more than {THRESHOLD:g} pts); {spread}"
    )
    caveat = ""
    if behind:
        names = [p[2] for p in behind]
        evidence += "; not ahead: " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        if (got := _inside(behind)) and len(got[0]) == len(behind):
            caveat = (
                f"Every pair where it fails is inside {_noise_words(*got[1:])}: they may be chance."
            )
    elif (got := _inside(pairs)) and got[0]:
        caveat = (
            f"{len(got[0])} of {len(pairs)} margins are inside {_noise_words(*got[1:])}: those "
            "pairs may be chance."
        )
    return Finding(
        key,
        statement,
        test,
        FAILS if behind else HOLDS,
        evidence + ".",
        tuple(details),
        _ids([p[0] for p in pairs], [p[1] for p in pairs]),
        caveat,
    )


def a4_two_four(rows: list[dict]) -> Finding:
    """A4: fine-tuned 2:4 is below fine-tuned 50 % unstructured on the same model."""
    key = "A4"
    statement = "50 % unstructured beats 2:4 (the same count of zeros, fewer constraints)."
    test = (
        "fine-tuned 2:4 against fine-tuned 50 % unstructured runs of the same model in the "
        "same format: holds when unstructured is above in every pair"
    )
    rows = _ok(rows)
    nm, un = defaultdict(list), defaultdict(list)
    for r in rows:
        d = describe(r)
        if not (_plain(d) and d["finetuned"]):
            continue
        k = (_mkey(r), d["format"], r.get("activations"))
        if d["sparsity"] == "2:4":
            nm[k].append(r)
        elif _unstructured(d, r) and abs((r.get("sparsity_target") or 0) - 0.5) < 1e-9:
            un[k].append(r)
    pairs = [(un[k][0], nm[k][0], f"{nm[k][0]['model']} {k[1]}") for k in nm if k in un]
    if not pairs:
        have = "2:4" if nm else "50 % unstructured" if un else None
        why = "no fine-tuned pair of 2:4 and 50 % unstructured on one model and format" + (
            f" (only {have} was run)" if have else ""
        )
        return _not_measured(
            key, statement, test, why, [*sum(nm.values(), []), *sum(un.values(), [])]
        )
    return _ordering(key, statement, test, pairs, "50 % unstructured above 2:4")


def a5_distillation(rows: list[dict]) -> Finding:
    """A5: DeiT is above ViT at the same size, dense and sparse."""
    key = "A5"
    statement = "Distillation helps: DeiT is above ViT at the same size, at every sparsity."
    test = (
        "every DeiT run against the ViT run of the same size, data and recipe (format, "
        "activations, sparsity, fine-tuning): holds when DeiT is above in every pair, dense "
        "and sparse"
    )
    rows = _ok(rows)
    vit = defaultdict(list)
    for r in rows:
        if r.get("family") == "vit":
            vit[(r.get("data"), r.get("size"), _like(r))].append(r)
    pairs = []
    for r in rows:
        if r.get("family") != "deit":
            continue
        cands = vit.get((r.get("data"), r.get("size"), _like(r)), [])
        same = [v for v in cands if v["recipe"] == r["recipe"]] or cands
        if len(same) == 1:
            sp = describe(r)["sparsity"]
            pairs.append(
                (r, same[0], f"{r.get('size')} {r['recipe']}{'' if sp == DENSE else ' (sparse)'}")
            )
    if not pairs:
        fams = sorted({str(r.get("family")) for r in rows})
        return _not_measured(
            key,
            statement,
            test,
            "no DeiT and ViT run of the same size and "
            f"recipe (families here: {', '.join(fams) or 'none'})",
        )
    f = _ordering(key, statement, test, pairs, "DeiT above ViT")
    kinds = [describe(p[0]) for p in pairs]
    n_sparse = sum(d["sparsity"] != DENSE for d in kinds)
    n_other = sum(d["sparsity"] == DENSE and not _plain(d) for d in kinds)
    n_dense = len(pairs) - n_sparse - n_other
    scope = f" Pairs: {n_dense} dense, {n_sparse} sparse, {n_other} shrunk or low-rank"
    if not n_sparse or not n_dense:
        scope += f" (no {'sparse' if not n_sparse else 'dense'} pair: that part is not measured)"
    return dataclasses.replace(f, evidence=f.evidence + scope + ".")


def a6_large_sparse(rows: list[dict]) -> Finding:
    """A6: a larger sparse model beats a smaller dense one with about as many non-zeros."""
    key = "A6"
    statement = (
        "A larger sparse model beats a smaller dense one with the same number of non-zero weights."
    )
    test = (
        f"each dense run of a smaller model against the sparse run of a larger model of the "
        f"same family, data and format whose non-zero weights are closest to it and within "
        f"{NONZERO_TOLERANCE:.0%}: holds when the larger sparse one is above in every "
        "pair"
    )
    rows = [r for r in _ok(rows) if r.get("params_nonzero") and _plain(describe(r))]
    fams: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        fams[(r.get("data"), r.get("family"))][r["model"]].append(r)
    pairs, sizes_seen, multi = [], set(), False
    tol = math.log(1 + NONZERO_TOLERANCE)
    for models in fams.values():
        order = sorted(models, key=lambda m: _size_key(models[m][0]))
        sizes_seen.update(order)
        for i, small in enumerate(order):
            for large in order[i + 1 :]:
                if not _larger(models[large][0], models[small][0]):
                    continue  # one size: A5's pairs, not these
                multi = True
                sparse = defaultdict(list)  # the larger model's sparse runs by format
                for r in models[large]:
                    if describe(r)["sparsity"] != DENSE:
                        sparse[(describe(r)["format"], r.get("activations"))].append(r)
                for dense in models[small]:
                    d = describe(dense)
                    if d["sparsity"] != DENSE or d["finetuned"]:
                        continue
                    near = [
                        (abs(math.log(r["params_nonzero"] / dense["params_nonzero"])), r)
                        for r in sparse[(d["format"], dense.get("activations"))]
                    ]
                    near = [t for t in near if t[0] <= tol]
                    if near:
                        r = min(near, key=lambda t: t[0])[1]
                        label = (
                            f"{_name(r)} ({r['params_nonzero']:,} nz) vs "
                            f"{_name(dense)} ({dense['params_nonzero']:,})"
                        )
                        pairs.append((r, dense, label))
    if not pairs:
        why = (
            "no sparse run of a larger model within "
            f"{NONZERO_TOLERANCE:.0%} of a smaller dense model's non-zero weights"
            if multi
            else "one size per family in this sweep "
            f"({', '.join(sorted(sizes_seen)) or 'no models'}): nothing to pair."
        )
        return _not_measured(key, statement, test, why)
    return _ordering(key, statement, test, pairs, "larger sparse above smaller dense")


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
        return _not_measured(key, statement, test, f"no {method} run in this sweep")
    pairs = [(r, refs[_mkey(r)], _ratio(r)) for r in runs if _mkey(r) in refs and _ratio(r)]
    if not pairs:
        return _not_measured(
            key,
            statement,
            test,
            "no dense fp32 run of the same model (or no bytes recorded) to compare with",
            runs,
        )
    details = [
        f"{_name(r)}: {x:.2f}x smaller, {_pts(ref):.2f} -> {_pts(r):.2f} % "
        f"({_signed(_pts(r) - _pts(ref))} pts)"
        for r, ref, x in pairs
    ]
    kept = [(r, ref, x) for r, ref, x in pairs if _pts(r) - _pts(ref) >= -THRESHOLD]
    lost = [(r, ref, x) for r, ref, x in pairs if _pts(r) - _pts(ref) < -THRESHOLD]
    ids = _ids([p[0] for p in pairs], [p[1] for p in pairs])

    def say(t: tuple) -> str:
        r, ref, x = t
        return f"{r['model']} {x:.2f}x, {_signed(_pts(r) - _pts(ref))} pts"

    best_kept = max(kept, key=lambda t: t[2]) if kept else None
    if best_kept and best_kept[2] >= floor:
        verdict = HOLDS
        evidence = f"kept at {say(best_kept)}"
    elif lost:  # at the claimed ratio, or already at less compression than claimed
        verdict = FAILS
        # the least compressed run that lost, preferring a loss beyond the sampling noise
        beyond = [t for t in lost if (h := _half_width(t[0], t[1])) is None
                  or _pts(t[1]) - _pts(t[0]) >= h[0]]  # fmt: skip
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
    caveat = _loss_caveat(verdict, [best_kept] if verdict == HOLDS else [], lost)
    return Finding(key, statement, test, verdict, evidence + ".", tuple(details), ids, caveat)


def b1_svd(rows: list[dict]) -> Finding:
    """B1a: truncated SVD keeps the accuracy at about 3.3x smaller."""
    rows = _ok(rows)
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
    rows = _ok(rows)
    runs = [
        r
        for r in rows
        if (d := describe(r))["format"] == "int8-dyn"
        and _plain(d)
        and d["sparsity"] == DENSE
        and not d["finetuned"]
    ]
    statement = "Dynamic INT8 quantization keeps the accuracy (0.62 -> 0.62) at 4x smaller."
    return _keeps_at("B1b", statement, "dynamic INT8", 4.0, runs, references(rows))


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
    ok = _ok(rows)
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
