"""Running a study: baselines first, then every unfinished run, one committed row per run.

Baselines are trained once into ``OUT/baselines/<hash>`` (a directory with ``metrics.json`` is
done, one with ``train_state.pt`` resumes), teachers before their students. Every run goes to
``OUT/runs/<id>`` (its log to ``OUT/logs``), and one row per run to ``OUT/results.sqlite``,
committed when the run starts (``running``) and when it ends. A rerun skips finished rows (``ok``,
and ``failed`` unless ``retry_failed``) and reruns the others, so an interrupted sweep (Ctrl-C,
kill -9, power loss) loses nothing and duplicates nothing. Several sweeps may share one OUT at
once (SQLite in WAL mode; a baseline is trained under a file lock; a run another live sweep has
started is left to it).

Latency is measured while other jobs run when ``jobs > 1``: use ``jobs=1`` for timings you report.
With ``executor="ray"`` OUT must be on a file system every node sees, and every node needs
vitcompress installed.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitcompress.errors import VitcompressError
from vitcompress.results import cell_text
from vitcompress.studies.executors import EXECUTORS, Executor, make_executor, worker_name
from vitcompress.studies.grid import expand_study, resolve_teachers, teacher_hashes
from vitcompress.studies.store import (
    DB_NAME,
    RESULT_FIELDS,
    connect,
    now,
    select_rows,
    size_band,
    upsert,
)
from vitcompress.studies.study import Baseline, RunSpec, Study, safe_name


def run_sweep(
    study: str | Path | Mapping,
    out: Path,
    jobs: int = 1,
    executor: str = "local",
    address: str | None = None,
    data: str | None = None,
    retry_failed: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every run of ``study`` not yet finished in ``out``; return the study's rows.

    Trains each baseline and teacher once, runs the rest through ``executor`` (``local``
    with ``jobs`` processes, or ``ray`` at ``address`` / a local Ray instance), commits one row
    per run to ``out/results.sqlite`` as it ends, shows a progress bar over runs and prints a
    summary table. ``data`` overrides the study's data; ``retry_failed`` reruns failed runs too;
    ``threads`` sets torch's threads per run (default: cores // jobs locally, the task's cpus on
    Ray). ``study`` is a built-in name, a YAML file or an already parsed mapping.
    """
    from tqdm import tqdm

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise VitcompressError(f"jobs must be an integer >= 1, got {jobs!r}")
    if executor not in EXECUTORS:
        raise VitcompressError(f"unknown executor {executor!r}: use local or ray")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise VitcompressError(f"threads must be an integer >= 1, got {threads!r}")
    st = expand_study(study, data=data)
    _check_data_paths(st)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    con = connect(out / DB_NAME)
    me = worker_name()
    t_start = now()
    try:
        existing = _status_rows(con, st.run_ids())
        done_states = ("ok",) if retry_failed else ("ok", "failed")
        pending = [r for r in st.runs if existing.get(r.id, {}).get("status") not in done_states]
        skipped = len(st.runs) - len(pending)
        needed = _needed_baselines(st, pending, out)
        bar = tqdm(total=len(pending) + len(needed), desc=f"sweep {st.name}", unit="run",
                   disable=not progress or None, file=sys.stderr,
                   dynamic_ncols=True)  # fmt: skip
        counts = {"ok": 0, "failed": 0, "elsewhere": 0}
        ex = (
            make_executor(executor, jobs, address, st.resources, threads)
            if (pending or needed)
            else None
        )
        try:
            base_errors, base_metrics = _run_baselines(st, needed, out, ex, bar)
            todo = list(pending)
            inflight = 0

            def submit_next() -> bool:
                """Submit the next run still to do (recording those that cannot run)."""
                while todo:
                    r = todo.pop(0)
                    row = _status_rows(con, [r.id]).get(r.id, {})
                    if row.get("status") in done_states or (
                        row.get("status") == "running"
                        and (row.get("started_at") or "") > t_start
                        and row.get("worker") != me
                    ):
                        counts["elsewhere"] += 1  # another sweep finished it or is on it
                        bar.update(1)
                        continue
                    meta = _meta_row(r, st, out, base_metrics)
                    if r.baseline in base_errors:
                        t = now()
                        upsert(con, {**meta, "status": "failed", "started_at": t,
                                     "ended_at": t, "worker": me,
                                     "error": f"baseline: {base_errors[r.baseline]}"})  # fmt: skip
                        counts["failed"] += 1
                        bar.update(1)
                        continue
                    upsert(con, {**meta, "status": "running", "started_at": now(),
                                 "ended_at": None, "error": None, "traceback": None,
                                 "worker": me})  # fmt: skip
                    ex.submit(_run_task(r, st, out))
                    return True
                return False

            runs_by_id = {r.id: r for r in pending}
            while ex is not None:
                while inflight < ex.width and submit_next():
                    inflight += 1
                if inflight == 0:
                    break
                res = ex.next_done()
                inflight -= 1
                r = runs_by_id[res["key"]]
                row = _result_row(r, st, out, base_metrics, res)
                upsert(con, row)
                counts[row["status"]] = counts.get(row["status"], 0) + 1
                bar.update(1)
                bar.set_postfix(ok=counts["ok"], failed=counts["failed"], refresh=False)
        finally:
            bar.close()
            if ex is not None:
                ex.close()
        rows = _study_rows(con, st)
    finally:
        con.close()
    _print_summary(st, rows, out, skipped, counts)
    return rows


