"""The report: plots and a self-contained HTML page from a results file."""

import csv
import re
import struct

import pytest

from vitcompress.plots import _kind, _markers, pareto_front, place_labels, study_b_rows
from vitcompress.report import build_report, format_best
from vitcompress.results import (
    FORMAT_ORDER,
    best_per_band,
    concurrent_runs,
    describe,
    eval_images,
    latency_warnings,
)
from vitcompress.studies.store import DB_NAME, band_order, connect, read_results, size_band, upsert

SPARSITIES = (0.5, 0.75, 0.875, 0.9375, 0.96875)


def _row(i: int, model: str, name: str, steps: list, top1: float, nbytes: int, **kw) -> dict:
    fmt, act, pattern, target, ratio = "fp32", None, None, 0.0, None
    for s in steps:
        ((kind, c),) = s.items()
        if kind == "quantize":
            fmt, act = c["weights"], c.get("activations")
        elif kind == "prune":
            pattern = c.get("pattern", "unstructured")
            target = c.get("sparsity", 0.5)
        elif kind == "lowrank":
            ratio = c["rank_ratio"]
        elif kind == "shrink":
            pattern = "structured"
    params = 139_018 if ratio is None else int(139_018 * (0.4 + ratio))
    return {
        "id": f"{model}-{name}-{i:08x}",
        "study": "synthetic",
        "model": model,
        "family": model.split("-")[0],
        "size": "nano",
        "recipe": name,
        "status": "ok",
        "top1": top1,
        "top5": min(1.0, top1 + 0.1),
        "loss": 1 - top1,
        "params_total": params,
        "params_nonzero": int(params * (1 - target)),
        "bytes_stored": nbytes,
        "bytes_fp32": 4 * 139_018,
        "latency_ms_b1": 1.0 + nbytes / 2e5,
        "bops": nbytes * 2.5e4,
        "latency_ms_b1_p90": 1.2 + nbytes / 2e5,
        "throughput_b32": 3000.0,
        "runtime": "torch-fp32",
        "format": fmt,
        "activations": act,
        "sparsity": target,
        "sparsity_target": target,
        "pattern": pattern,
        "rank_ratio": ratio,
        "size_band": size_band(nbytes),
        "base_top1": 0.86,
        "config": {"recipe": {"name": name, "steps": steps}},
        **kw,
    }


