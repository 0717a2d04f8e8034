"""Running a study: end to end into SQLite, resume (kill -9 included), failures, concurrency."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vitcompress.errors import VitcompressError
from vitcompress.studies import DB_NAME, expand_study, read_results, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _study(tmp_path: Path, doc: dict, name: str = "study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _db_rows(out: Path) -> list[tuple]:
    con = sqlite3.connect(out / DB_NAME)
    try:
        return con.execute("SELECT id, status, started_at FROM runs ORDER BY id").fetchall()
    finally:
        con.close()


def _sweep_subprocess(study: Path, out: Path, jobs: int = 1) -> subprocess.Popen:
    code = (
        "import sys; from vitcompress.studies import run_sweep; "
        "run_sweep(sys.argv[1], sys.argv[2], jobs=int(sys.argv[3]), threads=1, progress=False)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(study), str(out), str(jobs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip


def test_tiny_study_end_to_end_into_sqlite(tiny_out):
    rows = read_results(tiny_out)
    assert len(rows) == 3
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    for r in rows:
        for k in ("top1", "top5", "loss", "params_total", "params_nonzero", "bytes_stored",
                  "bytes_fp32", "runtime", "format", "recipe_hash", "seed", "wall_s",
                  "started_at", "ended_at", "size_band", "base_top1"):  # fmt: skip
            assert r[k] is not None, k
        assert r["family"] == "vit" and r["size"] == "nano" and r["study"] == "tiny"
        assert (tiny_out / "runs" / r["id"] / "metrics.json").is_file()
        assert r["config"]["recipe"]["name"] == r["recipe"]
    by = {r["recipe"]: r for r in rows}
    assert by["prune50"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert by["int8"]["bytes_stored"] < by["fp32"]["bytes_stored"]
    con = sqlite3.connect(tiny_out / DB_NAME)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_rerun_skips_finished_runs(tiny_out, tiny, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(tiny_out, out)
    before = _db_rows(out)
    rows = run_sweep(tiny, out, threads=1, progress=False)
    assert _db_rows(out) == before  # nothing reran: same start times
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_resume_reruns_unfinished_and_missing_rows(tiny_out, tiny, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(tiny_out, out)
    before = {i: (s, t) for i, s, t in _db_rows(out)}
    ids = sorted(before)
    con = sqlite3.connect(out / DB_NAME)
    # a run killed in the middle: its row still says running, its directory is half written
    con.execute("UPDATE runs SET status='running', top1=NULL WHERE id=?", (ids[0],))
    (out / "runs" / ids[0] / "metrics.json").unlink()
    con.execute("DELETE FROM runs WHERE id=?", (ids[1],))  # killed before its row was written
    con.commit()
    con.close()
    rows = run_sweep(tiny, out, threads=1, progress=False)
    after = {i: (s, t) for i, s, t in _db_rows(out)}
    assert sorted(after) == ids  # nothing lost, nothing duplicated
    assert all(s == "ok" for s, _ in after.values())
    assert after[ids[0]][1] != before[ids[0]][1] and after[ids[2]] == before[ids[2]]
    assert {r["id"] for r in rows} == set(ids)
    assert (out / "runs" / ids[0] / "metrics.json").is_file()


def test_kill_9_mid_sweep_then_resume(quick, with_baselines, tmp_path):
    out = with_baselines("killed")
    study = _study(tmp_path, quick("tiny"))
    proc = _sweep_subprocess(study, out)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / DB_NAME).is_file():
            try:
                if any(s == "ok" for _, s, _ in _db_rows(out)):
                    break
            except sqlite3.OperationalError:
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    statuses = [s for _, s, _ in _db_rows(out)]
    assert "ok" in statuses
    rows = run_sweep(study, out, threads=1, progress=False)
    ids = sorted(i for i, _, _ in _db_rows(out))
    assert sorted(r["id"] for r in rows) == ids
    assert ids == sorted(expand_study(study).run_ids())  # the other process made the same ids
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)


def test_failed_run_is_recorded_and_the_sweep_goes_on(quick, with_baselines):
    out = with_baselines("fail")
    doc = quick("tiny", slice(0, 1))
    doc["recipes"].insert(0, {
        "name": "no-such-layer",  # vit-nano has 4 blocks: blocks.7 matches nothing at run time
        "steps": [{"prune": {"sparsity": 0.5, "layers": "blocks.7.*"}}],
    })  # fmt: skip
    rows = run_sweep(doc, out, threads=1, progress=False)
    by = {r["recipe"]: r for r in rows}
    assert by["no-such-layer"]["status"] == "failed"
    assert "blocks.7" in by["no-such-layer"]["error"]
    assert "\n" not in by["no-such-layer"]["error"]
    assert [by[n]["status"] for n in ("fp32", "int8")] == ["ok"] * 2
    again = run_sweep(doc, out, threads=1, progress=False)  # failed rows count as finished
    assert {r["id"]: r["started_at"] for r in again} == {r["id"]: r["started_at"] for r in rows}


def test_two_sweeps_write_one_database_at_once(tiny_out, quick, with_baselines, tmp_path):
    out = with_baselines("shared")
    a, b = quick("a", slice(0, 1)), quick("b", slice(0, 1))
    b["recipes"][0]["name"] = "b-$fmt"  # other runs than a's, the same baseline
    # sweep a runs its two runs in two worker processes (--jobs 2), b in its own process
    procs = [
        _sweep_subprocess(_study(tmp_path, d, f"{d['name']}.yaml"), out, jobs)
        for d, jobs in ((a, 2), (b, 1))
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    rows = read_results(out)
    assert sorted(r["study"] for r in rows) == ["a", "a", "b", "b"]
    assert all(r["status"] == "ok" for r in rows)
    workers = {r["worker"] for r in rows if r["study"] == "a"}
    assert not any(w in {r["worker"] for r in rows if r["study"] == "b"} for w in workers)
    local = {r["id"]: r["top1"] for r in read_results(tiny_out)}
    assert all(local[r["id"]] == r["top1"] for r in rows if r["study"] == "a")


def test_seed_full_without_its_data_says_to_pass_data(tmp_path):
    with pytest.raises(VitcompressError, match=r"does not exist; pass --data") as e:
        run_sweep("seed-full", tmp_path, data="imagefolder:/no/such/RESISC45", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / DB_NAME).exists()  # checked before any work


def test_demo_resumes_builds_the_report_and_prints_the_best(tiny_out, tiny, tmp_path, capsys):
    from vitcompress.demo import run_demo

    out = tmp_path / "demo"
    shutil.copytree(tiny_out, out)
    before = _db_rows(out)
    run_demo(out, study=tiny)  # every run is finished: nothing reruns
    assert _db_rows(out) == before
    text = capsys.readouterr().out
    assert f"report: {(out / 'report.html').resolve()}" in text
    assert "Five best runs by top-1 per size band" in text and "vit-nano" in text
    assert "Findings of the reference studies on these results" in text
    assert text.index("Findings of") < text.index("Five best runs")
    assert (out / "plots" / "formats.png").is_file()