def _status_rows(con: sqlite3.Connection, ids: list[str]) -> dict[str, dict]:
    """What the runner decides on: status, start and worker of the rows of these ids."""
    return select_rows(con, ids, "id, status, started_at, worker")


def _check_data_paths(st: Study) -> None:
    from vitcompress.data import parse_spec

    for spec in dict.fromkeys(r.data for r in st.runs):
        _, path = parse_spec(spec)
        if path is not None and not path.exists():
            raise VitcompressError(
                f"study {st.name}: data {spec!r}: {path} does not exist; pass --data "
                "KIND:PATH (e.g. imagefolder:/data/NWPU-RESISC45)"
            )


def _needed_baselines(st: Study, pending: list[RunSpec], out: Path) -> list[Baseline]:
    """Baselines the pending runs need that are not trained yet, teachers before students."""
    from vitcompress.runs import METRICS

    order: list[Baseline] = []

    def visit(h: str) -> None:
        b = st.baselines[h]
        if b in order:
            return
        if b.teacher in st.baselines:
            visit(b.teacher)
        if b.run is None and not (b.directory(out) / METRICS).is_file():
            order.append(b)

    for r in pending:
        visit(r.baseline)
        for h in teacher_hashes(r.recipe):
            visit(h)
    return order


def _run_baselines(
    st: Study, needed: list[Baseline], out: Path, ex: Executor | None, bar: Any
) -> tuple[dict[str, str], dict[str, dict]]:
    """Train the baselines (in waves: a student waits for its teacher); errors by hash.

    Also returns the metrics of every baseline already trained, for the runs' ``base_*``
    columns.
    """
    from vitcompress.runs import METRICS

    errors: dict[str, str] = {}
    metrics: dict[str, dict] = {}
    left = list(needed)
    while left:
        wave = [b for b in left if b.teacher not in {x.hash for x in left}]
        left = [b for b in left if b not in wave]
        for b in wave:
            if b.teacher in errors:
                errors[b.hash] = f"teacher {st.baselines[b.teacher].label}: {errors[b.teacher]}"
                bar.update(1)
        wave = [b for b in wave if b.hash not in errors]
        while wave:
            batch, wave = wave[: ex.width], wave[ex.width :]
            for b in batch:
                bar.set_description(f"training {b.label}")
                ex.submit(_train_task(b, st, out))
            for _ in batch:
                res = ex.next_done()
                if res["status"] != "ok":
                    errors[res["key"]] = res.get("error") or "failed"
                else:
                    metrics[res["key"]] = res["metrics"]
                bar.update(1)
    bar.set_description(f"sweep {st.name}")
    for h, b in st.baselines.items():
        f = b.directory(out) / METRICS
        if h not in metrics and f.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                metrics[h] = json.loads(f.read_text())
    return errors, metrics


