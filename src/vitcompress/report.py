"""The report of a sweep: the reference studies' findings and figures on its own results.

``build_report(DIR)`` reads ``DIR/results.sqlite`` and writes PNGs to ``DIR/plots/``, the rows
as ``results.json`` and ``results.csv``, and a self-contained ``DIR/report.html`` (the PNGs
embedded, no network): what the numbers are (test images per run, latency spread, a warning
when the machine was loaded), each finding of the two reference studies with this sweep's
numbers and a verdict (``vitcompress.findings``), and the figures:

- ``formats.png``: top-1 per number format (dense models, no retraining), one group per model
  (study A's first figure);
- ``sparsity.png``: top-1 against the sparsity target, unstructured (cubic) as lines and 2:4
  beside them (study A); filled markers fine-tuned, hollow one-shot;
- ``combinations.png``: top-1 of every format x sparsity combination, one heat map per model;
- ``study_b.png``: study B's table (accuracy, latency, size on disk, parameters per variant);
- ``pareto_size.png`` / ``pareto_latency.png`` / ``pareto_bops.png``: top-1 against bytes as
  stored, batch-1 latency (median, with a bar to the p90) and BOPs, the Pareto front drawn as a
  line and every point on it numbered.

A figure with nothing to show is left out, and the page says why. Runs are placed by what their
recipe did (``format``, ``pattern``, ``sparsity_target``, ``rank_ratio`` and the recipe steps),
never by their names.
"""

from __future__ import annotations

import base64
import bisect
import html
import json
import math
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from vitcompress.errors import VitcompressError
from vitcompress.studies.store import (
    CSV_FIELDS,
    DB_NAME,
    band_order,
    read_results,
    size_band,
    write_csv,
)

SIZE_ORDER = ("nano", "micro", "tiny", "small", "base", "large")
FAMILY_ORDER = ("vit", "deit", "resnet")
FORMAT_ORDER = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "int8-dyn")
DENSE = "dense"
# a marker per number format, so that formats tell apart in every scatter plot
FORMAT_MARKERS = {"fp32": "o", "tf32": "h", "bf16": "p", "fp16": "D", "fp8_e4m3": "<",
                  "fp8_e5m2": ">", "int8": "s", "int8-dyn": "^"}  # fmt: skip
EXTRA_MARKERS = ("v", "P", "*", "d", "X", "8")
LOADED_SPREAD = 1.5  # a p90 latency above 1.5x the median: the machine was busy
PLOTS = (
    ("formats", "Accuracy per number format (dense models, no retraining)"),
    ("sparsity", "Accuracy against sparsity: cubic unstructured, and 2:4 beside it"),
    ("combinations", "Accuracy of every format x sparsity combination"),
    ("study_b", "Study B's table: SVD and dynamic INT8 against the dense model"),
    ("pareto_size", "Top-1 against bytes as stored, with the Pareto front"),
    ("pareto_latency", "Top-1 against batch-1 latency, with the Pareto front"),
    ("pareto_bops", "Top-1 against bit operations (BOPs: MACs x weight bits x activation bits)"),
)
# the x axis of each Pareto plot: (field, label, divisor)
PARETO_AXES = {
    "bytes_stored": ("bytes as stored (KB, log)", 1024, "size"),
    "latency_ms_b1": ("latency at batch 1 (ms, log)", 1.0, "latency"),
    "bops": ("bit operations per image (GBOPs, log)", 1e9, "BOPs"),
}


# --------------------------------------------------------------------------------------------
# What each run is
# --------------------------------------------------------------------------------------------


def describe(row: dict) -> dict:
    """What a run's recipe did: ``format`` (int8-dyn for dynamic), ``sparsity`` (``dense``, a
    target in percent like ``"87.5"``, or ``"2:4"``), ``lowrank`` (rank ratio or None),
    ``shrink`` (``"mlp 50%"``-style text for structured pruning, or None), and whether it was
    fine-tuned. Restructured runs (low rank, shrink) stay out of the format and sparsity
    plots, which compare like with like."""
    steps = ((row.get("config") or {}).get("recipe") or {}).get("steps") or []
    kinds = {next(iter(s)) for s in steps if isinstance(s, dict) and s}
    fmt = row.get("format") or "fp32"
    for s in steps:
        q = s.get("quantize") if isinstance(s, dict) else None
        if isinstance(q, dict) and q.get("dynamic"):
            fmt = f"{fmt}-dyn"
    pattern = row.get("pattern")
    target = row.get("sparsity_target") or 0.0
    if pattern and ":" in str(pattern):
        sp = str(pattern)
    elif target:
        sp = f"{target * 100:g}"
    else:
        sp = DENSE
    shrink = next((s["shrink"] for s in steps if isinstance(s, dict) and "shrink" in s), None)
    if isinstance(shrink, dict):
        parts = [f"{k} {shrink[k] * 100:g}%" for k in ("mlp", "heads") if shrink.get(k)]
        shrink = ", ".join(parts) or "shrink"
    return {
        "format": fmt,
        "sparsity": sp,
        "lowrank": row.get("rank_ratio") if "lowrank" in kinds else None,
        "shrink": shrink,
        "finetuned": "finetune" in kinds,
    }


def _plain_structure(d: dict) -> bool:
    """Neither factorised nor shrunk: the layers have their original shapes."""
    return d["lowrank"] is None and d["shrink"] is None


def _model_key(row: dict) -> tuple:
    size, fam = row.get("size") or "", row.get("family") or ""
    rank = SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER)
    frank = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
    return (frank, fam, rank, row.get("model") or "")


def _models(rows: list[dict]) -> list[str]:
    seen: dict[str, tuple] = {}
    for r in rows:
        seen.setdefault(r["model"], _model_key(r))
    return sorted(seen, key=lambda m: seen[m])