def _rows() -> list[dict]:
    rows, i = [], 0
    for model, base in (("vit-nano", 0.86), ("deit-nano", 0.87)):
        for fmt, nbytes in (("fp32", 560_000), ("tf32", 350_000), ("fp16", 290_000),
                            ("int8", 160_000)):  # fmt: skip
            q = {"weights": fmt, "activations": None if fmt == "fp32" else fmt}
            rows.append(_row(i, model, f"dense-{fmt}", [{"quantize": q}], base - 0.002 * i % 3,
                             nbytes))  # fmt: skip
            i += 1
        for k, sp in enumerate(SPARSITIES):
            for fmt in ("fp32", "int8"):
                steps = [{"prune": {"sparsity": sp, "schedule": "cubic"}},
                         {"finetune": {"max_steps": 100}}]  # fmt: skip
                if fmt == "int8":
                    steps.append({"quantize": {"weights": "int8", "activations": "int8"}})
                nbytes = int((560_000 if fmt == "fp32" else 160_000) * (1.1 - sp))
                rows.append(_row(i, model, f"cubic{sp * 100:g}-{fmt}", steps, base - 0.03 * k,
                                 nbytes + 20_000))  # fmt: skip
                i += 1
        for fmt in ("fp32", "int8"):
            steps = [{"prune": {"pattern": "2:4"}}, {"finetune": {"max_steps": 100}}]
            if fmt == "int8":
                steps.append({"quantize": {"weights": "int8", "activations": "int8"}})
            rows.append(_row(i, model, f"2of4-{fmt}", steps, base - 0.01, 300_000))
            i += 1
        for r in (0.5, 0.25):
            rows.append(_row(i, model, f"svd{r * 100:g}", [{"lowrank": {"rank_ratio": r}}],
                             base - (0.5 - r) / 4, int(560_000 * (0.4 + r))))  # fmt: skip
            i += 1
        q = {"weights": "int8", "activations": "int8", "dynamic": True}
        rows.append(_row(i, model, "dynamic-int8", [{"quantize": q}], base - 0.001, 150_000))
        i += 1
        # structured pruning: one shot in fp32 (lower), and fine-tuned in int8
        rows.append(_row(i, model, "shrink-mlp50", [{"shrink": {"mlp": 0.5}}], base - 0.2,
                         420_000))  # fmt: skip
        steps = [{"shrink": {"mlp": 0.5, "heads": 0.25}}, {"finetune": {"max_steps": 100}},
                 {"quantize": {"weights": "int8", "activations": "int8"}}]  # fmt: skip
        rows.append(_row(i + 1, model, "shrink-ft-int8", steps, base - 0.004, 110_000))
        i += 2
    rows.append({"id": "vit-nano-broken-00000000", "study": "synthetic", "model": "vit-nano",
                 "recipe": "broken", "status": "failed",
                 "error": "step 1 (prune): 'blocks.9.*' matches no layer <script>"})  # fmt: skip
    rows.append({"id": "vit-nano-unfinished-00000000", "study": "synthetic", "model": "vit-nano",
                 "recipe": "unfinished", "status": "running"})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    con = connect(out / DB_NAME)
    for r in _rows():
        upsert(con, r)
    con.close()
    return out, build_report(out)


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_every_plot_is_a_real_png(report):
    out, _ = report
    names = ("formats", "sparsity", "combinations", "study_b", "pareto_size", "pareto_latency",
             "pareto_bops")  # fmt: skip
    for name in names:
        p = out / "plots" / f"{name}.png"
        assert p.is_file(), name
        w, h = _png_size(p)
        assert w >= 500 and h >= 150, (name, w, h)
        assert p.stat().st_size > 10_000, name  # drawn, not blank


def test_html_is_self_contained_and_lists_every_run(report):
    out, html_path = report
    assert html_path == out / "report.html"
    text = html_path.read_text()
    for r in _rows():
        assert r["id"] in text
    assert len(re.findall(r"src='data:image/png;base64,", text)) == 7
    assert "http://" not in text and "https://" not in text  # nothing fetched: opens from disk
    assert "<script src" not in text and "function sortBy" in text
    assert "&lt;script&gt;" in text  # error text is escaped
    assert "Best runs per size band" in text


def test_describe_reads_the_recipe_not_the_name():
    rows = {r["recipe"]: r for r in _rows() if r["status"] == "ok"}
    assert describe(rows["cubic93.75-int8"]) == {
        "format": "int8", "sparsity": "93.75", "lowrank": None, "shrink": None, "finetuned": True,
    }  # fmt: skip
    assert describe(rows["shrink-ft-int8"])["shrink"] == "mlp 50%, heads 25%"
    assert describe(rows["2of4-fp32"])["sparsity"] == "2:4"
    assert describe(rows["dynamic-int8"])["format"] == "int8-dyn"
    assert describe(rows["svd25"])["lowrank"] == 0.25


def test_shrunk_runs_stay_out_of_the_like_for_like_plots():
    """A shrunk model is neither 'dense fp32' in the formats plot nor study B's baseline: with
    the same format as the dense run it would otherwise overwrite its point."""
    rows = [r for r in _rows() if r["status"] == "ok"]
    shrunk = {r["id"] for r in rows if r["recipe"].startswith("shrink")}
    assert len(shrunk) == 4
    assert not shrunk & {r["id"] for r in study_b_rows(rows)}
    assert {_kind(r) for r in rows if r["id"] in shrunk} == {"shrink"}


def test_study_b_leaves_out_a_model_without_an_svd_or_dynamic_run():
    rows = [r for r in _rows() if r["status"] == "ok"]
    dense = next(r for r in rows if r["recipe"] == "dense-fp32")
    lone = {**dense, "id": "lone", "model": "vit-micro", "size": "micro"}
    got = study_b_rows([*rows, lone])
    assert dense["id"] in {r["id"] for r in got}  # the reference of its model's variants
    assert "lone" not in {r["id"] for r in got}  # nothing to compare it with


