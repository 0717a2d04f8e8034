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
import html
import json
from datetime import datetime, timezone
from pathlib import Path

from vitcompress.errors import VitcompressError
from vitcompress.plots import (
    plot_combinations,
    plot_formats,
    plot_pareto,
    plot_sparsity,
    plot_study_b,
)
from vitcompress.results import (
    CELL_TEXT,
    LOADED_SPREAD,
    PLOTS,
    best_per_band,
    cell_text,
    describe,
    eval_images,
    images_sentence,
    latency_warnings,
    model_key,
    tuning,
)
from vitcompress.studies.store import (
    CSV_FIELDS,
    DB_NAME,
    read_results,
    write_csv,
)

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
        return (tuning(r), tuning(r)) if (r.get("config") or {}).get("recipe") else ("", "")
    else:
        v = r.get(key)
    if v is None:
        return "", ""
    return (cell_text(v, kind), repr(v)) if kind in CELL_TEXT else (str(v), str(v))


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
    busy = [r for r in timed if "load average" in warn.get(r["id"], "")]
    if busy:
        parts.append(
            f"{len(busy)} of {len(timed)} runs were timed while the 1-minute load average was "
            "above the CPU count plus one: other programs shared the cores"
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
    for r in sorted(ok, key=model_key):
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
        f"<li>{images_sentence(ok)}</li>",
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