def _fmt_key(f: str) -> tuple:
    return (FORMAT_ORDER.index(f) if f in FORMAT_ORDER else len(FORMAT_ORDER), f)


def _sp_key(s: str) -> tuple:
    if s == DENSE:
        return (0, 0.0)
    if ":" in s:
        n, m = s.split(":")
        return (2, 1 - int(n) / int(m))
    return (1, float(s))


def best_per_band(rows: list[dict], n: int = 5) -> dict[str, list[dict]]:
    """The ``n`` best finished runs by top-1 in each size band (bytes as stored), smallest first."""
    bands: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and r.get("top1") is not None:
            bands[r.get("size_band") or size_band(r.get("bytes_stored")) or "?"].append(r)
    return {
        b: sorted(rs, key=lambda r: (-r["top1"], r.get("bytes_stored") or 0))[:n]
        for b, rs in sorted(bands.items(), key=lambda kv: band_order(kv[0]))
    }


def eval_images(row: dict) -> tuple[int | None, str]:
    """How many test images a run's top-1 was measured on: ``(count, text)``.

    The count is the evaluation's own (``metrics["samples"]``) where recorded; else the study's
    ``limit`` (the first ``limit`` images of the split: an upper bound); else None, for the
    full test split whose size the row does not record.
    """
    m, c = row.get("metrics"), row.get("config")
    n = m.get("samples") if isinstance(m, dict) else None
    limit = c.get("limit") if isinstance(c, dict) else None
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n, f"{n:,}" + (f" (limit {limit:,})" if isinstance(limit, int) else "")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit, f"first {limit:,}"
    return None, "full split"


def _images_sentence(rows: list[dict]) -> str:
    """Which split and how many images the top-1 numbers used, grouped."""
    groups: dict[tuple, int] = defaultdict(int)
    for r in rows:
        n, _ = eval_images(r)
        m, c = r.get("metrics"), r.get("config")
        counted = isinstance(m, dict) and isinstance(m.get("samples"), int)
        limit = c.get("limit") if isinstance(c, dict) else None
        if counted:
            what = f"{n:,} images (counted)" + (f", the study's limit {limit:,}" if limit else "")
        elif limit:
            what = f"the first {limit:,} images (the study's <code>limit</code>)"
        else:
            what = "the full split (its size is not recorded in these results)"
        groups[(str(r.get("data") or "?"), what)] += 1
    if not groups:
        return "No finished run: no top-1 to describe."
    total = sum(groups.values())
    parts = [
        f"<b>{html.escape(d)}</b>: {what} for "
        + (f"all {k} finished runs" if k == total else f"{k} of {total} finished runs")
        for (d, what), k in sorted(groups.items(), key=lambda kv: -kv[1])
    ]
    tail = " The <i>test images</i> column says which for each run." if len(groups) > 1 else ""
    return ("Top-1 (and each model's baseline top-1) is measured on the test split of "
            + "; ".join(parts) + "." + tail)  # fmt: skip


def concurrent_runs(rows: list[dict]) -> dict[str, int]:
    """For each row with start and end times: how many other rows' runs overlapped it in time
    (several jobs, or several sweeps on one results file). The times are ISO 8601 UTC text of
    one width (``store.now``), so they compare as strings."""
    timed = [r for r in rows if r.get("started_at") and r.get("ended_at")]
    starts = sorted(r["started_at"] for r in timed)
    ends = sorted(r["ended_at"] for r in timed)
    out = {}
    for r in timed:
        # others that started before this one ended, less those that ended before it started
        n = bisect.bisect_left(starts, r["ended_at"]) - bisect.bisect_right(ends, r["started_at"])
        out[r["id"]] = max(0, n - 1)
    return out


def latency_warnings(rows: list[dict]) -> dict[str, str]:
    """Why a run's latency may be inflated, by run id: a p90 above ``LOADED_SPREAD`` times the
    median, a sweep with ``jobs`` > 1 where recorded, or other runs running at the same time."""
    overlap = concurrent_runs(rows)
    out = {}
    for r in rows:
        med, p90 = r.get("latency_ms_b1"), r.get("latency_ms_b1_p90")
        if med is None:
            continue
        why = []
        if p90 is not None and med > 0 and p90 > LOADED_SPREAD * med:
            why.append(f"p90 {p90 / med:.1f}x the median")
        jobs = next((d.get("jobs") for d in (r.get("config"), r.get("metrics"))
                     if isinstance(d, dict) and d.get("jobs")), None)  # fmt: skip
        if isinstance(jobs, int) and jobs > 1:
            why.append(f"measured with jobs={jobs}")
        elif overlap.get(r["id"]):
            why.append(f"ran while {overlap[r['id']]} other run(s) ran")
        if why:
            out[r["id"]] = "; ".join(why)
    return out


def _tuning(r: dict) -> str:
    return "fine-tuned" if describe(r)["finetuned"] else "one-shot"


# --------------------------------------------------------------------------------------------
# Plots: each returns None when it drew its file, or the reason it drew nothing
# --------------------------------------------------------------------------------------------


def _plt():
    from vitcompress.optional import need

    matplotlib = need("matplotlib", "a report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110})
    return plt


def _ylim(ax, values: list[float], pad: float = 2.0) -> None:
    vals = [v for v in values if v is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - max(pad, (hi - lo) * 0.15)), min(100.0, hi + pad))


def _markers(formats) -> dict[str, str]:
    out, extra = {}, iter(EXTRA_MARKERS * 4)
    for f in sorted(set(formats), key=_fmt_key):
        out[f] = FORMAT_MARKERS.get(f) or next(extra)
    return out


