"""Studies: grid expansion, resume, failures, concurrency, Ray."""

import json
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
from vitcompress.studies.store import DB_NAME, read_results
from vitcompress.sweep import expand_study, load_study, run_sweep

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Tiny: one baseline (shared by every test below through its content hash), few runs.
TINY = {
    "name": "tiny",
    "data": "fashion-mnist",
    "limit": 128,
    "models": {"vit-nano": {"preset": "vit-nano", "epochs": 1, "batch_size": 64}},
    "recipes": [
        {
            "name": "$fmt",
            "grid": {
                "fmt": {
                    "fp32": {"weights": "fp32", "activations": None},
                    "int8": {"weights": "int8", "activations": "int8",
                             "calibration": {"batches": 1}},
                }
            },
            "steps": [{"quantize": "$fmt"}],
        },
        {
            "name": "prune50",
            "steps": [
                {"prune": {"sparsity": 0.5}},
                {"finetune": {"max_steps": 2, "batch_size": 32}},
            ],
        },
    ],
}  # fmt: skip


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


def _copy_baselines(src: Path, dst: Path) -> None:
    shutil.copytree(src / "baselines", dst / "baselines", dirs_exist_ok=True)


def _quick(doc: dict, name: str, recipes: slice = slice(None)) -> dict:
    """A copy of ``doc`` under another name, some of its recipes, no speed measurement."""
    doc = json.loads(json.dumps(doc))
    return {**doc, "name": name, "speed": False, "recipes": doc["recipes"][recipes]}