def test_pareto_front_and_best_per_band():
    pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.58), (0.5, 0.4), (4.0, 0.7)]
    assert pareto_front(pts) == [4, 0, 1, 5]
    rows = [r for r in _rows() if r["status"] == "ok"]
    best = best_per_band(rows, 5)
    assert list(best) == sorted(best, key=band_order)  # smallest band first
    for band, rs in best.items():
        assert len(rs) <= 5 and all(r["size_band"] == band for r in rs)
        assert [r["top1"] for r in rs] == sorted((r["top1"] for r in rs), reverse=True)
    text = format_best(rows)
    assert "64-256 KB:" in text and "vit-nano" in text


def test_report_without_results_is_a_one_line_error(tmp_path):
    from vitcompress.errors import VitcompressError

    with pytest.raises(VitcompressError, match="no results"):
        build_report(tmp_path)


def _store(out, rows) -> None:
    con = connect(out / DB_NAME)
    for r in rows:
        upsert(con, r)
    con.close()


def test_findings_come_first_with_a_verdict_each(report):
    _, html_path = report
    text = html_path.read_text()
    start = text.index("The reference studies' findings")
    assert start < text.index("Best runs per size band") < text.index("<figure>")
    table = text[start : text.index("</table>", start)]
    for key in ("A1", "A2", "A3", "A4", "A5", "A6", "B1a", "B1b"):
        assert f"<b>{key}</b>" in table
    assert len(re.findall(r"class='verdict (holds|fails|nm)'", table)) == 8
    # one size per family in these rows: A3's comparison of sizes cannot be made
    assert "needs two sizes of one family" in table


def test_results_csv_has_one_plain_row_per_run(report):
    out, _ = report
    with open(out / "results.csv", newline="") as f:
        got = list(csv.DictReader(f))
    rows = read_results(out)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    one = next(g for g in got if g["recipe"] == "cubic93.75-int8")
    src = next(r for r in rows if r["id"] == one["id"])
    assert float(one["top1"]) == src["top1"] and int(one["bytes_stored"]) == src["bytes_stored"]
    assert one["finetuned"] == "True" and one["pattern"] == "unstructured"
    assert "config" not in one and "traceback" not in one
    assert next(g for g in got if g["status"] == "failed")["top1"] == ""


def test_fine_tuned_and_one_shot_runs_are_marked_in_the_tables(report):
    _, html_path = report
    text = html_path.read_text()
    assert '<th onclick="sortBy(this)">tuning</th>' in text
    row = text[text.index(">vit-nano-cubic50-fp32-") - 2000 : text.index(">vit-nano-cubic50-fp32-")]
    assert ">fine-tuned<" in row
    row = text[text.index(">vit-nano-dense-int8-") - 2000 : text.index(">vit-nano-dense-int8-")]
    assert ">one-shot<" in row


def _smoke_rows(limit: int | None, start: str = "2026-01-01T00:00:0") -> list[dict]:
    """A smoke-like study: formats, one 2:4 and one cubic run; no SVD, no dynamic INT8."""
    rows = []
    for i, (name, steps) in enumerate([
        ("fp32", [{"quantize": {"weights": "fp32", "activations": None}}]),
        ("fp16", [{"quantize": {"weights": "fp16", "activations": "fp16"}}]),
        ("2of4-ft-int8", [{"prune": {"pattern": "2:4"}}, {"finetune": {"max_steps": 4}},
                          {"quantize": {"weights": "int8", "activations": "int8"}}]),
        ("cubic75-ft", [{"prune": {"sparsity": 0.75}}, {"finetune": {"max_steps": 4}}]),
    ]):  # fmt: skip
        r = _row(i, "vit-nano", name, steps, 0.80 + 0.01 * i, 500_000 - 100_000 * i)
        r["config"]["limit"] = limit
        r["started_at"], r["ended_at"] = f"{start}{2 * i}", f"{start}{2 * i + 1}"
        rows.append(r)
    return rows