def _train_task(b: Baseline, st: Study, out: Path) -> dict:
    teacher_dir = None
    if b.teacher is not None:
        tb = st.baselines.get(b.teacher)
        teacher_dir = str(tb.directory(out)) if tb else b.teacher
    baseline = {
        "preset": b.preset, "train": b.train, "distill": b.distill, "data": b.data,
        "limit": b.limit, "seed": b.seed,
    }  # fmt: skip
    if b.init_from is not None:
        baseline["init_from"] = b.init_from
    return {
        "kind": "train",
        "key": b.hash,
        "dir": str(b.directory(out)),
        "teacher_dir": teacher_dir,
        "baseline": baseline,
        "device": st.device,
        "log": str(out / "logs" / f"baseline-{safe_name(b.label)}-{b.hash}.log"),
    }  # fmt: skip


def _run_task(r: RunSpec, st: Study, out: Path) -> dict:
    def directory(h: str) -> Path:
        return st.baselines[h].directory(out)

    task = {
        "kind": "compress",
        "key": r.id,
        "dir": str(out / "runs" / r.id),
        "base_dir": str(directory(r.baseline)),
        "recipe": resolve_teachers(r.recipe, directory),
        "device": st.device,
        "speed": st.speed,
        "log": str(out / "logs" / f"{r.id}.log"),
    }
    base = st.baselines[r.baseline]
    if base.run is not None:  # an existing run: the study's data, not the one it was made on
        task.update(data=r.data, limit=base.limit)
    return task


def _meta_row(r: RunSpec, st: Study, out: Path, base_metrics: dict) -> dict:
    """The columns of a run's row known before it runs."""
    bm = base_metrics.get(r.baseline, {})
    return {
        "id": r.id,
        "study": r.study,
        "model": r.model,
        "family": r.family,
        "size": r.size,
        "preset": r.preset,
        "data": r.data,
        "recipe": r.recipe_name,
        "base_top1": bm.get("top1"),
        "base_params": bm.get("params_total"),
        "config": {
            **r.config,
            "baseline_dir": str(st.baselines[r.baseline].directory(out)),
            "run_dir": str(out / "runs" / r.id),
        },  # fmt: skip
    }


def _result_row(r: RunSpec, st: Study, out: Path, base_metrics: dict, res: dict) -> dict:
    """A run's whole row once its result is back."""
    row = {
        **_meta_row(r, st, out, base_metrics),
        "status": res["status"],
        "error": res.get("error"),
        "traceback": res.get("traceback"),
        "started_at": res.get("started_at"),
        "ended_at": res.get("ended_at"),
        "worker": res.get("worker"),
        "cpu_s": res.get("cpu_s"),
    }
    m = res.get("metrics") or {}
    for k in RESULT_FIELDS:
        row[k] = m.get(k)
    row["metrics"] = m or None
    row["size_band"] = size_band(m.get("bytes_stored"))
    return row


def _study_rows(con: sqlite3.Connection, st: Study) -> list[dict]:
    """The study's rows in its run order (runs never started have none)."""
    rows = select_rows(con, st.run_ids())
    return [rows[i] for i in st.run_ids() if i in rows]


# --------------------------------------------------------------------------------------------
# The summary a sweep prints
# --------------------------------------------------------------------------------------------


def _fmt(v: Any, kind: str) -> str:
    return "-" if v is None else cell_text(v, kind)


def summary_table(rows: list[dict]) -> str:
    """A plain-text table of runs: model, recipe, status, top-1, size, latency."""
    head = ("model", "recipe", "status", "top-1 %", "KB stored", "ms b1", "sparsity %")
    lines = [
        (
            r["model"], r["recipe"], r["status"], _fmt(r.get("top1"), "pct"),
            _fmt(r.get("bytes_stored"), "kb"), _fmt(r.get("latency_ms_b1"), "f2"),
            _fmt(r.get("sparsity"), "pct"),
        )
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
              for i, h in enumerate(head)]  # fmt: skip

    def line(cells: tuple) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, lines)])


def _print_summary(st: Study, rows: list[dict], out: Path, skipped: int, counts: dict) -> None:
    by = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "failed", "running")}
    print(summary_table(rows))
    ran = counts.get("ok", 0) + counts.get("failed", 0)
    extra = f", {counts['elsewhere']} left to another sweep" if counts.get("elsewhere") else ""
    print(
        f"study {st.name}: {len(st.runs)} runs, {by['ok']} ok, {by['failed']} failed, "
        f"{by['running']} running, {len(st.runs) - len(rows)} not started; this sweep ran {ran}, "
        f"skipped {skipped} finished{extra}; results in {out / DB_NAME}"
    )
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed {r['id']}: {r.get('error')}")
