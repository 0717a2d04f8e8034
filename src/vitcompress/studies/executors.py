"""Where tasks run: this process, a pool of processes, or a Ray cluster; and what a task does.

A task is a plain dict (picklable, the same for every executor): ``kind`` (``train`` a baseline or
``compress`` a run), ``key`` (the baseline hash or run id the result comes back under), ``dir``,
``log``, ``device`` and what its kind needs. :func:`execute` does one and returns a result dict
with ``key``, ``status`` (``ok`` or ``failed``), ``metrics`` or ``error``/``traceback``, times and
the worker; it never raises but for Ctrl-C, so one failed run never stops a sweep.

Every executor follows :class:`Executor`: the runner keeps at most ``width`` tasks submitted and
takes results back one at a time, in the order they finish. Ray is imported only when its
executor is made (it is an optional extra).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vitcompress.errors import VitcompressError
from vitcompress.studies.store import now

EXECUTORS = ("local", "ray")


@runtime_checkable
class Executor(Protocol):
    """Runs tasks (dicts, see the module docstring) and hands results back as they finish."""

    width: int  # how many tasks it runs at once: the runner keeps that many submitted

    def submit(self, task: dict) -> None:
        """Start ``task`` (or queue it)."""

    def next_done(self) -> dict:
        """Wait for the next submitted task to finish and return its result (never raises for a
        failed task: a lost worker is a ``failed`` result too)."""

    def close(self) -> None:
        """Drop what has not finished and release the workers."""


# --------------------------------------------------------------------------------------------
# The worker side: what one task does
# --------------------------------------------------------------------------------------------


def one_line(e: BaseException) -> str:
    """An error in one line: our own errors as they are, others with their type and place."""
    if isinstance(e, VitcompressError):
        return str(e).replace("\n", " ")
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


def worker_name() -> str:
    """This process as the ``worker`` column names it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def cores() -> int:
    """CPU cores this process may use (its affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


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
    from vitcompress.outputs import partial_dir
    from vitcompress.runs import METRICS, TRAIN_STATE, read_json
    from vitcompress.train import TrainConfig
    from vitcompress.workflows import train_run

    out = Path(task["dir"])
    # several sweeps may share OUT: the first to take the lock trains, the others then read it
    with _file_lock(out.parent.parent / ".locks" / f"{out.name}.lock"):
        if (out / METRICS).is_file():
            return read_json(out / METRICS)
        b = task["baseline"]
        resume = any((d / TRAIN_STATE).is_file() and (d / "config.json").is_file()
                     for d in (partial_dir(out), out))  # fmt: skip
        return train_run(
            b["preset"],
            b["data"],
            out,
            TrainConfig(**b["train"], distill=b["distill"], seed=b["seed"]),
            teacher=Path(task["teacher_dir"]) if task.get("teacher_dir") else None,
            init_from=Path(b["init_from"]) if b.get("init_from") else None,
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
        data=task.get("data"),
        limit=task.get("limit"),
        device=task["device"],
        force=True,
        speed=task.get("speed", True),
    )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def execute(task: dict) -> dict:
    """Do one task (``kind`` train or compress) and report; never raises but for Ctrl-C.

    Output goes to ``task["log"]``; torch uses ``task["threads"]`` threads.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(task.get("threads") or threads)))
    started = now()
    t0, c0 = time.perf_counter(), time.process_time()
    result: dict = {"key": task["key"], "started_at": started, "worker": worker_name()}
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
                result.update(status="failed", error=one_line(e),
                              traceback=traceback.format_exc())  # fmt: skip
                print(traceback.format_exc())
    finally:
        torch.set_num_threads(threads)
    result["ended_at"] = now()
    result["seconds"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    return result


def _died(task: dict, why: str) -> dict:
    """The result of a task whose worker was lost: failed, with ``why``."""
    return {"key": task["key"], "status": "failed", "error": why, "started_at": None,
            "ended_at": now(), "worker": None}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The executors
# --------------------------------------------------------------------------------------------


class SerialExecutor:
    """In this process, one task at a time (a task runs when its result is asked for)."""

    width = 1

    def __init__(self, threads: int) -> None:
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


class PoolExecutor:
    """``jobs`` worker processes (spawned: no forked torch state)."""

    def __init__(self, jobs: int, threads: int) -> None:
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
            # a worker died (killed, out of memory): every task in flight is lost with it, so
            # the others go to a new pool and this one is recorded as failed
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


class RayExecutor:
    """One Ray task per run, with its CPU/GPU needs; results come back to this driver.

    Joins the cluster at ``address``, or one already started in this process, or starts a local
    one (shut down again on :meth:`close`). Its width is what the cluster's CPUs hold, at least
    ``jobs``.
    """

    def __init__(
        self, jobs: int, address: str | None, resources: Mapping[str, float], threads: int | None
    ) -> None:
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
                    ray.init(num_cpus=cores(), include_dashboard=False, log_to_driver=False)
            except Exception as e:  # noqa: BLE001 - no cluster there, a version mismatch, ...
                where = f" at {address}" if address else ""
                raise VitcompressError(f"cannot start Ray{where}: {one_line(e)}") from None
        cpus = float(resources.get("cpus", 1)) or 1.0
        gpus = float(resources.get("gpus", 0))
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
            return _died(task, f"Ray task failed: {one_line(e)}")

    def close(self) -> None:
        for ref in self._pending:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        self._pending.clear()
        if self._own:
            self.ray.shutdown()


def make_executor(
    kind: str,
    jobs: int,
    address: str | None,
    resources: Mapping[str, float],
    threads: int | None,
) -> Executor:
    """The executor for ``kind``: ``local`` (this process for one job, else a process pool;
    threads default to cores // jobs) or ``ray`` (``resources`` is what one task asks for)."""
    if kind == "local":
        threads = threads or max(1, cores() // jobs)
        return SerialExecutor(threads) if jobs == 1 else PoolExecutor(jobs, threads)
    if kind == "ray":
        return RayExecutor(jobs, address, resources, threads)
    raise VitcompressError(f"unknown executor {kind!r}: use local or ray")
