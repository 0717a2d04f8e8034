"""What a result row is: the kind of run its recipe made (format, sparsity, fine-tuned or not,
never read off its name), how many test images its numbers used, and whether its latency was
measured on a loaded machine. The report, its plots and the findings share these."""

from __future__ import annotations

import bisect
import html
from collections import defaultdict

from vitcompress.studies.store import (
    band_order,
    size_band,
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


# a numeric column's type -> how a table cell shows its value (the report, a sweep's summary)
CELL_TEXT = {
    "pct": lambda v: f"{v * 100:.2f}",
    "kb": lambda v: f"{v / 1024:,.1f}",
    "int": lambda v: f"{int(v):,}",
    "x": lambda v: f"{v:.2f}",
    "f1": lambda v: f"{v:.1f}",
    "f2": lambda v: f"{v:.2f}",
}


def cell_text(v: object, kind: str | None) -> str:
    """``v`` as a table cell of column type ``kind`` (plain ``str`` for other types)."""
    show = CELL_TEXT.get(kind)
    return show(v) if show else str(v)


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


def plain_structure(d: dict) -> bool:
    """Neither factorised nor shrunk: the layers have their original shapes."""
    return d["lowrank"] is None and d["shrink"] is None


def model_key(row: dict) -> tuple:
    size, fam = row.get("size") or "", row.get("family") or ""
    rank = SIZE_ORDER.index(size) if size in SIZE_ORDER else len(SIZE_ORDER)
    frank = FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)
    return (frank, fam, rank, row.get("model") or "")


def model_order(rows: list[dict]) -> list[str]:
    seen: dict[str, tuple] = {}
    for r in rows:
        seen.setdefault(r["model"], model_key(r))
    return sorted(seen, key=lambda m: seen[m])


def fmt_key(f: str) -> tuple:
    return (FORMAT_ORDER.index(f) if f in FORMAT_ORDER else len(FORMAT_ORDER), f)


def sp_key(s: str) -> tuple:
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


def images_sentence(rows: list[dict]) -> str:
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
    median, a 1-minute load average above the CPU count plus one (the measuring run itself
    accounts for up to one CPU's worth of its threads' load), a sweep with ``jobs`` > 1 where
    recorded, or other runs running at the same time."""
    overlap = concurrent_runs(rows)
    out = {}
    for r in rows:
        med, p90 = r.get("latency_ms_b1"), r.get("latency_ms_b1_p90")
        if med is None:
            continue
        why = []
        if p90 is not None and med > 0 and p90 > LOADED_SPREAD * med:
            why.append(f"p90 {p90 / med:.1f}x the median")
        m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        load, cpus = m.get("load_avg_1m"), m.get("cpus")
        if isinstance(load, (int, float)) and isinstance(cpus, int) and load > cpus + 1:
            why.append(f"load average {load:.1f} on {cpus} CPUs")
        jobs = next((d.get("jobs") for d in (r.get("config"), r.get("metrics"))
                     if isinstance(d, dict) and d.get("jobs")), None)  # fmt: skip
        if isinstance(jobs, int) and jobs > 1:
            why.append(f"measured with jobs={jobs}")
        elif overlap.get(r["id"]):
            why.append(f"ran while {overlap[r['id']]} other run(s) ran")
        if why:
            out[r["id"]] = "; ".join(why)
    return out


def tuning(r: dict) -> str:
    return "fine-tuned" if describe(r)["finetuned"] else "one-shot"
