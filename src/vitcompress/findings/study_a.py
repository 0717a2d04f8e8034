"""Study A's findings (ViT/DeiT on an FPGA: formats, sparsity, 2:4, distillation, size)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

from vitcompress.findings.common import (
    A1_FORMATS,
    FAILS,
    HOLDS,
    NONZERO_TOLERANCE,
    NOT_MEASURED,
    THRESHOLD,
    Finding,
    finished_rows,
    inside,
    larger,
    like,
    loss_caveat,
    mkey,
    name,
    noise_words,
    not_measured,
    plain,
    plural,
    references,
    row_ids,
    signed,
    size_key,
    top1_pts,
    unstructured,
)
from vitcompress.results import DENSE, describe

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
    rows = finished_rows(rows)
    refs = references(rows)
    runs = [
        r
        for r in rows
        if (d := describe(r))["format"] in A1_FORMATS
        and d["sparsity"] == DENSE
        and plain(d)
        and not d["finetuned"]
    ]
    if not runs:
        return not_measured(key, statement, test, "no dense post-training TF32, FP16 or INT8 run")
    pairs = [(r, refs[mkey(r)]) for r in runs if mkey(r) in refs]
    if not pairs:
        return not_measured(
            key, statement, test, "no fp32 run of the same model to compare with", runs
        )
    details, worst = [], {}
    for r, ref in pairs:
        delta = top1_pts(r) - top1_pts(ref)
        fmt = describe(r)["format"]
        details.append(
            f"{r['model']} {fmt}: {top1_pts(ref):.2f} -> {top1_pts(r):.2f} % ({signed(delta)} pts)"
        )
        if fmt not in worst or delta < worst[fmt][0]:
            worst[fmt] = (delta, r)
    bad = [(r, ref) for r, ref in pairs if top1_pts(r) - top1_pts(ref) < -THRESHOLD]
    parts = [
        f"{f}: worst {signed(worst[f][0])} pts ({worst[f][1]['model']})"
        for f in A1_FORMATS
        if f in worst
    ]
    missing = [f for f in A1_FORMATS if f not in worst]
    evidence = "; ".join(parts) + (f"; not run: {', '.join(missing)}" if missing else "")
    if bad:
        evidence += f". Significant loss in {len(bad)} of {len(pairs)}: " + ", ".join(
            f"{name(r)}" for r, _ in bad
        )
    verdict = FAILS if bad else HOLDS
    return Finding(
        key,
        statement,
        test,
        verdict,
        evidence + ".",
        tuple(details),
        row_ids([p[0] for p in pairs], [p[1] for p in pairs]),
        loss_caveat(verdict, pairs, bad),
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
    rows = finished_rows(rows)
    refs = references(rows)
    sparse = [
        r
        for r in rows
        if (d := describe(r))["format"] == "fp32"
        and plain(d)
        and unstructured(d, r)
        and 0.5 <= (r.get("sparsity_target") or 0) <= 0.75
    ]
    runs = [r for r in sparse if describe(r)["finetuned"]]
    if not runs:
        why = (
            "only one-shot pruned runs at 50-75 % (the finding is about fine-tuned ones)"
            if sparse
            else "no unstructured 50-75 % sparse fp32 run"
        )
        return not_measured(key, statement, test, why, sparse)
    pairs = [(r, refs[mkey(r)]) for r in runs if mkey(r) in refs]
    if not pairs:
        return not_measured(key, statement, test, "no dense fp32 run of the same model", runs)
    details = []
    for r, ref in pairs:
        details.append(
            f"{r['model']} {r['sparsity_target'] * 100:g} %: {top1_pts(ref):.2f} -> "
            f"{top1_pts(r):.2f} % ({signed(top1_pts(r) - top1_pts(ref))} pts)"
        )
    deltas = [top1_pts(r) - top1_pts(ref) for r, ref in pairs]
    bad = [p for p, dl in zip(pairs, deltas, strict=True) if dl < -THRESHOLD]
    beat = sum(dl > 0 for dl in deltas)
    evidence = (
        f"{plural(len(pairs), 'run')} against the dense model: {beat} above it, worst "
        f"{signed(min(deltas))} pts, best {signed(max(deltas))} pts"
    )
    if bad:
        evidence += "; more than the threshold below: " + ", ".join(name(r) for r, _ in bad)
    verdict = FAILS if bad else HOLDS
    return Finding(
        key,
        statement,
        test,
        verdict,
        evidence + ".",
        tuple(details),
        row_ids([p[0] for p in pairs], [p[1] for p in pairs]),
        loss_caveat(verdict, pairs, bad),
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
        if d["format"] == "fp32" and plain(d) and d["finetuned"] and unstructured(d, r):
            t = r.get("sparsity_target") or 0.0
            if 0 < t < 1:
                out[mkey(r)].setdefault(round(_halvings(t), 6), r)
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
    rows = finished_rows(rows)
    all_curves = _curves(rows)
    curves = {m: c for m, c in all_curves.items() if len(c) >= 3}
    # models with a fine-tuned sparse run but too few points for a slope of their own
    short = sorted(next(iter(c.values()))["model"] for m, c in all_curves.items()
                   if m not in curves)  # fmt: skip
    left_out = (
        f"; not on a curve: {', '.join(short)} (fewer than two fine-tuned sparsities)"
        if short
        else ""
    )
    if not curves:
        return not_measured(
            key,
            statement,
            test,
            "no model has fine-tuned unstructured fp32 "
            "runs at two or more sparsities besides its dense run",
        )
    used = [r for c in curves.values() for r in c.values()]
    details, flat, own = [], [], []
    for c in curves.values():
        pts = sorted((x, top1_pts(r)) for x, r in c.items())
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
                (size_key(r0), r0["model"], _slope(sorted((x, top1_pts(c[x])) for x in common)))
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
            row_ids(used),
        )
    if not compared:
        sizes = sorted({f"{r['model']}" for r in used})
        return Finding(
            key,
            statement,
            test,
            NOT_MEASURED,
            f"{falls}, but 'most for the smallest' needs two sizes of one family, each with "
            f"a curve, on two shared sparsities; the curves are {', '.join(sizes)}"
            f"{left_out}.",
            tuple(details),
            row_ids(used),
        )
    return Finding(
        key,
        statement,
        test,
        HOLDS,
        f"{falls}; smallest steepest in each family compared: "
        + "; ".join(compared)
        + f"{left_out}.",
        tuple(details),
        row_ids(used),
    )


def _ordering(
    key: str, statement: str, test: str, pairs: list[tuple[dict, dict, str]], what: str
) -> Finding:
    """Holds when the first row of every pair is above the second; ``what`` names the sides."""
    details, behind = [], []
    margins = []
    for pair in pairs:
        better, worse, label = pair
        m = top1_pts(better) - top1_pts(worse)
        margins.append(m)
        details.append(
            f"{label}: {top1_pts(better):.2f} vs {top1_pts(worse):.2f} % ({signed(m)} pts)"
        )
        if m <= 0:
            behind.append(pair)
    clear = sum(m > THRESHOLD for m in margins)
    spread = (
        f"margin {signed(margins[0])} pts"
        if len(margins) == 1
        else f"margins {signed(min(margins))} to {signed(max(margins))} pts"
    )
    evidence = (
        f"{what} in {len(pairs) - len(behind)} of {plural(len(pairs), 'pair')} ({clear} by "
        f"more than {THRESHOLD:g} pts); {spread}"
    )
    caveat = ""
    if behind:
        names = [p[2] for p in behind]
        evidence += "; not ahead: " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        if (got := inside(behind)) and len(got[0]) == len(behind):
            caveat = (
                f"Every pair where it fails is inside {noise_words(*got[1:])}: they may be chance."
            )
    elif (got := inside(pairs)) and got[0]:
        caveat = (
            f"{len(got[0])} of {len(pairs)} margins are inside {noise_words(*got[1:])}: those "
            "pairs may be chance."
        )
    return Finding(
        key,
        statement,
        test,
        FAILS if behind else HOLDS,
        evidence + ".",
        tuple(details),
        row_ids([p[0] for p in pairs], [p[1] for p in pairs]),
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
    rows = finished_rows(rows)
    nm, un = defaultdict(list), defaultdict(list)
    for r in rows:
        d = describe(r)
        if not (plain(d) and d["finetuned"]):
            continue
        k = (mkey(r), d["format"], r.get("activations"))
        if d["sparsity"] == "2:4":
            nm[k].append(r)
        elif unstructured(d, r) and abs((r.get("sparsity_target") or 0) - 0.5) < 1e-9:
            un[k].append(r)
    pairs = [(un[k][0], nm[k][0], f"{nm[k][0]['model']} {k[1]}") for k in nm if k in un]
    if not pairs:
        have = "2:4" if nm else "50 % unstructured" if un else None
        why = "no fine-tuned pair of 2:4 and 50 % unstructured on one model and format" + (
            f" (only {have} was run)" if have else ""
        )
        return not_measured(
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
    rows = finished_rows(rows)
    vit = defaultdict(list)
    for r in rows:
        if r.get("family") == "vit":
            vit[(r.get("data"), r.get("size"), like(r))].append(r)
    pairs = []
    for r in rows:
        if r.get("family") != "deit":
            continue
        cands = vit.get((r.get("data"), r.get("size"), like(r)), [])
        same = [v for v in cands if v["recipe"] == r["recipe"]] or cands
        if len(same) == 1:
            sp = describe(r)["sparsity"]
            pairs.append(
                (r, same[0], f"{r.get('size')} {r['recipe']}{'' if sp == DENSE else ' (sparse)'}")
            )
    if not pairs:
        fams = sorted({str(r.get("family")) for r in rows})
        return not_measured(
            key,
            statement,
            test,
            "no DeiT and ViT run of the same size and "
            f"recipe (families here: {', '.join(fams) or 'none'})",
        )
    f = _ordering(key, statement, test, pairs, "DeiT above ViT")
    kinds = [describe(p[0]) for p in pairs]
    n_sparse = sum(d["sparsity"] != DENSE for d in kinds)
    n_other = sum(d["sparsity"] == DENSE and not plain(d) for d in kinds)
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
    rows = [r for r in finished_rows(rows) if r.get("params_nonzero") and plain(describe(r))]
    fams: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        fams[(r.get("data"), r.get("family"))][r["model"]].append(r)
    pairs, sizes_seen, multi = [], set(), False
    tol = math.log(1 + NONZERO_TOLERANCE)
    for models in fams.values():
        order = sorted(models, key=lambda m: size_key(models[m][0]))
        sizes_seen.update(order)
        for i, small in enumerate(order):
            for large in order[i + 1 :]:
                if not larger(models[large][0], models[small][0]):
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
                            f"{name(r)} ({r['params_nonzero']:,} nz) vs "
                            f"{name(dense)} ({dense['params_nonzero']:,})"
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
        return not_measured(key, statement, test, why)
    f = _ordering(key, statement, test, pairs, "larger sparse above smaller dense")
    # the finding presumes the larger model is the better one before pruning: say if it is not
    refs, notes = references(rows), []
    for large, small in dict.fromkeys((mkey(a), mkey(b)) for a, b, _ in pairs):
        if large in refs and small in refs:
            a, b = refs[large], refs[small]
            weaker = " (not above it before pruning)" if top1_pts(a) <= top1_pts(b) else ""
            notes.append(
                f"{a['model']} {top1_pts(a):.2f} vs {b['model']} {top1_pts(b):.2f} %{weaker}"
            )
    if not notes:
        return f
    return dataclasses.replace(f, evidence=f"{f.evidence} Dense fp32: {'; '.join(notes)}.")
