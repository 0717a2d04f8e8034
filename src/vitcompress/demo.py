"""``vitcompress demo``: the ``seed`` study on Fashion-MNIST, its report, the reference studies'
findings checked on it, and the best runs.

Resumable like any sweep: run it again and finished runs are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

from vitcompress.findings import findings, format_findings
from vitcompress.report import build_report, format_best
from vitcompress.studies import run_sweep
from vitcompress.studies.store import read_results


def run_demo(out: Path = Path("runs/demo"), study: str | dict = "seed", jobs: int = 1) -> None:
    """Run ``study`` (default ``seed``) into ``out``, build the report, print the findings and the
    best runs."""
    out = Path(out)
    t0 = time.perf_counter()
    name = study if isinstance(study, str) else study.get("name", "study")
    print(f"vitcompress demo: study {name!r} into {out} (finished runs are skipped)", flush=True)
    rows = run_sweep(study, out, jobs=jobs)
    report = build_report(out)
    minutes = (time.perf_counter() - t0) / 60
    print()
    print(format_findings(findings(read_results(out))))
    print()
    print(f"Five best runs by top-1 per size band (bytes as stored), {len(rows)} runs:")
    print(format_best(rows, 5))
    print()
    print(f"report: {report.resolve()}")
    print(f"plots:  {(out / 'plots').resolve()}")
    print(f"demo finished in {minutes:.1f} min")