def _sweep_subprocess(study: Path, out: Path, jobs: int = 1) -> subprocess.Popen:
    code = (
        "import sys; from vitcompress.sweep import run_sweep; "
        "run_sweep(sys.argv[1], sys.argv[2], jobs=int(sys.argv[3]), threads=1, progress=False)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(study), str(out), str(jobs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory) -> Path:
    """The tiny study swept once, in this process (real training and compress_run)."""
    out = tmp_path_factory.mktemp("tiny")
    run_sweep(TINY, out, threads=1, progress=False)
    return out


# --- grid expansion --------------------------------------------------------------------------


def test_builtin_studies_expand_with_stable_ids(tmp_path):
    seed = expand_study("seed")
    again = expand_study("seed")
    assert len(seed.runs) == 46  # 38 of the two studies, 8 structured-pruning runs
    assert seed.run_ids() == again.run_ids()
    assert len(set(seed.run_ids())) == len(seed.run_ids())
    assert {r.model for r in seed.runs} == {"vit-nano", "deit-nano"}
    assert len(seed.baselines) == 3  # the teacher, ViT, DeiT
    smoke = expand_study("smoke")
    assert 3 <= len(smoke.runs) <= 8
    full = expand_study("seed-full", data="imagefolder:/data/RESISC45")
    assert {r.size for r in full.runs} == {"tiny", "small", "base"}
    assert all(r.data == "imagefolder:/data/RESISC45" for r in full.runs)
    # (test_kill_9_mid_sweep_then_resume checks that another process gives the same ids)
    moved = expand_study("seed", data="fashion-mnist:/elsewhere")
    assert not set(moved.run_ids()) & set(seed.run_ids())


def test_grid_syntax_substitutes_values_labels_and_builtins():
    doc = {
        "name": "g",
        "teachers": {"cnn": {"preset": "resnet-micro", "epochs": 1}},
        "models": {
            "v": {"preset": "vit-nano", "epochs": 1},
            "d": {"preset": "deit-nano", "epochs": 1, "teacher": "cnn", "distill": "soft"},
        },
        "recipes": [
            {
                "name": "s$sp-${q}",
                "grid": {"sp": [0.5, 0.75], "q": {"none": None, "i8": {"weights": "int8"}}},
                "steps": [
                    {"prune": {"sparsity": "$sp", "schedule": "cubic"}},
                    {"finetune": {"max_steps": 3, "distill": "$distill"}},
                    {"quantize": "$q"},
                ],
            },
            {"name": "svd", "models": ["v"], "steps": [{"lowrank": {"rank_ratio": 0.5}}]},
        ],
    }
    st = expand_study(doc)
    names = [(r.model, r.recipe_name) for r in st.runs]
    assert names == [
        ("v", "s0.5-none"), ("v", "s0.5-i8"), ("v", "s0.75-none"), ("v", "s0.75-i8"), ("v", "svd"),
        ("d", "s0.5-none"), ("d", "s0.5-i8"), ("d", "s0.75-none"), ("d", "s0.75-i8"),
    ]  # fmt: skip
    v, d = st.runs[1], st.runs[6]
    assert v.recipe["steps"][0] == {"prune": {"sparsity": 0.5, "schedule": "cubic"}}
    assert v.recipe["steps"][1]["finetune"]["distill"] is None  # no teacher: no distillation
    assert v.recipe["steps"][2] == {"quantize": {"weights": "int8"}}
    assert len(st.runs[0].recipe["steps"]) == 2  # the null quantize step is left out
    distill = d.recipe["steps"][1]["finetune"]["distill"]
    assert distill["kind"] == "soft" and distill["teacher"].startswith("@baseline:")
    assert st.baselines[d.baseline].teacher == distill["teacher"].split(":")[1]


# Recorded from the code before the studies/ split. A run id and a baseline hash are digests of
# the resolved run, so a change here renames runs: every user's next sweep would rerun from scratch.
PINNED = {
    ("seed", None): {
        "runs": ("vit-nano-dense-fp32-387900e2", "vit-nano-cubic96.875-int8-1f9c332b",
                 "deit-nano-cubic50-int8-00ddf184", "deit-nano-dynamic-int8-fc0261a9"),
        "baselines": ("5a7708d75249", "4859e0fc8ba1", "7df85f3f1f1c"),  # resnet, vit, deit
    },
    ("smoke", None): {
        "runs": ("vit-nano-fp32-206cf730", "vit-nano-fp16-c761610d", "vit-nano-int8-bb4cbfda",
                 "vit-nano-2of4-ft-int8-8e8790be", "vit-nano-cubic75-ft-f7d76f9d"),
        "baselines": ("8a1d005a7aee",),
    },
    ("seed-full", "imagefolder:/tmp/x"): {
        "runs": ("vit-tiny-dense-fp32-a8f33953", "vit-base-svd25-df71aecd",
                 "deit-small-shrink-mlp50-heads25-int8-4299c3c8",
                 "deit-base-dynamic-int8-07fa208e"),
        "baselines": ("22d66533a512", "6027e5738e77", "66e011b69e32", "01dca992c4d9",
                      "ff800ccfc5ec", "9eb713a6c1bc", "efffa066c782"),
    },
}  # fmt: skip


@pytest.mark.parametrize("name,data", list(PINNED))
def test_run_ids_and_baseline_hashes_are_pinned(name, data, tmp_path):
    st = expand_study(name, data=data)
    ids = st.run_ids()
    for rid in PINNED[name, data]["runs"]:
        assert rid in ids
    assert tuple(st.baselines) == PINNED[name, data]["baselines"]  # teachers first
    for h, b in st.baselines.items():
        assert b.directory(tmp_path) == tmp_path / "baselines" / h
    deit = next((r for r in st.runs if r.id == "deit-nano-cubic50-int8-00ddf184"), None)
    if deit is not None:  # a fine-tune distils from its teacher, named by the teacher's hash
        distill = deit.recipe["steps"][1]["finetune"]["distill"]
        assert distill == {"teacher": "@baseline:5a7708d75249", "kind": "hard"}


@pytest.mark.parametrize(
    "text,match",
    [
        ("models: {v: {preset: vit-nano}}\nrecipes: []\nsteps: 1\n", r"unknown key 'steps'"),
        ("models: {v: {preset: vit-nano, epoch: 2}}\nrecipes: [{name: a, steps: "
         "[quantize: {}]}]\n", r"models\.v: unknown key 'epoch'"),
        ("models: {v: {preset: vit-giant}}\nrecipes: [{name: a, steps: [quantize: {}]}]\n",
         r"unknown preset 'vit-giant'"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, stesp: []}]\n",
         r"recipe 'a': unknown key 'stesp'"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [prune: {sparsity: $s}]}]\n",
         r"\$s is not an axis"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a$s, grid: {s: [1, 2], t: [3]}, "
         "steps: [prune: {sparsity: $s}]}]\n", r"grid axis 't' is used nowhere"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [prune: {sparsty: 0.5}]}]\n",
         r"recipe 'a': step 1 \(prune\): unknown key 'sparsty'"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [prune: {sparsity: 1.5}]}]\n",
         r"recipe 'a'.*sparsity"),
        ("models: {v: {preset: vit-nano, teacher: nobody}}\nrecipes: [{name: a, steps: "
         "[quantize: {}]}]\n", r"teacher 'nobody' is neither"),
        ("models: [vit-nano]\nrecipes: [{name: a, steps: [quantize: {}]}]\n",
         r"'models' must be a non-empty mapping"),
        ("models: {v: {preset: vit-nano}}\nrecipes: [{name: a, steps: [quantize: {}]}, "
         "{name: a, steps: [quantize: {}]}]\n", r"comes out twice"),
        ("models: {v: {preset: vit-nano}\nrecipes: [\n", r"not valid YAML"),
        ("models: {v: {preset: vit-nano, amp: fp8}}\nrecipes: [{name: a, steps: "
         "[quantize: {}]}]\n", r"models\.v: amp must be one of null, bf16, fp16"),
    ],
)  # fmt: skip
def test_malformed_study_is_one_line_error_naming_file_and_key(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(VitcompressError, match=match) as e:
        expand_study(p)
    assert "\n" not in str(e.value)
    assert str(p) in str(e.value)


def test_study_not_found_names_builtins(tmp_path):
    with pytest.raises(VitcompressError, match="built-in: smoke, seed, seed-full"):
        load_study(tmp_path / "nope.yaml")


# --- running ---------------------------------------------------------------------------------


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


def test_rerun_skips_finished_runs(tiny_out, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(tiny_out, out)
    before = _db_rows(out)
    rows = run_sweep(TINY, out, threads=1, progress=False)
    assert _db_rows(out) == before  # nothing reran: same start times
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_resume_reruns_unfinished_and_missing_rows(tiny_out, tmp_path):
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
    rows = run_sweep(TINY, out, threads=1, progress=False)
    after = {i: (s, t) for i, s, t in _db_rows(out)}
    assert sorted(after) == ids  # nothing lost, nothing duplicated
    assert all(s == "ok" for s, _ in after.values())
    assert after[ids[0]][1] != before[ids[0]][1] and after[ids[2]] == before[ids[2]]
    assert {r["id"] for r in rows} == set(ids)
    assert (out / "runs" / ids[0] / "metrics.json").is_file()


def test_kill_9_mid_sweep_then_resume(tiny_out, tmp_path):
    out = tmp_path / "killed"
    _copy_baselines(tiny_out, out)
    study = _study(tmp_path, _quick(TINY, "tiny"))
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


def test_failed_run_is_recorded_and_the_sweep_goes_on(tiny_out, tmp_path):
    out = tmp_path / "fail"
    _copy_baselines(tiny_out, out)
    doc = _quick(TINY, "tiny", slice(0, 1))
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


def test_two_sweeps_write_one_database_at_once(tiny_out, tmp_path):
    out = tmp_path / "shared"
    _copy_baselines(tiny_out, out)
    a, b = _quick(TINY, "a", slice(0, 1)), _quick(TINY, "b", slice(0, 1))
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


@pytest.mark.ray
def test_ray_executor_gives_the_same_rows_as_local(tiny_out, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "ray"
    _copy_baselines(tiny_out, out)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # one task at a time (2 CPUs each): a single Ray worker imports torch
        doc = {**_quick(TINY, "tiny", slice(0, 1)), "resources": {"cpus": 2}}
        rows = run_sweep(doc, out, executor="ray", threads=1, progress=False)
    finally:
        ray.shutdown()
    assert len(rows) == 2
    local = [r for r in read_results(tiny_out) if r["id"] in {r["id"] for r in rows}]
    key = ("id", "status", "top1", "params_nonzero")
    assert sorted(tuple(r[k] for k in key) for r in rows) == sorted(
        tuple(r[k] for k in key) for r in local
    )


def test_ray_missing_is_a_one_line_error(tiny_out, tmp_path, monkeypatch):
    out = tmp_path / "noray"
    _copy_baselines(tiny_out, out)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(VitcompressError, match=r"pip install 'vitcompress\[ray\]'"):
        run_sweep(_quick(TINY, "tiny"), out, executor="ray", progress=False)
    with pytest.raises(VitcompressError, match="unknown executor 'dask'"):
        run_sweep(_quick(TINY, "tiny"), out, executor="dask", progress=False)


def test_seed_full_without_its_data_says_to_pass_data(tmp_path):
    with pytest.raises(VitcompressError, match=r"does not exist; pass --data") as e:
        run_sweep("seed-full", tmp_path, data="imagefolder:/no/such/RESISC45", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / DB_NAME).exists()  # checked before any work


def test_demo_resumes_builds_the_report_and_prints_the_best(tiny_out, tmp_path, capsys):
    from vitcompress.demo import run_demo

    out = tmp_path / "demo"
    shutil.copytree(tiny_out, out)
    before = _db_rows(out)
    run_demo(out, study=TINY)  # every run is finished: nothing reruns
    assert _db_rows(out) == before
    text = capsys.readouterr().out
    assert f"report: {(out / 'report.html').resolve()}" in text
    assert "Five best runs by top-1 per size band" in text and "vit-nano" in text
    assert (out / "plots" / "formats.png").is_file()