def plot_formats(rows: list[dict], path: Path) -> str | None:
    """Top-1 per format of the dense one-shot runs: study A's post-training quantization."""
    dense = [r for r in rows if (d := describe(r))["sparsity"] == DENSE and _plain_structure(d)
             and not d["finetuned"]]  # fmt: skip
    if not any(describe(r)["format"] != "fp32" for r in dense):
        return "no dense run in a number format other than fp32 (post-training quantization)"
    plt = _plt()
    models = _models(dense)
    formats = sorted({describe(r)["format"] for r in dense}, key=_fmt_key)
    acc: dict[tuple, float] = {}
    for r in dense:
        acc.setdefault((r["model"], describe(r)["format"]), r["top1"] * 100)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models) * max(1, len(formats)) / 3), 4.2))
    width = 0.8 / len(formats)
    cmap = plt.get_cmap("tab10")
    for j, f in enumerate(formats):
        xs = [i + (j - (len(formats) - 1) / 2) * width for i in range(len(models))]
        ys = [acc.get((m, f)) for m in models]
        bars = ax.bar(
            [x for x, y in zip(xs, ys, strict=True) if y is not None],
            [y for y in ys if y is not None],
            width * 0.95,
            label=f,
            color=cmap(j),
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    base = {r["model"]: r.get("base_top1") for r in dense}
    for i, m in enumerate(models):
        if base.get(m) is not None:
            ax.hlines(base[m] * 100, i - 0.45, i + 0.45, colors="k", linestyles=":", lw=1)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("top-1 (%)")
    _ylim(ax, list(acc.values()))
    ax.set_title("Top-1 per format, no retraining (dotted: trained baseline)")
    ax.legend(fontsize=8, title="format", bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def plot_sparsity(rows: list[dict], path: Path) -> str | None:
    """Top-1 against the sparsity target at fp32 weights: fine-tuned runs as filled markers on
    solid lines, one-shot ones hollow on dashed lines (the dense reference is one-shot)."""
    pts = [r for r in rows if _plain_structure(describe(r)) and describe(r)["format"] == "fp32"]
    if not any(describe(r)["sparsity"] != DENSE for r in pts):
        return "no sparse run with fp32 weights (sparse runs in other formats are in the heat map)"
    plt = _plt()
    models = _models(pts)
    levels = sorted({describe(r)["sparsity"] for r in pts}, key=_sp_key)
    unstructured = [s for s in levels if ":" not in s]
    nm = [s for s in levels if ":" in s]
    cats = unstructured + nm
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(cats) + 3), 4.4))
    cmap = plt.get_cmap("tab10")
    allv = []
    for i, m in enumerate(models):
        c = cmap(i)
        acc: dict[tuple, float] = {}
        for r in pts:
            if r["model"] == m:
                d = describe(r)
                acc.setdefault((d["sparsity"], d["finetuned"]), r["top1"] * 100)
        allv += list(acc.values())
        dense = acc.get((DENSE, False))
        for ft in (True, False):
            xs = [k for k, s in enumerate(unstructured) if s != DENSE and (s, ft) in acc]
            if not xs:
                continue
            ys = [acc[(unstructured[k], ft)] for k in xs]
            if dense is not None and unstructured[0] == DENSE:  # the line starts at the dense run
                xs, ys = [0, *xs], [dense, *ys]
            label = f"{m} {'fine-tuned' if ft else 'one-shot'}"
            ax.plot(xs, ys, "-o" if ft else "--o", color=c, lw=1.5, ms=6, mew=1.5,
                    mfc=c if ft else "white", label=label)  # fmt: skip
        if dense is not None:  # the dense run is one-shot: hollow
            ax.plot([0], [dense], "o", color=c, mfc="white", mew=1.5, ms=6, zorder=3)
        for k, s in enumerate(nm):
            for ft in (True, False):
                if (s, ft) not in acc:
                    continue
                y = acc[(s, ft)]
                x = len(unstructured) + k + (i - (len(models) - 1) / 2) * 0.15  # side by side
                ax.plot([x], [y], "s", color=c, ms=8, mfc=c if ft else "white", mew=1.5)
                note = "" if ft else " (one-shot)"
                ax.annotate(f"{y:.1f}{note}", (x, y), textcoords="offset points", xytext=(8, -3),
                            fontsize=7, color=c)  # fmt: skip
    ax.set_xticks(range(len(cats)), [("dense" if c == DENSE else c if ":" in c else f"{c} %")
                                      for c in cats])  # fmt: skip
    if nm:
        ax.axvline(len(unstructured) - 0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlim(-0.4, len(cats) - 0.5 + 0.15 * len(models) + 0.4)  # room for the 2:4 labels
    ax.set_xlabel("sparsity target (unstructured)" + ("   |   N:M" if nm else ""))
    ax.set_ylabel("top-1 (%)")
    _ylim(ax, allv, pad=3)
    ax.set_title("Top-1 against sparsity, fp32 weights\n(filled: fine-tuned, hollow: one-shot)")
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], ls="none", marker="o", color="0.3", mfc="white", mew=1.5))
    labels.append("dense run (one-shot)")
    if nm:
        handles.append(Line2D([], [], ls="none", marker="s", color="0.3", mfc="0.3", ms=8))
        labels.append("N:M (square)")
    ax.legend(handles, labels, fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def _sp_label(col: tuple) -> str:
    sp, ft = col
    text = sp if sp == DENSE or ":" in sp else f"{sp}%"
    return f"{text}\nft" if ft else text


def plot_combinations(rows: list[dict], path: Path) -> str | None:
    """A heat map per model: formats down, sparsity (and fine-tuned or not) across."""
    pts = [r for r in rows if _plain_structure(describe(r))]
    if not any((d := describe(r))["format"] != "fp32" and d["sparsity"] != DENSE for r in pts):
        return ("no run combines a number format with sparsity (each is in its own figure "
                "above)")  # fmt: skip
    plt = _plt()
    import numpy as np

    models = _models(pts)
    fmts = sorted({describe(r)["format"] for r in pts}, key=_fmt_key)
    cols = sorted({(describe(r)["sparsity"], describe(r)["finetuned"]) for r in pts},
                  key=lambda c: (_sp_key(c[0]), c[1]))  # fmt: skip
    ncol = min(2, len(models))
    nrows = -(-len(models) // ncol)
    size = (ncol * max(5.0, 0.85 * len(cols) + 2), nrows * (0.5 * len(fmts) + 1.9))
    fig, axes = plt.subplots(nrows, ncol, figsize=size, squeeze=False)
    vals = [r["top1"] * 100 for r in pts]
    vmin, vmax = min(vals), max(vals)
    im = None
    for ax, m in zip(axes.flat, models, strict=False):
        grid = np.full((len(fmts), len(cols)), np.nan)
        for r in pts:
            d = describe(r)
            i, j = fmts.index(d["format"]), cols.index((d["sparsity"], d["finetuned"]))
            if r["model"] == m and np.isnan(grid[i, j]):
                grid[i, j] = r["top1"] * 100
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(len(fmts)):
            for j in range(len(cols)):
                v = grid[i, j]
                if not np.isnan(v):
                    colour = "white" if v < (vmin + vmax) / 2 else "black"
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(cols)), [_sp_label(c) for c in cols], fontsize=8)
        ax.set_yticks(range(len(fmts)), fmts, fontsize=8)
        ax.set_title(m)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.suptitle("Top-1 (%) of format x sparsity\n(ft: fine-tuned; blank: not in the study)")
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="top-1 (%)")
    fig.savefig(path)
    plt.close(fig)
    return None


