"""The report's figures (matplotlib, PNG): each ``plot_*`` draws its file and returns None, or
returns why it drew nothing (a figure with nothing to show is left out of the report)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from vitcompress.results import (
    DENSE,
    EXTRA_MARKERS,
    FORMAT_MARKERS,
    PARETO_AXES,
    describe,
    fmt_key,
    latency_warnings,
    model_key,
    model_order,
    plain_structure,
    sp_key,
)

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
    for f in sorted(set(formats), key=fmt_key):
        out[f] = FORMAT_MARKERS.get(f) or next(extra)
    return out


def plot_formats(rows: list[dict], path: Path) -> str | None:
    """Top-1 per format of the dense one-shot runs: study A's post-training quantization."""
    dense = [r for r in rows if (d := describe(r))["sparsity"] == DENSE and plain_structure(d)
             and not d["finetuned"]]  # fmt: skip
    if not any(describe(r)["format"] != "fp32" for r in dense):
        return "no dense run in a number format other than fp32 (post-training quantization)"
    plt = _plt()
    models = model_order(dense)
    formats = sorted({describe(r)["format"] for r in dense}, key=fmt_key)
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
        for x, y in zip(xs, ys, strict=True):
            if y is None:  # a gap, not a zero: say the run is not in this sweep
                ax.text(x, 0.02, "not run", rotation=90, ha="center", va="bottom", fontsize=7,
                        color="0.45", transform=ax.get_xaxis_transform())  # fmt: skip
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
    pts = [r for r in rows if plain_structure(describe(r)) and describe(r)["format"] == "fp32"]
    if not any(describe(r)["sparsity"] != DENSE for r in pts):
        return "no sparse run with fp32 weights (sparse runs in other formats are in the heat map)"
    plt = _plt()
    models = model_order(pts)
    levels = sorted({describe(r)["sparsity"] for r in pts}, key=sp_key)
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
    pts = [r for r in rows if plain_structure(describe(r))]
    if not any((d := describe(r))["format"] != "fp32" and d["sparsity"] != DENSE for r in pts):
        return ("no run combines a number format with sparsity (each is in its own figure "
                "above)")  # fmt: skip
    plt = _plt()
    import numpy as np

    models = model_order(pts)
    fmts = sorted({describe(r)["format"] for r in pts}, key=fmt_key)
    cols = sorted({(describe(r)["sparsity"], describe(r)["finetuned"]) for r in pts},
                  key=lambda c: (sp_key(c[0]), c[1]))  # fmt: skip
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
    # a model's dense row is the reference of its variants: without any, it says nothing here
    has_variant = {r["model"] for r in out if _variant(r) != "dense fp32"}
    out = [r for r in out if r["model"] in has_variant]
    return sorted(out, key=lambda r: (model_key(r), describe(r)["lowrank"] is not None,
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
    models = model_order(pts)
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
