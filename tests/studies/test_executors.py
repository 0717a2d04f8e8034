"""Executors: one protocol, three implementations; a task never raises; Ray optional."""

import sys

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.studies import read_results, run_sweep
from vitcompress.studies.executors import (
    Executor,
    PoolExecutor,
    SerialExecutor,
    execute,
    make_executor,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_failing_task_is_a_one_line_result_with_its_log(tmp_path):
    task = {
        "kind": "compress",
        "key": "r1",
        "dir": str(tmp_path / "runs" / "r1"),
        "base_dir": str(tmp_path / "no-such-baseline"),
        "recipe": {"name": "q", "steps": [{"quantize": {}}]},
        "device": "cpu",
        "speed": False,
        "log": str(tmp_path / "logs" / "r1.log"),
        "threads": 1,
    }
    res = execute(task)  # does not raise
    assert res["key"] == "r1" and res["status"] == "failed"
    assert "\n" not in res["error"] and "no-such-baseline" in res["error"]
    assert "Traceback" in res["traceback"]
    assert res["started_at"] <= res["ended_at"] and res["worker"]
    assert "Traceback" in (tmp_path / "logs" / "r1.log").read_text()


def test_local_executors_follow_the_protocol():
    serial = make_executor("local", 1, None, {}, 1)
    assert isinstance(serial, SerialExecutor) and isinstance(serial, Executor)
    assert serial.width == 1
    serial.close()
    pool = make_executor("local", 2, None, {}, 1)
    try:
        assert isinstance(pool, PoolExecutor) and isinstance(pool, Executor)
        assert pool.width == 2
    finally:
        pool.close()
    with pytest.raises(VitcompressError, match="unknown executor 'dask'"):
        make_executor("dask", 1, None, {}, 1)


@pytest.mark.ray
def test_ray_executor_gives_the_same_rows_as_local(tiny_out, quick, with_baselines):
    ray = pytest.importorskip("ray")
    out = with_baselines("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # one task at a time (2 CPUs each): a single Ray worker imports torch
        doc = {**quick("tiny", slice(0, 1)), "resources": {"cpus": 2}}
        rows = run_sweep(doc, out, executor="ray", threads=1, progress=False)
    finally:
        ray.shutdown()
    assert len(rows) == 2
    local = [r for r in read_results(tiny_out) if r["id"] in {r["id"] for r in rows}]
    key = ("id", "status", "top1", "params_nonzero")
    assert sorted(tuple(r[k] for k in key) for r in rows) == sorted(
        tuple(r[k] for k in key) for r in local
    )


def test_ray_missing_is_a_one_line_error(quick, with_baselines, monkeypatch):
    out = with_baselines("noray")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(VitcompressError, match=r"pip install 'vitcompress\[ray\]'"):
        run_sweep(quick("tiny"), out, executor="ray", progress=False)
    with pytest.raises(VitcompressError, match="unknown executor 'dask'"):
        run_sweep(quick("tiny"), out, executor="dask", progress=False)
