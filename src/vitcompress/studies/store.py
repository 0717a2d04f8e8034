"""The results store: one SQLite file, ``OUT/results.sqlite``, one row per run (table ``runs``).

The primary key is the run id, so a rerun updates a row and never adds a second one. Each row is
committed on its own (autocommit) when its run starts and when it ends: a sweep killed at any
point leaves every finished run recorded. Several sweeps may write one file at once: WAL mode,
and a busy timeout long enough for another sweep's commit.

This module needs nothing but the standard library, so that the report (and anyone reading
results) does not import torch or the runner.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from vitcompress.errors import VitcompressError

DB_NAME = "results.sqlite"

# Result fields of a run (DESIGN.md), in the order the table shows them.
RESULT_FIELDS = (
    "top1", "top5", "loss", "params_total", "params_nonzero", "bytes_stored", "bytes_fp32",
    "latency_ms_b1", "latency_ms_b1_p90", "throughput_b32", "runtime", "format", "activations",
    "sparsity", "sparsity_target", "pattern", "rank_ratio", "recipe_hash", "seed", "wall_s",
    "macs", "macs_nonzero", "bops", "bops_nonzero", "weight_bits", "peak_act_bytes",
)  # fmt: skip
ROW_FIELDS = (
    "id", "study", "model", "family", "size", "preset", "data", "recipe", "status", "error",
    "started_at", "ended_at", "worker", "cpu_s", "size_band", "base_top1", "base_params",
    *RESULT_FIELDS, "config", "metrics", "traceback",
)  # fmt: skip
TEXT_FIELDS = frozenset({
    "id", "study", "model", "family", "size", "preset", "data", "recipe", "status", "error",
    "started_at", "ended_at", "worker", "size_band", "runtime", "format", "activations", "pattern",
    "recipe_hash", "config", "metrics", "traceback",
})  # fmt: skip
INT_FIELDS = frozenset({"params_total", "params_nonzero", "bytes_stored", "bytes_fp32", "seed",
                        "base_params", "macs", "macs_nonzero", "bops", "bops_nonzero",
                        "weight_bits", "peak_act_bytes"})  # fmt: skip
JSON_FIELDS = ("config", "metrics")  # stored as JSON text, decoded when read
# the columns of results.csv: every field but the nested and the long ones
CSV_FIELDS = tuple(f for f in ROW_FIELDS if f not in (*JSON_FIELDS, "traceback"))

# Size bands by bytes as stored: factors of 4 from 64 KiB, so nano/micro models spread over a few.
BAND_EDGES = (64, 256, 1024, 4096, 16384, 65536, 262144)  # KiB


def size_band(nbytes: int | float | None) -> str | None:
    """The size band of a model stored in ``nbytes`` bytes: ``"<64 KB"``, ``"64-256 KB"``, ..."""
    if nbytes is None:
        return None
    kib = nbytes / 1024
    if kib < BAND_EDGES[0]:
        return f"<{BAND_EDGES[0]} KB"
    for lo, hi in itertools.pairwise(BAND_EDGES):
        if kib < hi:
            if hi < 1024:
                return f"{lo}-{hi} KB"
            if lo < 1024:
                return f"{lo} KB-{hi // 1024} MB"
            return f"{lo // 1024}-{hi // 1024} MB"
    return f">={BAND_EDGES[-1] // 1024} MB"


def band_order(band: str | None) -> int:
    """Sort key of a size band (smallest first)."""
    labels = [size_band(0)] + [size_band(e * 1024) for e in BAND_EDGES]
    return labels.index(band) if band in labels else len(labels)


def now() -> str:
    """The time as ``started_at``/``ended_at`` store it: UTC ISO 8601 to the microsecond.

    One fixed width and zone, so the text sorts as the times do: the runner compares a row's
    ``started_at`` with its own start as strings.
    """
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _col_type(name: str) -> str:
    return "TEXT" if name in TEXT_FIELDS else "INTEGER" if name in INT_FIELDS else "REAL"


def connect(path: Path) -> sqlite3.Connection:
    """A connection to a results file (created if missing): WAL, long busy timeout.

    Raises:
        VitcompressError: the file cannot be opened, is not an SQLite database, or is another
            program's database (tables, but no ``runs`` table keyed by ``id``): one line.
    """
    path = Path(path)
    con = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=120, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=120000")
        _check_schema(con, path)  # before anything changes another program's file
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        cols = ", ".join(
            f"{c} {_col_type(c)}" + (" PRIMARY KEY" if c == "id" else "") for c in ROW_FIELDS
        )
        con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
        have = {r["name"] for r in con.execute("PRAGMA table_info(runs)")}
        for c in ROW_FIELDS:
            if c not in have:  # a results file from an older version
                with contextlib.suppress(sqlite3.OperationalError):  # a concurrent sweep added it
                    con.execute(f"ALTER TABLE runs ADD COLUMN {c} {_col_type(c)}")
    except (sqlite3.Error, OSError) as e:
        if con is not None:
            con.close()
        raise VitcompressError(f"cannot use results file {path}: {_one_line(e)}") from None
    except VitcompressError:
        con.close()
        raise
    return con


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _check_schema(con: sqlite3.Connection, path: Path) -> None:
    """Refuse another program's database: tables of its own but no ``runs``, or a ``runs``
    that is not ours (keyed by ``id``). An empty database is a new results file."""
    tables = {
        r["name"]
        for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        if not r["name"].startswith("sqlite_")
    }
    if not tables:
        return
    keys = [r["name"] for r in con.execute("PRAGMA table_info(runs)") if r["pk"]]
    if keys != ["id"]:
        found = "a 'runs' table not keyed by 'id'" if "runs" in tables else "no 'runs' table"
        raise VitcompressError(
            f"{path} is not a vitcompress results file ({found}; its tables: "
            f"{', '.join(sorted(tables)[:5])}); ours holds a table 'runs' keyed by 'id'"
        )


def upsert(con: sqlite3.Connection, row: dict) -> None:
    """Insert or update one row (by id) in one committed transaction.

    Only the columns ``row`` holds are written: a row written when its run starts keeps its
    other columns when the run's results come in. Keys that are not columns are dropped.
    """
    row = {k: v for k, v in row.items() if k in ROW_FIELDS}
    cols = list(row)
    sets = ", ".join(f"{c}=excluded.{c}" for c in cols if c != "id")
    sql = (
        f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
        f"ON CONFLICT(id) DO UPDATE SET {sets}"
    )
    vals = [json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for v in row.values()]
    con.execute(sql, vals)


def _decoded(row: sqlite3.Row) -> dict:
    r = dict(row)
    for k in JSON_FIELDS:
        if isinstance(r.get(k), str):
            with contextlib.suppress(json.JSONDecodeError, RecursionError):  # kept as text
                r[k] = json.loads(r[k])
    return r


def read_results(path: Path, study: str | None = None) -> list[dict]:
    """All rows of a results file (or of one study in it), as dicts; JSON columns decoded.

    ``path`` is the file or the directory holding ``results.sqlite``; rows come in the order
    they were first written.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DB_NAME
    if not path.is_file():
        raise VitcompressError(f"no results file at {path}")
    con = connect(path)
    try:
        q = "SELECT * FROM runs" + (" WHERE study = ?" if study else "") + " ORDER BY rowid"
        return [_decoded(r) for r in con.execute(q, (study,) if study else ())]
    except sqlite3.Error as e:  # a corrupt page shows only when it is read
        raise VitcompressError(f"cannot read results file {path}: {_one_line(e)}") from None
    finally:
        con.close()


def select_rows(con: sqlite3.Connection, ids: Sequence[str], cols: str = "*") -> dict[str, dict]:
    """The rows of these ids that exist, by id (JSON columns decoded); ``cols`` must hold id."""
    out: dict[str, dict] = {}
    for i in range(0, len(ids), 500):  # SQLite caps the parameters of one statement
        chunk = list(ids[i : i + 500])
        marks = ",".join("?" * len(chunk))
        for r in con.execute(f"SELECT {cols} FROM runs WHERE id IN ({marks})", chunk):
            r = _decoded(r)
            out[r["id"]] = r
    return out


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] = CSV_FIELDS) -> None:
    """Write ``rows`` as CSV, one line per run: ``columns`` in order, values plain (numbers
    as Python writes them, in full precision and unscaled: top-1 0.8421, bytes 171338), an
    empty cell for None. Nested values (dicts, lists) are written as JSON."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(
            "" if (v := r.get(c)) is None
            else json.dumps(v, default=str) if isinstance(v, (dict, list))
            else v
            for c in columns
        )  # fmt: skip
    Path(path).write_text(buf.getvalue(), encoding="utf-8")