def study_b_rows(rows: list[dict]) -> list[dict]:
    """Study B's variants per model: the dense fp32 run, SVD runs, dynamic quantisation."""
    out = []
    for r in rows:
        d = describe(r)
        plain = d["sparsity"] == DENSE and not d["finetuned"] and d["shrink"] is None
        if plain and (d["lowrank"] is not None or d["format"] in ("fp32", "int8-dyn")):
            out.append(r)
    return sorted(out, key=lambda r: (_model_key(r), describe(r)["lowrank"] is not None,
                                      -(describe(r)["lowrank"] or 0), r["recipe"]))  # fmt: skip


def _variant(r: dict) -> str:
    d = describe(r)
    if d["lowrank"] is not None:
        return f"SVD, rank ratio {d['lowrank']:g}"
    if d["format"] == "int8-dyn":
        return "dynamic INT8"
    return "dense fp32"


def plot_study_b(rows: list[dict], path: Path) -> str | None:
    sel = study_b_rows(rows)
    if not any(_variant(r) != "dense fp32" for r in sel):
        return "no SVD (low-rank) or dynamic INT8 run, study B's two techniques"
    plt = _plt()
    head = ["model", "variant", "top-1 %", "ms b1 median / p90", "size on disk KB",
            "x smaller", "params", "non-zero"]  # fmt: skip
    cells = []
    warn = latency_warnings(rows)
    for r in sel:
        lat = (
            f"{r['latency_ms_b1']:.2f} / {r['latency_ms_b1_p90']:.2f}"
            + (" (loaded)" if r["id"] in warn else "")
            if r.get("latency_ms_b1") is not None and r.get("latency_ms_b1_p90") is not None
            else "-"
        )
        ratio = (r["bytes_fp32"] / r["bytes_stored"] if r.get("bytes_fp32")
                 and r.get("bytes_stored") else None)  # fmt: skip
        cells.append([
            r["model"], _variant(r), f"{r['top1'] * 100:.2f}", lat,
            f"{r['bytes_stored'] / 1024:,.1f}" if r.get("bytes_stored") is not None else "-",
            f"{ratio:.2f}" if ratio else "-",
            f"{r['params_total']:,}" if r.get("params_total") is not None else "-",
            f"{r['params_nonzero']:,}" if r.get("params_nonzero") is not None else "-",
        ])  # fmt: skip
    fig, ax = plt.subplots(figsize=(11, 0.3 * (len(cells) + 1.6) + 0.45))
    ax.axis("off")
    widths = [1.1, 1.7, 0.7, 1.2, 1.1, 0.8, 0.9, 0.9]
    t = ax.table(cellText=cells, colLabels=head, cellLoc="center", bbox=[0, 0, 1, 1],
                 colWidths=[w / sum(widths) for w in widths])  # fmt: skip
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    for (i, _), c in t.get_celld().items():
        if i == 0:
            c.set_facecolor("#dde6f0")
    ax.set_title("Study B: SVD and dynamic INT8 against the dense fp32 model (no retraining)",
                 pad=4)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) that no other point beats: lower or equal cost and
    higher accuracy. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# label offsets (points) tried in turn around a front point: near first, then farther out
_DIRECTIONS = ((5, 4), (5, -12), (-11, 4), (-11, -12), (-3, 9), (-3, -17), (9, -4), (-16, -4))
_OFFSETS = [(r * dx, r * dy) for r in (1.0, 2.0, 3.2) for dx, dy in _DIRECTIONS]


