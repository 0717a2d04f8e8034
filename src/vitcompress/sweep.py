"""Studies: a grid of models x data x recipes, run into one SQLite file, resumable.

A study is a YAML file (or a built-in name: ``smoke``, ``seed``, ``seed-full``)::

    name: my-study
    description: ViT and DeiT, formats x sparsity
    data: fashion-mnist          # a data spec or a list of them; ``--data`` overrides it
    limit: null                  # keep the first N images of each split (smoke runs only)
    seed: 0
    device: auto                 # where each run trains and evaluates: auto | cpu | cuda[:N]
    speed: true                  # measure latency and throughput of every run (CPU)
    resources: {cpus: 1, gpus: 0}   # what one run asks of a Ray cluster (--executor ray)
    teachers:                    # trained once, used by the models below
      resnet: {preset: resnet-micro, epochs: 2, lr: 2.0e-3}
    models:                      # label: how to get its trained baseline
      vit-nano:  {preset: vit-nano, epochs: 2}
      deit-nano: {preset: deit-nano, epochs: 2, teacher: resnet, distill: hard}
      mine:      {run: runs/my-vit}           # an existing trained run directory
    recipes:                     # templates; each one expands over its grid
      - name: dense-$format
        grid:
          format:                # an axis: a list of values, or a mapping label: value
            fp32: {weights: fp32, activations: null}
            int8: {weights: int8, activations: int8}
        steps:
          - quantize: $format
      - name: cubic$sparsity-$format
        grid:
          sparsity: [0.5, 0.75]
          format: {fp32: null, int8: {weights: int8, activations: int8}}
        steps:
          - prune: {sparsity: $sparsity, schedule: cubic}
          - finetune: {max_steps: 100, lr: 5.0e-4, distill: $distill}
          - quantize: $format    # a step that comes out null is left out
      - name: svd$r
        models: [vit-nano]       # only for these models (default: all)
        grid: {r: [0.5, 0.25]}
        steps:
          - lowrank: {rank_ratio: $r}

Model keys: ``preset`` or ``run``; training settings ``epochs``, ``lr``, ``batch_size``,
``weight_decay``, ``warmup_epochs``, ``label_smoothing``, ``augment``, ``img_size``,
``patch_size``, ``drop_path``, ``amp`` (``bf16``: autocast, faster for a ResNet on the CPU);
``limit`` (this model's own image limit, e.g. for a teacher; runs
on a model are evaluated on its first N test images too); ``teacher`` (a label under
``teachers`` or ``models``, or a run directory) with ``distill`` (``hard`` or ``soft``, default
hard), ``distill_alpha``, ``distill_tau``. Teachers take the same keys.

Substitution in a recipe template: a value that is exactly ``$axis`` becomes that axis' value (a
number, a mapping, null); ``$axis`` (or ``${axis}``) inside a longer string becomes the value's
label (the mapping key, or the value itself). Every combination of the axes is one recipe, in file
order. Built-in variables: ``$distill`` is ``{teacher: <the model's teacher>, kind: <its distill
kind>}`` for a model trained with a teacher and null otherwise (so a fine-tune distils exactly when
the baseline did), ``$teacher`` the teacher run (or null), ``$model`` the model label. A step that
comes out null is left out; the rest is a recipe as :mod:`vitcompress.recipe` reads it.

Runs get stable ids ``<model>-<recipe>-<hash>``: the hash of the resolved run (baseline
training settings, data, seed, recipe after substitution), never of the output directory, so the
same study gives the same ids in every process. Baselines are trained once into
``OUT/baselines/<hash>`` (a directory with ``metrics.json`` is done, one with
``train_state.pt`` resumes), every run goes to ``OUT/runs/<id>`` (its log to ``OUT/logs``), and
one row per run to ``OUT/results.sqlite`` (table ``runs``, primary key ``id``), committed when the
run ends. A rerun skips finished rows (``ok``, and ``failed`` unless ``retry_failed``) and reruns
the others, so an interrupted sweep (Ctrl-C, kill -9, power loss) loses nothing and duplicates
nothing. Several sweeps may share one OUT at once (SQLite in WAL mode; a baseline is trained under
a file lock; a run another live sweep has started is left to it).

Latency is measured while other jobs run when ``jobs > 1``: use ``jobs=1`` for timings you report.
With ``executor="ray"`` OUT must be on a file system every node sees, and every node needs
vitcompress installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitcompress.errors import VitcompressError
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
from vitcompress.train import TrainConfig

# --------------------------------------------------------------------------------------------
# Work: train a baseline, compress a run (executed in this process, a pool worker or a Ray task)
# --------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    if isinstance(e, VitcompressError):
        return str(e).replace("\n", " ")
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX flock; a no-op where there is none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_baseline(task: dict) -> dict:
    from vitcompress.runs import METRICS, TRAIN_STATE, read_json
    from vitcompress.workflows import train_run

    out = Path(task["dir"])
    with _file_lock(out.parent.parent / ".locks" / f"{out.name}.lock"):
        if (out / METRICS).is_file():
            return read_json(out / METRICS)
        b = task["baseline"]
        resume = (out / TRAIN_STATE).is_file() and (out / "config.json").is_file()
        return train_run(
            b["preset"],
            b["data"],
            out,
            TrainConfig(**b["train"], distill=b["distill"], seed=b["seed"]),
            teacher=Path(task["teacher_dir"]) if task.get("teacher_dir") else None,
            limit=b["limit"],
            resume=resume,
            force=not resume,
            device=task["device"],
        )


def _compress(task: dict) -> dict:
    from vitcompress.workflows import compress_run

    return compress_run(
        Path(task["base_dir"]),
        task["recipe"],
        Path(task["dir"]),
        device=task["device"],
        force=True,
        speed=task.get("speed", True),
    )


def execute(task: dict) -> dict:
    """Do one task (``kind`` train or compress) and report; never raises but for Ctrl-C.

    Output goes to ``task["log"]``; torch uses ``task["threads"]`` threads.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(task.get("threads") or threads)))
    started = now()
    t0, c0 = time.perf_counter(), time.process_time()
    result: dict = {"key": task["key"], "started_at": started, "worker": _worker_name()}
    log = Path(task["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "a", buffering=1) as f, contextlib.redirect_stdout(f), \
                contextlib.redirect_stderr(f):  # fmt: skip
            print(f"--- {started} {task['kind']} {task['key']} on {result['worker']}")
            try:
                metrics = _train_baseline(task) if task["kind"] == "train" else _compress(task)
                result.update(status="ok", metrics=_jsonable(metrics))
            except Exception as e:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
                result.update(status="failed", error=_one_line(e),
                              traceback=traceback.format_exc())  # fmt: skip
                print(traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
    result["ended_at"] = now()
    result["seconds"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    return result


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Executors: submit tasks, get results back one at a time, as they finish
# --------------------------------------------------------------------------------------------


class _Serial:
    """In this process, one task at a time."""

    width = 1

    def __init__(self, threads: int):
        self.threads = threads
        self._queue: list[dict] = []

    def submit(self, task: dict) -> None:
        self._queue.append({**task, "threads": self.threads})

    def next_done(self) -> dict:
        return execute(self._queue.pop(0))

    def close(self) -> None:
        self._queue.clear()


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class _Pool:
    """``jobs`` worker processes (spawned: no forked torch state)."""

    def __init__(self, jobs: int, threads: int):
        self.width = jobs
        self.threads = threads
        self._pending: dict[Any, dict] = {}
        self._pool = self._new_pool()

    def _new_pool(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(
            self.width, mp.get_context("spawn"), initializer=_init_worker,
            initargs=(self.threads,),
        )  # fmt: skip

    def submit(self, task: dict) -> None:
        task = {**task, "threads": self.threads}
        self._pending[self._pool.submit(execute, task)] = task

    def next_done(self) -> dict:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(list(self._pending), return_when=FIRST_COMPLETED)
        fut = next(iter(done))
        task = self._pending.pop(fut)
        try:
            return fut.result()
        except BrokenProcessPool:
            # a worker died (killed, out of memory): every task in flight is lost with it
            self._pool.shutdown(wait=False, cancel_futures=True)
            lost = list(self._pending.values())
            self._pending.clear()
            self._pool = self._new_pool()
            for t in lost:
                self.submit(t)
            return _died(task, "a worker process died while this ran (killed, out of memory?)")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()


def _died(task: dict, why: str) -> dict:
    return {"key": task["key"], "status": "failed", "error": why, "started_at": None,
            "ended_at": now(), "worker": None}  # fmt: skip


class _Ray:
    """One Ray task per run, with its CPU/GPU needs; results come back to this driver."""

    def __init__(self, jobs: int, address: str | None, resources_: dict, threads: int | None):
        try:
            import ray
        except ImportError:
            raise VitcompressError(
                "the ray executor needs Ray: pip install 'vitcompress[ray]'"
            ) from None
        self.ray = ray
        self._own = not ray.is_initialized()
        if self._own:
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(num_cpus=_cores(), include_dashboard=False, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - no cluster there, a version mismatch, ...
                where = f" at {address}" if address else ""
                raise VitcompressError(f"cannot start Ray{where}: {_one_line(e)}") from None
        cpus = float(resources_.get("cpus", 1)) or 1.0
        gpus = float(resources_.get("gpus", 0))
        self.threads = threads or max(1, int(cpus))
        total = float(ray.cluster_resources().get("CPU", cpus))
        self.width = max(jobs, int(total // cpus), 1)
        self._remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(execute)
        self._pending: dict[Any, dict] = {}

    def submit(self, task: dict) -> None:
        task = {**task, "threads": self.threads}
        ref = self._remote.remote(task)
        self._pending[ref] = task

    def next_done(self) -> dict:
        ready, _ = self.ray.wait(list(self._pending), num_returns=1)
        task = self._pending.pop(ready[0])
        try:
            return self.ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - a lost worker or node: record it
            return _died(task, f"Ray task failed: {_one_line(e)}")

    def close(self) -> None:
        for ref in self._pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        self._pending.clear()
        if self._own:
            self.ray.shutdown()


def _executor(kind: str, jobs: int, address: str | None, study: Study, threads: int | None):
    if kind == "local":
        threads = threads or max(1, _cores() // jobs)
        return _Serial(threads) if jobs == 1 else _Pool(jobs, threads)
    if kind == "ray":
        return _Ray(jobs, address, study.resources, threads)
    raise VitcompressError(f"unknown executor {kind!r}: use local or ray")


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def run_sweep(
    study: str | Path | dict,
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
    if executor not in ("local", "ray"):
        raise VitcompressError(f"unknown executor {executor!r}: use local or ray")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise VitcompressError(f"threads must be an integer >= 1, got {threads!r}")
    st = expand_study(study, data=data)
    _check_data_paths(st)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    con = connect(out / DB_NAME)
    me = _worker_name()
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
        ex = _executor(executor, jobs, address, st, threads) if (pending or needed) else None
        try:
            base_errors, base_metrics = _run_baselines(st, needed, out, ex, bar)
            todo = list(pending)
            inflight = 0

            def submit_next() -> bool:
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
    st: Study, needed: list[Baseline], out: Path, ex, bar
) -> tuple[dict[str, str], dict[str, dict]]:
    """Train the baselines (in waves: a student waits for its teacher); errors by hash."""
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
    return {
        "kind": "train",
        "key": b.hash,
        "dir": str(b.directory(out)),
        "teacher_dir": teacher_dir,
        "baseline": {
            "preset": b.preset, "train": b.train, "distill": b.distill, "data": b.data,
            "limit": b.limit, "seed": b.seed,
        },
        "device": st.device,
        "log": str(out / "logs" / f"baseline-{safe_name(b.label)}-{b.hash}.log"),
    }  # fmt: skip


def _run_task(r: RunSpec, st: Study, out: Path) -> dict:
    def directory(h: str) -> Path:
        return st.baselines[h].directory(out)

    return {
        "kind": "compress",
        "key": r.id,
        "dir": str(out / "runs" / r.id),
        "base_dir": str(directory(r.baseline)),
        "recipe": resolve_teachers(r.recipe, directory),
        "device": st.device,
        "speed": st.speed,
        "log": str(out / "logs" / f"{r.id}.log"),
    }


def _meta_row(r: RunSpec, st: Study, out: Path, base_metrics: dict) -> dict:
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


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{v * 100:.2f}"
    if kind == "kb":
        return f"{v / 1024:,.1f}"
    if kind == "ms":
        return f"{v:.2f}"
    return str(v)


def summary_table(rows: list[dict]) -> str:
    """A plain-text table of runs: model, recipe, status, top-1, size, latency."""
    head = ("model", "recipe", "status", "top-1 %", "KB stored", "ms b1", "sparsity %")
    lines = [
        (
            r["model"], r["recipe"], r["status"], _fmt(r.get("top1"), "pct"),
            _fmt(r.get("bytes_stored"), "kb"), _fmt(r.get("latency_ms_b1"), "ms"),
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