def test_a_smoke_study_leaves_out_what_it_did_not_run_and_says_its_images(tmp_path):
    rows = _smoke_rows(512)
    rows[1]["latency_ms_b1_p90"] = 3 * rows[1]["latency_ms_b1"]  # a busy machine
    _store(tmp_path, rows)
    text = build_report(tmp_path).read_text()
    drawn = {p.stem for p in (tmp_path / "plots").glob("*.png")}
    assert "study_b" not in drawn and "formats" in drawn and "sparsity" in drawn
    assert len(re.findall(r"src='data:image/png;base64,", text)) == len(drawn)
    assert "Not in this report" in text and "no SVD (low-rank) or dynamic INT8 run" in text
    # the images: the study's limit, never "the full test split"
    assert "the first 512 images (the study's <code>limit</code>) for all 4" in text
    assert "full split" not in text and "On 512 test images" in text
    # the spread: median and p90 both shown, the busy row flagged
    assert "ms b1 p90" in text and "Latency measured on a loaded machine" in text
    assert "1 of 4 runs have a p90 latency more than 1.5x" in text
    assert text.count("\u26a0") >= 3  # the warning and the two latency cells of the busy row


def test_rows_measured_side_by_side_are_flagged_and_rows_apart_are_not():
    apart = _smoke_rows(None)
    assert concurrent_runs(apart) == {r["id"]: 0 for r in apart}
    assert latency_warnings(apart) == {}
    together = _smoke_rows(None)
    for r in together:  # four runs over one interval: --jobs 4
        r["started_at"], r["ended_at"] = "2026-01-01T00:00:00", "2026-01-01T00:00:09"
    assert set(concurrent_runs(together).values()) == {3}
    assert all("3 other run(s)" in w for w in latency_warnings(together).values())
    jobs = _smoke_rows(None)
    jobs[0]["config"]["jobs"] = 2
    assert latency_warnings(jobs) == {jobs[0]["id"]: "measured with jobs=2"}
    busy = _smoke_rows(None)
    busy[1]["metrics"] = {"load_avg_1m": 4.3, "cpus": 2}  # another job had both cores
    busy[2]["metrics"] = {"load_avg_1m": 2.9, "cpus": 2}  # itself on 2 threads, and a bit more
    assert latency_warnings(busy) == {busy[1]["id"]: "load average 4.3 on 2 CPUs"}


def test_a_run_timed_under_load_is_flagged_in_the_report(tmp_path):
    rows = _smoke_rows(None)
    rows[3]["metrics"] = {"load_avg_1m": 6.0, "cpus": 2}
    _store(tmp_path, rows)
    text = build_report(tmp_path).read_text()
    assert "1 of 4 runs were timed while the 1-minute load average was above" in text
    assert "load average 6.0 on 2 CPUs" in text  # the cell's hover text


def test_each_row_says_how_many_test_images_it_used():
    r = _smoke_rows(512)[0]
    assert eval_images(r) == (512, "first 512")
    assert eval_images({**r, "metrics": {"samples": 500}}) == (500, "500 (limit 512)")
    assert eval_images({**r, "config": {"limit": None}}) == (None, "full split")


def test_mixed_image_counts_are_said_per_group(tmp_path):
    rows = _smoke_rows(512)[:2] + _smoke_rows(None)[2:]
    _store(tmp_path, rows)
    text = build_report(tmp_path).read_text()
    assert "first 512 images" in text and "for 2 of 4 finished runs" in text
    assert "the full split (its size is not recorded" in text and "test images</th>" in text


def test_every_pareto_front_point_gets_its_own_label():
    from vitcompress.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(1.0 + 0.02 * i, 80 + 0.05 * i) for i in range(12)]  # a tight cluster
    ax.scatter(*zip(*pts, strict=True))
    ax.set_xlim(0.9, 1.4)
    ax.set_ylim(79.5, 81)
    anns = place_labels(ax, pts, [str(i) for i in range(1, 13)])
    assert [a.get_text() for a in anns] == [str(i) for i in range(1, 13)]
    r = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in anns]
    clashes = sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)
    assert clashes == 0


def test_each_format_has_its_own_marker():
    m = _markers([*FORMAT_ORDER, "fp6", "int4"])
    assert len(set(m.values())) == len(m) == len(FORMAT_ORDER) + 2