def place_labels(ax, anchors: list[tuple[float, float]], texts: list[str], obstacles=()) -> list:
    """Annotate every anchor (data coordinates) with its text, none skipped: each label takes
    the first offset of ``_OFFSETS`` where it overlaps no label placed before, no marker (the
    anchors and ``obstacles``, data coordinates) and stays inside the axes; failing that, the
    offset with the fewest overlaps, and far labels get a leader line. Returns the annotations.
    """
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    marks = [
        (ax.transData.transform(p), 10 if i < len(anchors) else 5)
        for i, p in enumerate([*anchors, *obstacles])
    ]  # a front point wears a ring
    mbox = [Bbox.from_bounds(x - h, y - h, 2 * h, 2 * h) for (x, y), h in marks]
    placed: list = []
    out = []
    for k, (xy, text) in enumerate(zip(anchors, texts, strict=True)):
        best = None
        for dx, dy in _OFFSETS:
            ann = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              fontweight="bold", zorder=6)  # fmt: skip
            bb = ann.get_window_extent(renderer).padded(1.5)
            inside = axbox.contains(bb.x0, bb.y0) and axbox.contains(bb.x1, bb.y1)
            clash = (
                3 * sum(bb.overlaps(b) for b in placed)
                + sum(bb.overlaps(b) for i, b in enumerate(mbox) if i != k)
                + (0 if inside else 5)
            )
            if best is None or clash < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clash, ann, bb, (dx, dy))
            else:
                ann.remove()
            if clash == 0:
                break
        _, ann, bb, (dx, dy) = best
        if abs(dx) > 12 or abs(dy) > 18:
            ann.remove()
            leader = {"arrowstyle": "-", "lw": 0.6, "color": "0.3"}
            ann = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=8,
                              fontweight="bold", zorder=6, arrowprops=leader)  # fmt: skip
        placed.append(bb)
        out.append(ann)
    return out


def _num(v: float) -> str:
    """A cost as people write it: 1,480 and 58.2 and 0.0046, never 1.48e+03."""
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def plot_pareto(rows: list[dict], path: Path, cost: str) -> str | None:
    """Top-1 against ``cost``: colour per model, marker per format, filled when fine-tuned and
    hollow when one-shot; the Pareto front as a dashed step line with ringed, numbered points,
    and the numbers' key beside the plot. Latency points get a bar from the median to the p90.
    """
    pts = [r for r in rows if r.get(cost) is not None and r.get("top1") is not None]
    if not pts:
        return {
            "latency_ms_b1": "no run has a latency (speed not measured, or no CPU kernel runs "
            "its format)",
            "bops": "no run records BOPs (results written before vitcompress cost existed)",
        }.get(cost, f"no run records {cost}")
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    xlabel, scale, what = PARETO_AXES[cost]
    models = _models(pts)
    cmap = plt.get_cmap("tab10")
    colour = {m: cmap(i % 10) for i, m in enumerate(models)}
    marker = _markers(describe(r)["format"] for r in pts)
    front = pareto_front([(r[cost], r["top1"]) for r in pts])
    keys = []
    for n, i in enumerate(front, 1):
        r = pts[i]
        c = r[cost] / scale
        ft = " (ft)" if describe(r)["finetuned"] else ""
        keys.append(f"{n:>2}  {r['model']} {r['recipe']}{ft}  {r['top1'] * 100:.2f} %, {_num(c)}")
    height = max(5.4, 0.16 * (len(keys) + len(models) + len(marker)) + 2.6)
    fig = plt.figure(figsize=(13, height))
    grid = fig.add_gridspec(1, 2, width_ratios=(2.5, 1), wspace=0.03)
    ax, side = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    side.axis("off")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in pts:
        groups[(r["model"], describe(r)["format"], describe(r)["finetuned"])].append(r)
    for (m, f, ft), sel in groups.items():
        xs, ys = [r[cost] / scale for r in sel], [r["top1"] * 100 for r in sel]
        if cost == "latency_ms_b1":  # the spread: a bar from the median to the p90
            p90 = [max(0.0, (r.get("latency_ms_b1_p90") or r[cost]) - r[cost]) for r in sel]
            ax.errorbar(xs, ys, xerr=[[0] * len(sel), p90], fmt="none", ecolor=colour[m],
                        alpha=0.45, lw=0.9, capsize=2, zorder=2)  # fmt: skip
        ax.scatter(xs, ys, marker=marker[f], s=38, linewidths=1.3, edgecolors=[colour[m]],
                   facecolors=[colour[m]] if ft else "none", alpha=0.9, zorder=3)  # fmt: skip
    fx = [pts[i][cost] / scale for i in front]
    fy = [pts[i]["top1"] * 100 for i in front]
    ax.step(fx, fy, where="post", color="k", lw=1.6, ls="--", alpha=0.8, zorder=2)
    ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="k", linewidths=1.0, zorder=4)
    ax.set_xscale("log")
    xs_all = [r[cost] / scale for r in pts]
    lo, hi = min(xs_all), max(xs_all)
    if cost == "latency_ms_b1":
        hi = max([hi] + [r["latency_ms_b1_p90"] for r in pts if r.get("latency_ms_b1_p90")])
    ax.set_xlim(lo / 1.25, hi * 1.25)
    decades = math.log10(hi * 1.25 / (lo / 1.25))  # more labelled ticks on a short axis
    subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 1.3 else (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(subs=subs if decades < 3.5 else (1.0,)))
    ax.xaxis.set_minor_locator(LogLocator(subs="all"))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _num(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    _ylim(ax, [r["top1"] * 100 for r in pts], pad=1.5)
    ax.set_xlabel(xlabel + ("; bar: median to p90" if cost == "latency_ms_b1" else ""))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Top-1 against {what} (up and to the left is better)")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    blank = Line2D([], [], ls="none")
    handles, labels = [blank], ["model (colour)"]
    for m in models:
        handles.append(Line2D([], [], ls="none", marker="o", color=colour[m], ms=7))
        labels.append(m)
    handles.append(blank)
    labels.append("format (marker)")
    for f, mk in marker.items():
        handles.append(Line2D([], [], ls="none", marker=mk, color="0.3", mfc="0.3", ms=7))
        labels.append(f)
    handles += [
        blank,
        Line2D([], [], ls="none", marker="o", color="0.3", mfc="0.3", ms=7),
        Line2D([], [], ls="none", marker="o", color="0.3", mfc="white", ms=7),
        Line2D([], [], color="k", ls="--", lw=1.6, marker="o", mfc="none", ms=11),
    ]
    labels += ["", "filled: fine-tuned", "hollow: one-shot", "Pareto front (numbered)"]
    leg = side.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=8,
                      frameon=False, handletextpad=0.4, borderaxespad=0.0)  # fmt: skip
    for t in leg.get_texts():
        if t.get_text() in ("model (colour)", "format (marker)"):
            t.set_fontweight("bold")
    fig.subplots_adjust(left=0.06, right=0.99, top=0.93, bottom=0.1)
    place_labels(ax, list(zip(fx, fy, strict=True)), [str(n) for n in range(1, len(front) + 1)],
                 [(r[cost] / scale, r["top1"] * 100) for k, r in enumerate(pts)
                  if k not in set(front)])  # fmt: skip
    renderer = fig.canvas.get_renderer()
    lb = leg.get_window_extent(renderer).transformed(side.transAxes.inverted())
    unit = {"bytes_stored": "KB", "latency_ms_b1": "ms", "bops": "GBOPs"}.get(cost, "")
    side.text(0.0, lb.y0 - 0.03, f"On the front (top-1, {unit}):\n" + "\n".join(keys),
              transform=side.transAxes, va="top", ha="left", fontsize=8,
              family="monospace")  # fmt: skip
    fig.savefig(path)
    plt.close(fig)
    return None


