"""Never lose the user's work: outputs built beside their destination, locks, refusals."""

import hashlib
import json
import multiprocessing as mp
import os
import signal
import stat

import pytest
import torch
from PIL import Image

from vitcompress.cli import main
from vitcompress.outputs import output_lock, partial_dir
from vitcompress.runs import load_run


def _folder(root, n=12):
    for c, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (16, 16), 40 + 150 * c + i).save(root / name / f"{i}.png")
    return f"imagefolder:{root}"


TRAIN = ["--model", "vit-nano", "--img-size", "16", "--patch", "4", "--epochs", "1",
         "--batch-size", "8", "--no-augment", "--channels", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    data = _folder(root / "images")
    assert main(["train", "--data", data, *TRAIN, "--out", str(root / "run")]) == 0
    return root / "run", data


def _sums(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_force_replaces_only_a_complete_result(run, tmp_path, capsys):
    base, data = run
    target = tmp_path / "target"
    assert main(["train", "--data", data, *TRAIN, "--out", str(target)]) == 0
    before = _sums(target)
    capsys.readouterr()
    # a command that fails after --force: the old run is intact, bit for bit
    bad = ["train", "--data", "imagefolder:/nonexistent", *TRAIN, "--out", str(target), "--force"]
    assert main(bad) == 2 and "not found" in _err(capsys)
    assert _sums(target) == before
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nsteps:\n  - prune: {sparsity: 0.5, layers: 'blocks.*.fc9'}\n")
    args = ["compress", "--checkpoint", str(base), "--recipe", str(recipe), "--out", str(target)]
    assert main([*args, "--force"]) == 2 and "fc9" in _err(capsys)
    assert _sums(target) == before
    # and one that succeeds replaces it whole
    good = ["compress", "--checkpoint", str(base), "--recipe", "int8-smallest", "--out"]
    assert main([*good, str(target), "--force", "--no-speed"]) == 0
    assert sorted(_sums(target)) == ["config.json", "metrics.json", "model.packed"]
    assert not partial_dir(target).exists()


def test_never_writes_over_its_input_or_into_a_foreign_folder(run, tmp_path, capsys):
    base, _ = run
    before = _sums(base)
    compress = ["compress", "--checkpoint", str(base), "--recipe", "int8-smallest", "--force"]
    assert main([*compress, "--out", str(base)]) == 2
    assert "which this command reads" in _err(capsys)
    assert main([*compress, "--out", str(base / "inside")]) == 2
    assert "which this command reads" in _err(capsys)
    assert _sums(base) == before
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 my photo")
    assert main([*compress, "--out", str(photos)]) == 2
    assert "not a vitcompress run" in _err(capsys)
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg"]
    export = ["export", "--checkpoint", str(base), "--format", "packed", "--out"]
    assert main([*export, str(base / "model.safetensors")]) == 2
    assert "the input it is made from" in _err(capsys)
    assert _sums(base) == before


def test_export_refuses_special_files_and_impossible_paths_before_any_work(run, tmp_path, capsys):
    base, _ = run
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    (tmp_path / "afile").write_text("x")
    export = ["export", "--checkpoint", str(base), "--format", "onnx", "--out"]
    for out, match in ((fifo, "special file"), (tmp_path / "afile" / "m.onnx", "is a file"),
                       (tmp_path, "is a folder")):  # fmt: skip
        assert main([*export, str(out)]) == 2
        assert match in _err(capsys)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the FIFO it was


def test_a_second_writer_fails_at_once_naming_the_holder(run, tmp_path, capsys):
    base, _ = run
    out = tmp_path / "busy"
    ready, done = mp.Event(), mp.Event()
    holder = mp.get_context("fork").Process(target=_hold, args=(out, ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        args = ["compress", "--checkpoint", str(base), "--recipe", "int8-smallest", "--out"]
        assert main([*args, str(out), "--no-speed"]) == 2
        assert f"is being written by pid {holder.pid}" in _err(capsys)
        assert not out.exists()
    finally:
        done.set()
        holder.join(30)
    # a holder killed with SIGKILL leaves no lock behind
    ready.clear()
    done.clear()
    killed = mp.get_context("fork").Process(target=_hold, args=(out, ready, done))
    killed.start()
    assert ready.wait(30)
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(30)
    assert main([*args, str(out), "--no-speed"]) == 0
    assert (out / "metrics.json").is_file()


def _hold(out, ready, done):
    with output_lock(out):
        ready.set()
        done.wait(60)


def test_files_follow_the_umask(run, tmp_path):
    base, _ = run
    old = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", str(base), "--format", "packed", "--out",
                     str(tmp_path / "m.packed")]) == 0  # fmt: skip
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.packed").stat().st_mode) == 0o644
    assert stat.S_IMODE((base / "model.safetensors").stat().st_mode) & 0o044  # not 0600


def test_incomplete_and_nonfinite_runs_are_refused_as_inputs(run, tmp_path, capsys):
    base, _ = run
    import shutil

    half = tmp_path / "half"
    shutil.copytree(base, half)
    (half / "metrics.json").unlink()
    assert main(["evaluate", "--checkpoint", str(half)]) == 2
    assert "incomplete run (no metrics.json)" in _err(capsys)
    broken = tmp_path / "nan"
    shutil.copytree(base, broken)
    from safetensors.torch import load_file, save_file

    state = load_file(broken / "model.safetensors")
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, broken / "model.safetensors")
    assert main(["evaluate", "--checkpoint", str(broken)]) == 2
    assert "'blocks.0.mlp.fc1.weight' holds 1 NaN or Inf" in _err(capsys)
    assert main(["evaluate", "--checkpoint", str(broken), "--allow-nonfinite", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # strict JSON: a NaN loss is null, not NaN
    assert out["loss"] is None
    model, _ = load_run(broken, allow_nonfinite=True)
    assert torch.isnan(model.blocks[0].mlp.fc1.weight).any()


def test_settings_that_cannot_train_are_refused_before_anything_is_written(run, tmp_path, capsys):
    _, data = run
    for flag, value in (("--epochs", "0"), ("--img-size", "0"), ("--lr", "-1")):
        out = tmp_path / f"x{flag}"
        args = ["train", "--data", data, *TRAIN, flag, value, "--out", str(out)]
        assert main(args) == 2, flag
        assert flag.lstrip("-").replace("-", "_") in _err(capsys)
        assert not out.exists() and not partial_dir(out).exists()


def test_an_interrupted_training_waits_beside_its_destination_and_resumes(run, tmp_path, capsys):
    _, data = run
    out = tmp_path / "long"
    # an interrupted run: what a killed training leaves (its last epoch and its state)
    assert main(["train", "--data", data, *TRAIN, "--out", str(tmp_path / "first")]) == 0
    partial = partial_dir(out)
    import shutil

    shutil.copytree(tmp_path / "first", partial)
    (partial / "metrics.json").unlink()
    (partial / "train_state.pt").write_bytes(b"")  # not a real state: resume says so below
    capsys.readouterr()
    assert main(["train", "--data", data, *TRAIN, "--out", str(out)]) == 2
    assert "interrupted training" in _err(capsys) and not out.exists()
    assert main(["train", "--data", data, *TRAIN, "--out", str(out), "--resume"]) == 2
    assert "corrupt training state" in _err(capsys)
