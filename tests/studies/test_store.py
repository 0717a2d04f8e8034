"""The results store: one row per run id, old files upgraded, readable without the runner."""

import re
import sqlite3
import subprocess
import sys

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.studies.store import DB_NAME, ROW_FIELDS, connect, read_results, size_band, upsert


def test_size_bands():
    assert size_band(10_000) == "<64 KB"
    assert size_band(100 * 1024) == "64-256 KB"
    assert size_band(300 * 1024) == "256 KB-1 MB"
    assert size_band(5 * 2**20) == "4-16 MB"
    assert size_band(None) is None


def test_upsert_is_one_row_per_id(tmp_path):
    con = connect(tmp_path / DB_NAME)
    upsert(con, {"id": "x", "status": "running", "config": {"a": 1}})
    upsert(con, {"id": "x", "status": "ok", "top1": 0.5})
    con.close()
    (row,) = read_results(tmp_path)
    assert row["status"] == "ok" and row["top1"] == 0.5 and row["config"] == {"a": 1}


def test_a_results_file_from_an_older_version_gains_the_new_columns(tmp_path):
    old = sqlite3.connect(tmp_path / DB_NAME)
    old.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, study TEXT, status TEXT, top1 REAL)")
    old.execute("INSERT INTO runs VALUES ('x', 's', 'ok', 0.5)")
    old.commit()
    old.close()
    con = connect(tmp_path / DB_NAME)
    assert [r["name"] for r in con.execute("PRAGMA table_info(runs)")][4:] == [
        c for c in ROW_FIELDS if c not in ("id", "study", "status", "top1")
    ]
    upsert(con, {"id": "x", "cpu_s": 1.5})
    con.close()
    (row,) = read_results(tmp_path / DB_NAME)
    assert (row["status"], row["top1"], row["cpu_s"]) == ("ok", 0.5, 1.5)


def test_reading_results_imports_neither_torch_nor_the_runner():
    """The report reads the store only: no torch, no grid, no executors at import."""
    code = (
        "import sys, vitcompress.report, vitcompress.studies.store; "
        "heavy = ('torch', 'vitcompress.studies.runner', 'vitcompress.studies.grid', "
        "'vitcompress.studies.executors', 'vitcompress.studies.study'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _foreign(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE notes (id INTEGER, text TEXT)")
    con.commit()
    con.close()


def _foreign_runs(path):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE runs (name TEXT, score REAL)")  # another program's "runs"
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 500), "file is not a database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000), "not a database"),
        (lambda p: p.mkdir(), "unable to open|no results file at"),  # read: a folder is OUT
        (_foreign, "no 'runs' table; its tables: notes"),
        (_foreign_runs, "'runs' table not keyed by 'id'"),
    ],
)
def test_a_corrupt_or_foreign_results_file_is_a_one_line_error(tmp_path, make, expected):
    path = tmp_path / DB_NAME
    make(path)
    before = path.read_bytes() if path.is_file() else None
    for read in (connect, read_results):
        with pytest.raises(VitcompressError, match=re.escape(str(path))) as e:
            read(path)
        assert re.search(expected, str(e.value)) and "\n" not in str(e.value)
    if before is not None:
        assert path.read_bytes() == before  # another program's file is left as it was