def _kind(r: dict) -> str:
    d = describe(r)
    if d["lowrank"] is not None:
        return "lowrank"
    if d["shrink"] is not None:
        return "shrink"
    if ":" in d["sparsity"]:
        return "2:4"
    return "dense" if d["sparsity"] == DENSE else "sparse"


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

TABLE_COLS = (
    ("model", "model", None), ("recipe", "recipe", None), ("tuning", "tuning", None),
    ("status", "status", None), ("top1", "top-1 %", "pct"), ("top5", "top-5 %", "pct"),
    ("images", "test images", None), ("bytes_stored", "KB stored", "kb"),
    ("ratio", "x smaller", "x"), ("params_total", "params", "int"),
    ("params_nonzero", "non-zero", "int"), ("sparsity", "sparsity %", "pct"),
    ("format", "format", None), ("latency_ms_b1", "ms b1 median", "f2"),
    ("latency_ms_b1_p90", "ms b1 p90", "f2"), ("throughput_b32", "img/s b32", "f1"),
    ("runtime", "runtime", None), ("size_band", "size band", None), ("wall_s", "wall s", "f1"),
    ("id", "run id", None), ("error", "error", None),
)  # fmt: skip
LATENCY_COLS = ("latency_ms_b1", "latency_ms_b1_p90")

