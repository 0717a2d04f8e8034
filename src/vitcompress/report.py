"""The report of a sweep: the reference studies' figures on its own results, and one HTML page.

``build_report(DIR)`` reads ``DIR/results.sqlite`` and writes PNGs to ``DIR/plots/`` and a
self-contained ``DIR/report.html`` (the PNGs embedded, a sortable table of every run, no
network):

- ``formats.png``: top-1 per number format (dense models), one group per family and size
  (study A's first figure);
- ``sparsity.png``: top-1 against the sparsity target, unstructured (cubic) as lines and 2:4
  beside them (study A);
- ``combinations.png``: top-1 of every format x sparsity combination, one heat map per model;
- ``study_b.png``: study B's table (accuracy, latency, size on disk, parameters per variant);
- ``pareto_size.png`` / ``pareto_latency.png``: top-1 against bytes as stored and against batch-1
  latency, with the Pareto front (no other run is both smaller/faster and more accurate).

Runs are placed by what their recipe did (``format``, ``pattern``, ``sparsity_target``,
``rank_ratio`` and the recipe steps), never by their names.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from vitcompress.errors import VitcompressError
from vitcompress.studies.store import DB_NAME, band_order, read_results, size_band

SIZE_ORDER = ("nano", "micro", "tiny", "small", "base", "large")
FAMILY_ORDER = ("vit", "deit", "resnet")
FORMAT_ORDER = ("fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8", "int8-dyn")
DENSE = "dense"
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


# --------------------------------------------------------------------------------------------
# Plots
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


def plot_formats(rows: list[dict], path: Path) -> bool:
    dense = [r for r in rows if (d := describe(r))["sparsity"] == DENSE and _plain_structure(d)]
    if not dense:
        return False
    plt = _plt()
    models = _models(dense)
    formats = sorted({describe(r)["format"] for r in dense}, key=_fmt_key)
    acc = {(r["model"], describe(r)["format"]): r["top1"] * 100 for r in dense}
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
    ax.set_title("Top-1 per format (dotted: trained baseline)")
    ax.legend(fontsize=8, title="format", bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_sparsity(rows: list[dict], path: Path) -> bool:
    """Top-1 against sparsity target at fp32 weights (the best format if a model has no fp32)."""
    pts = [r for r in rows if _plain_structure(describe(r)) and describe(r)["format"] == "fp32"]
    if not any(describe(r)["sparsity"] != DENSE for r in pts):
        return False
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
        acc = {describe(r)["sparsity"]: r["top1"] * 100 for r in pts if r["model"] == m}
        xs = [k for k, s in enumerate(unstructured) if s in acc]
        ys = [acc[unstructured[k]] for k in xs]
        allv += list(acc.values())
        ax.plot(xs, ys, "o-", color=cmap(i), label=m)
        for k, s in enumerate(nm):
            if s in acc:
                x = len(unstructured) + k + (i - (len(models) - 1) / 2) * 0.15  # side by side
                ax.plot([x], [acc[s]], "s", color=cmap(i), ms=9, mfc="none", mew=2)
                ax.annotate(f"{acc[s]:.1f}", (x, acc[s]), textcoords="offset points",
                            xytext=(8, -3), fontsize=7, color=cmap(i))  # fmt: skip
    ax.set_xticks(range(len(cats)), [("dense" if c == DENSE else c if ":" in c else f"{c} %")
                                      for c in cats])  # fmt: skip
    if nm:
        ax.axvline(len(unstructured) - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("sparsity target (cubic schedule, unstructured)   |   N:M one shot")
    ax.set_ylabel("top-1 (%)")
    _ylim(ax, allv, pad=3)
    ax.set_title("Top-1 against sparsity (fp32 weights, after the short fine-tune)")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_combinations(rows: list[dict], path: Path) -> bool:
    pts = [r for r in rows if _plain_structure(describe(r))]
    if not pts:
        return False
    plt = _plt()
    models = _models(pts)
    fmts = sorted({describe(r)["format"] for r in pts}, key=_fmt_key)
    sps = sorted({describe(r)["sparsity"] for r in pts}, key=_sp_key)
    cols = min(2, len(models))
    nrows = -(-len(models) // cols)
    size = (cols * max(5.0, 0.85 * len(sps) + 2), nrows * (0.5 * len(fmts) + 1.6))
    fig, axes = plt.subplots(nrows, cols, figsize=size, squeeze=False)
    import numpy as np

    vals = [r["top1"] * 100 for r in pts]
    vmin, vmax = min(vals), max(vals)
    im = None
    for ax, m in zip(axes.flat, models, strict=False):
        grid = np.full((len(fmts), len(sps)), np.nan)
        for r in pts:
            if r["model"] == m:
                d = describe(r)
                grid[fmts.index(d["format"]), sps.index(d["sparsity"])] = r["top1"] * 100
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(len(fmts)):
            for j in range(len(sps)):
                v = grid[i, j]
                if not np.isnan(v):
                    colour = "white" if v < (vmin + vmax) / 2 else "black"
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(sps)), [s if s in (DENSE,) or ":" in s else f"{s}%" for s in sps],
                      fontsize=8)  # fmt: skip
        ax.set_yticks(range(len(fmts)), fmts, fontsize=8)
        ax.set_title(m)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.suptitle("Top-1 (%) of format x sparsity (blank: not in the study)")
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="top-1 (%)")
    fig.savefig(path)
    plt.close(fig)
    return True


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


def plot_study_b(rows: list[dict], path: Path) -> bool:
    sel = study_b_rows(rows)
    if not sel:
        return False
    plt = _plt()
    head = ["model", "variant", "top-1 %", "latency b1 ms\n(median / p90)", "size on disk KB",
            "params", "non-zero"]  # fmt: skip
    cells = []
    for r in sel:
        lat = (
            f"{r['latency_ms_b1']:.2f} / {r['latency_ms_b1_p90']:.2f}"
            if r.get("latency_ms_b1") is not None and r.get("latency_ms_b1_p90") is not None
            else "-"
        )
        cells.append([
            r["model"], _variant(r), f"{r['top1'] * 100:.2f}", lat,
            f"{r['bytes_stored'] / 1024:,.1f}" if r.get("bytes_stored") is not None else "-",
            f"{r['params_total']:,}" if r.get("params_total") is not None else "-",
            f"{r['params_nonzero']:,}" if r.get("params_nonzero") is not None else "-",
        ])  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(cells) + 1.2))
    ax.axis("off")
    t = ax.table(cellText=cells, colLabels=head, loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    t.scale(1, 1.5)
    for (i, _), c in t.get_celld().items():
        if i == 0:
            c.set_facecolor("#dde6f0")
            c.set_height(c.get_height() * 1.6)
    ax.set_title("Study B: SVD and dynamic INT8 against the dense fp32 model", pad=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


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


def plot_pareto(rows: list[dict], path: Path, cost: str) -> bool:
    pts = [r for r in rows if r.get(cost) is not None and r.get("top1") is not None]
    if not pts:
        return False
    plt = _plt()
    models = _models(pts)
    cmap = plt.get_cmap("tab10")
    markers = {"dense": "o", "sparse": "^", "2:4": "s", "lowrank": "D", "shrink": "v"}
    fig, ax = plt.subplots(figsize=(10.5, 5.4))
    xlabel, scale, what = PARETO_AXES[cost]
    for i, m in enumerate(models):
        for kind, mk in markers.items():
            sel = [r for r in pts if r["model"] == m and _kind(r) == kind]
            if sel:
                ax.scatter([r[cost] / scale for r in sel], [r["top1"] * 100 for r in sel],
                           c=[cmap(i)], marker=mk, s=28, alpha=0.85,
                           label=f"{m} {kind}")  # fmt: skip
    xy = [(r[cost], r["top1"]) for r in pts]
    front = pareto_front(xy)
    fx = [pts[i][cost] / scale for i in front]
    fy = [pts[i]["top1"] * 100 for i in front]
    ax.step(fx, fy, where="post", color="k", lw=1, alpha=0.7, label="Pareto front")
    ax.set_xscale("log")
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []  # label anchors in pixels: skip crowded ones
    for i in front:
        r = pts[i]
        xy = (r[cost] / scale, r["top1"] * 100)
        px, py = ax.transData.transform(xy)
        if any(abs(py - qy) < 12 and abs(px - qx) < 170 for qx, qy in placed):
            continue
        placed.append((px, py))
        ax.annotate(f"{r['model']} {r['recipe']}", xy, textcoords="offset points",
                    xytext=(5, -10), fontsize=7)  # fmt: skip
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"Top-1 against {what} (up and to the left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


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
    ("model", "model", None), ("recipe", "recipe", None), ("status", "status", None),
    ("top1", "top-1 %", "pct"), ("top5", "top-5 %", "pct"), ("bytes_stored", "KB stored", "kb"),
    ("ratio", "x smaller", "x"), ("params_total", "params", "int"),
    ("params_nonzero", "non-zero", "int"), ("sparsity", "sparsity %", "pct"),
    ("format", "format", None), ("latency_ms_b1", "ms b1", "f2"),
    ("throughput_b32", "img/s b32", "f1"), ("runtime", "runtime", None),
    ("size_band", "size band", None), ("wall_s", "wall s", "f1"), ("id", "run id", None),
    ("error", "error", None),
)  # fmt: skip

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
th{background:#eef;cursor:pointer;position:sticky;top:0}td.n{text-align:right}
tr.failed td{background:#fee}tr.running td{background:#ffd}
img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}
figcaption{font-weight:600;margin-bottom:.4em}.small{color:#666;font-size:12px}
"""


def _cell(r: dict, key: str, kind: str | None) -> tuple[str, str]:
    """(text shown, sort value) of one table cell."""
    if key == "ratio":
        v = (r["bytes_fp32"] / r["bytes_stored"]) if r.get("bytes_stored") and r.get(
            "bytes_fp32") else None  # fmt: skip
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


def _table(rows: list[dict], cols=TABLE_COLS, sortable: bool = True) -> str:
    onclick = ' onclick="sortBy(this)"' if sortable else ""
    head = "".join(f"<th{onclick}>{html.escape(label)}</th>" for _, label, _ in cols)
    body = []
    for r in rows:
        tds = []
        for key, _, kind in cols:
            text, sv = _cell(r, key, kind)
            cls = ' class="n"' if kind else ""
            tds.append(f'<td{cls} data-v="{html.escape(sv)}">{html.escape(text)}</td>')
        body.append(f'<tr class="{html.escape(str(r.get("status")))}">{"".join(tds)}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html(rows: list[dict], images: dict[str, Path], source: Path) -> str:
    studies = sorted({str(r.get("study")) for r in rows})
    counts = {s: sum(1 for r in rows if r.get("status") == s) for s in ("ok", "failed", "running")}
    best = best_per_band(rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>vitcompress report: {html.escape(', '.join(studies))}</title>",
        f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
        f"<h1>vitcompress report: {html.escape(', '.join(studies))}</h1>",
        f"<p>{len(rows)} runs: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['running']} unfinished. Results file: <code>{html.escape(str(source))}</code>. "
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.</p>",
        "<p class='small'>top-1 on the full test split of each run's data; bytes as stored by "
        "the packed format; latency is the median of batch-1 forward passes on this machine's "
        "CPU runtime for the format (blank where no kernel runs it).</p>",
        "<h2>Best runs per size band (top-1)</h2>",
    ]
    keep = ("model", "recipe", "top1", "bytes_stored", "ratio", "params_nonzero", "latency_ms_b1",
            "format")  # fmt: skip
    short = [c for c in TABLE_COLS if c[0] in keep]
    for band, rs in best.items():
        parts.append(f"<h3>{html.escape(band)}</h3>{_table(rs, short, sortable=False)}")
    for name, caption in PLOTS:
        if name in images:
            data = base64.b64encode(images[name].read_bytes()).decode()
            parts.append(
                f"<figure><figcaption>{html.escape(caption)}</figcaption>"
                f"<img alt='{name}' src='data:image/png;base64,{data}'></figure>"
            )
    parts += [
        "<h2>All runs</h2><p class='small'>Click a column to sort.</p>",
        _table(rows),
        "</body></html>",
    ]
    return "\n".join(parts)


def build_report(results_dir: Path) -> Path:
    """Write ``plots/*.png`` and ``report.html`` in ``results_dir``; return the HTML path."""
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
    for name, make in makers.items():
        path = plots / f"{name}.png"
        path.unlink(missing_ok=True)
        if ok and make(ok, path):
            images[name] = path
    report = out_dir / "report.html"
    report.write_text(_html(rows, images, db), encoding="utf-8")
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