_JS = """
function sortBy(th){const t=th.closest('table'),b=t.tBodies[0],i=[...th.parentNode.children]
.indexOf(th),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';const v=r=>{const c=r.cells[i],
s=c.dataset.v??c.textContent;const n=parseFloat(s);return isNaN(n)?s:n};[...b.rows].sort((x,y)=>{
const a=v(x),c=v(y);if(a===c)return 0;if(typeof a!==typeof c)return typeof a==='number'?-1:1;
return (a<c?-1:1)*(asc?1:-1)}).forEach(r=>b.appendChild(r))}
"""

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}
.scroll{overflow-x:auto;max-width:100%}.scroll td{white-space:nowrap}
.scroll td.err{white-space:normal;min-width:16em}
th{background:#eef;cursor:pointer;position:sticky;top:0}td.n{text-align:right}
tr.failed td{background:#fee}tr.running td{background:#ffd}td.loaded{background:#fff1cc}
img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}
figcaption{font-weight:600;margin-bottom:.4em}.small{color:#666;font-size:12px}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:.6em 1em;margin:1em 0}
table.findings{font-size:14px;width:100%;table-layout:fixed}
table.findings td{vertical-align:top;padding:6px}
table.findings th{cursor:default}.verdict{font-weight:700;white-space:nowrap}
.holds{color:#116b2a;background:#e6f4ea}.fails{color:#b3261e;background:#fce8e6}
.nm{color:#555;background:#f1f3f4}
.tag{font-weight:400;font-size:12px;color:#7a5b00;margin-top:.3em}
details summary{cursor:pointer;color:#335;font-size:12px}details div{font-size:12px}
"""

_VERDICT_CLASS = {"holds": "holds", "does not hold": "fails", "not measured": "nm"}


def _cell(r: dict, key: str, kind: str | None) -> tuple[str, str]:
    """(text shown, sort value) of one table cell."""
    if key == "ratio":
        v = (r["bytes_fp32"] / r["bytes_stored"]) if r.get("bytes_stored") and r.get(
            "bytes_fp32") else None  # fmt: skip
    elif key == "images":
        n, text = eval_images(r)
        return (text, repr(n)) if r.get("status") == "ok" else ("", "")
    elif key == "format" and r.get("status") == "ok":
        v = describe(r)["format"]  # int8-dyn apart from static int8
    elif key == "tuning":
        return (_tuning(r), _tuning(r)) if (r.get("config") or {}).get("recipe") else ("", "")
    else:
        v = r.get(key)
    if v is None:
        return "", ""
    if kind == "pct":
        return f"{v * 100:.2f}", repr(v)
    if kind == "kb":
        return f"{v / 1024:,.1f}", repr(v)
    if kind == "int":
        return f"{int(v):,}", repr(v)
    if kind == "x":
        return f"{v:.2f}", repr(v)
    if kind in ("f1", "f2"):
        return f"{v:.{kind[1]}f}", repr(v)
    return str(v), str(v)


def _table(rows: list[dict], cols=TABLE_COLS, sortable: bool = True, warn=None) -> str:
    """An HTML table; ``warn`` (run id -> why) marks latency cells measured on a loaded CPU."""
    warn = warn or {}
    onclick = ' onclick="sortBy(this)"' if sortable else ""
    head = "".join(f"<th{onclick}>{html.escape(label)}</th>" for _, label, _ in cols)
    body = []
    for r in rows:
        tds = []
        for key, _, kind in cols:
            text, sv = _cell(r, key, kind)
            cls = ["n"] if kind else ["err"] if key == "error" else []
            title = ""
            if key in LATENCY_COLS and text and r.get("id") in warn:
                cls.append("loaded")
                text += " \u26a0"
                title = f' title="{html.escape(warn[r["id"]])}"'
            c = f' class="{" ".join(cls)}"' if cls else ""
            tds.append(f'<td{c}{title} data-v="{html.escape(sv)}">{html.escape(text)}</td>')
        body.append(f'<tr class="{html.escape(str(r.get("status")))}">{"".join(tds)}</tr>')
    rows_html = "".join(body)
    return (f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{rows_html}"
            "</tbody></table></div>")  # fmt: skip


def _latency_warning(rows: list[dict], warn: dict[str, str]) -> str:
    timed = [r for r in rows if r.get("latency_ms_b1") is not None]
    if not warn:
        return ""
    spread = [r for r in timed if "p90" in warn.get(r["id"], "")]
    shared = [r for r in timed if "ran" in warn.get(r["id"], "") or "jobs" in warn.get(r["id"], "")]
    parts = []
    if spread:
        worst = max(spread, key=lambda r: r["latency_ms_b1_p90"] / r["latency_ms_b1"])
        parts.append(
            f"{len(spread)} of {len(timed)} runs have a p90 latency more than {LOADED_SPREAD:g}x "
            f"their median (worst: {html.escape(worst['model'])} {html.escape(worst['recipe'])}, "
            f"{worst['latency_ms_b1']:.2f} ms median, {worst['latency_ms_b1_p90']:.2f} ms p90)"
        )
    if shared:
        parts.append(
            f"{len(shared)} of {len(timed)} runs ran at the same time as other runs of this "
            "results file (<code>--jobs</code> &gt; 1 or several sweeps): their latencies were "
            "measured while the CPU was shared"
        )
    return (
        "<div class='warn'><b>\u26a0 Latency measured on a loaded machine.</b> "
        + "; ".join(parts)
        + ". These cells are marked \u26a0 in the tables (hover for why); compare latencies "
        "only between runs measured alone, or rerun with <code>--jobs 1</code> on an idle "
        "machine.</div>"
    )


def _baselines_item(ok: list[dict]) -> str:
    """The trained models' own top-1: the level every compressed run starts from."""
    base: dict[str, float] = {}
    for r in sorted(ok, key=_model_key):
        if r.get("base_top1") is not None:
            base.setdefault(r["model"], r["base_top1"])
    if not base:
        return ""
    text = ", ".join(f"{html.escape(m)} {v * 100:.2f} %" for m, v in base.items())
    return f"<li>Trained models before compression (baseline top-1, same images): {text}.</li>"


def _findings_html(found: list, note: str | None) -> str:
    from vitcompress.findings import THRESHOLD

    rows = []
    for f in found:
        cls = _VERDICT_CLASS.get(f.verdict, "")
        details = ""
        if f.details:
            items = "<br>".join(html.escape(d) for d in f.details)
            details = (f"<details><summary>{len(f.details)} comparison"
                       f"{'s' if len(f.details) != 1 else ''}</summary><div>{items}</div>"
                       "</details>")  # fmt: skip
        tag = "<div class='tag'>may be noise</div>" if f.caveat else ""
        caveat = f" <i>{html.escape(f.caveat)}</i>" if f.caveat else ""
        rows.append(
            f"<tr><td><b>{html.escape(f.key)}</b></td><td>{html.escape(f.statement)}</td>"
            f"<td class='verdict {cls}'>{html.escape(f.verdict)}{tag}</td>"
            f"<td>{html.escape(f.evidence)}{caveat}{details}</td>"
            f"<td class='small'>{html.escape(f.test)}</td></tr>"
        )
    head = ("<tr><th style='width:3em'></th><th style='width:22%'>finding of the reference "
            "study</th><th style='width:8em'>verdict</th><th style='width:38%'>this sweep's "
            "numbers</th><th>how it is tested here</th></tr>")  # fmt: skip
    intro = (
        "<h2>The reference studies' findings, on this sweep</h2>"
        f"<p class='small'>A loss is <i>significant</i> when it is more than {THRESHOLD:g} top-1 "
        "points (pts); <i>not measured</i> means this sweep has no runs that test the finding "
        "(the reason is given). Study A used RESISC45 and Tiny/Small/Base models, study B "
        "CIFAR-10 and a 32 M-parameter ViT: a verdict here is about this sweep's data and "
        "models only." + (f" {html.escape(note)}" if note else "") + "</p>"
    )
    body = "".join(rows)
    return f"{intro}<table class='findings'><thead>{head}</thead><tbody>{body}</tbody></table>"


def _html(
    rows: list[dict], images: dict[str, Path], skipped: dict[str, str], source: Path,
    found: list, csv_name: str,
) -> str:  # fmt: skip
    from vitcompress.findings import noise_note

    studies = sorted({str(r.get("study")) for r in rows})
    counts = {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "failed", "running")}
    ok = [r for r in rows if r.get("status") == "ok" and r.get("top1") is not None]
    warn = latency_warnings(rows)
    best = best_per_band(rows)
    ft = sum(describe(r)["finetuned"] for r in ok)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>vitcompress report: {html.escape(', '.join(studies))}</title>",
        f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
        f"<h1>vitcompress report: {html.escape(', '.join(studies))}</h1>",
        f"<p>{len(rows)} runs: {counts['ok']} ok ({ft} fine-tuned, {len(ok) - ft} one-shot), "
        f"{counts['failed']} failed, {counts['running']} unfinished. Results file: "
        f"<code>{html.escape(str(source))}</code> (also as <code>results.json</code> and "
        f"<code>{html.escape(csv_name)}</code> beside it). "
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.</p>",
        "<h2>What the numbers are</h2><ul>",
        f"<li>{_images_sentence(ok)}</li>",
        "<li>Size: bytes as stored by the packed format (<i>x smaller</i>: the dense fp32 "
        "weights' bytes over that).</li>",
        "<li>Latency: median and 90th percentile (p90) of timed batch-1 forward passes on this "
        "machine's CPU runtime for the format (blank where no kernel runs it); the gap between "
        "the two is the spread of the measurement. A machine busy all through a measurement "
        "slows every pass alike and leaves the spread narrow: compare latencies only within one "
        "sweep run with <code>--jobs 1</code> on an otherwise idle machine.</li>",
        _baselines_item(ok),
        "<li><i>fine-tuned</i>: the recipe trained the model again after compressing it; "
        "<i>one-shot</i>: no retraining. Figures mark the two apart (filled / hollow markers, "
        "<i>ft</i> in the heat map).</li></ul>",
        _latency_warning(rows, warn),
        _findings_html(found, noise_note(ok)),
        "<h2>Best runs per size band (top-1)</h2>",
    ]
    keep = ("model", "recipe", "tuning", "top1", "images", "bytes_stored", "ratio",
            "params_nonzero", "latency_ms_b1", "latency_ms_b1_p90", "format")  # fmt: skip
    short = [c for c in TABLE_COLS if c[0] in keep]
    for band, rs in best.items():
        parts.append(f"<h3>{html.escape(band)}</h3>{_table(rs, short, False, warn)}")
    for name, caption in PLOTS:
        if name in images:
            data = base64.b64encode(images[name].read_bytes()).decode()
            parts.append(
                f"<figure><figcaption>{html.escape(caption)}</figcaption>"
                f"<img alt='{name}' src='data:image/png;base64,{data}'></figure>"
            )
    if skipped:
        items = "".join(
            f"<li><b>{html.escape(caption)}</b>: not drawn, {html.escape(skipped[name])}.</li>"
            for name, caption in PLOTS
            if name in skipped
        )
        parts.append(f"<h2>Not in this report</h2><ul>{items}</ul>")
    parts += [
        "<h2>All runs</h2><p class='small'>Click a column to sort.</p>",
        _table(rows, warn=warn),
        "</body></html>",
    ]
    return "\n".join(parts)


def _csv_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        c = r.get("config") if isinstance(r.get("config"), dict) else {}
        m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        ft = describe(r)["finetuned"] if c.get("recipe") else None
        out.append({**r, "limit": c.get("limit"), "samples": m.get("samples"), "finetuned": ft})
    return out


def build_report(results_dir: Path) -> Path:
    """Write ``plots/*.png``, ``results.json``, ``results.csv`` and ``report.html`` in
    ``results_dir``; return the HTML path."""
    from vitcompress.findings import findings

    results_dir = Path(results_dir)
    db = results_dir / DB_NAME if results_dir.is_dir() else results_dir
    if not db.is_file():
        raise VitcompressError(f"no results in {results_dir} (expected {DB_NAME}); run a sweep")
    out_dir = db.parent
    rows = read_results(db)
    ok = [r for r in rows if r.get("status") == "ok" and r.get("top1") is not None]
    if len({r.get("data") for r in ok}) > 1:  # the same model on several data sets: tell apart
        ok = [{**r, "model": f"{r['model']} @ {r.get('data')}"} for r in ok]
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    makers = {
        "formats": plot_formats,
        "sparsity": plot_sparsity,
        "combinations": plot_combinations,
        "study_b": plot_study_b,
        "pareto_size": lambda rs, p: plot_pareto(rs, p, "bytes_stored"),
        "pareto_latency": lambda rs, p: plot_pareto(rs, p, "latency_ms_b1"),
        "pareto_bops": lambda rs, p: plot_pareto(rs, p, "bops"),
    }
    images: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name, make in makers.items():
        path = plots / f"{name}.png"
        path.unlink(missing_ok=True)
        why = make(ok, path) if ok else "no finished run"
        if why is None:
            images[name] = path
        else:
            skipped[name] = why
    csv_path = out_dir / "results.csv"
    write_csv(_csv_rows(rows), csv_path, (*CSV_FIELDS, "limit", "samples", "finetuned"))
    report = out_dir / "report.html"
    report.write_text(_html(rows, images, skipped, db, findings(ok), csv_path.name),
                      encoding="utf-8")  # fmt: skip
    (out_dir / "results.json").write_text(
        json.dumps(
            [{k: v for k, v in r.items() if k != "traceback"} for r in rows], indent=1, default=str
        )  # fmt: skip
    )
    return report


def format_best(rows: list[dict], n: int = 5) -> str:
    """Plain text: the ``n`` best runs by top-1 in each size band."""
    lines = []
    for band, rs in best_per_band(rows, n).items():
        lines.append(f"{band}:")
        for r in rs:
            lat = r.get("latency_ms_b1")
            lines.append(
                f"  {r['top1'] * 100:6.2f} %  {r['bytes_stored'] / 1024:8.1f} KB  "
                f"{(f'{lat:.2f} ms' if lat is not None else '-'):>9}  {r['model']} {r['recipe']}"
            )
    return "\n".join(lines)
