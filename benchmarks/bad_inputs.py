"""Try vitcompress as a careless or hostile user would: each bad input through the command
line, in a fresh process. Records the exit code, the error line, whether anything was written
or changed, and the process's peak memory; writes benchmarks/BAD_INPUTS.md.

    python benchmarks/bad_inputs.py [--out benchmarks/BAD_INPUTS.md]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

VC = [sys.executable, "-m", "vitcompress.cli"]


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out


def run(argv: list[str], cwd: Path, timeout: int = 300) -> tuple[int, str, float]:
    """(exit code, last stderr line, peak RSS in MB) of one command in a fresh process."""
    code = (
        "import sys\n"
        "sys.argv = ['vitcompress', *sys.argv[1:]]\n"
        "try:\n"
        "    from vitcompress.cli import main\n"
        "    rc = main(sys.argv[1:])\n"
        "finally:\n"
        "    hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')]\n"
        "    peak = int(hwm[0].split()[1]) / 1024 if hwm else float('nan')\n"
        "    print(f'@@peak {peak:.0f}', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    try:
        p = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True,
                           text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, "TIMEOUT (a hang)", float("nan")
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    peak = next((float(ln.split()[1]) for ln in lines if ln.startswith("@@peak")), float("nan"))
    lines = [ln for ln in lines if not ln.startswith("@@peak") and "%|" not in ln]
    errors = [ln for ln in lines if "error:" in ln or "Traceback" in ln]
    last = (errors or lines or [""])[-1]
    if any("Traceback" in ln for ln in lines):
        last = "TRACEBACK: " + lines[-1]
    return p.returncode, last[:160], peak


def idx(arr_shape, dtype_code=0x08, data=b"") -> bytes:
    return (
        struct.pack(">HBB", 0, dtype_code, len(arr_shape))
        + b"".join(struct.pack(">I", d) for d in arr_shape)
        + data
    )


def build(root: Path) -> list[tuple[str, list[str], Path | None]]:
    """(what, argv, folder whose content must not change) for every case."""
    from PIL import Image

    data = root / "images"
    for c, name in enumerate(("dark", "light")):
        (data / name).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (16, 16), 40 + 150 * c + i).save(data / name / f"{i}.png")
    spec = f"imagefolder:{data}"
    train = ["--model", "vit-nano", "--img-size", "16", "--patch", "4", "--epochs", "1",
             "--batch-size", "8", "--no-augment", "--channels", "1"]  # fmt: skip
    run(["train", "--data", spec, *train, "--out", str(root / "run")], root)
    run(["compress", "--checkpoint", str(root / "run"), "--recipe", "int8-smallest", "--out",
         str(root / "int8"), "--no-speed"], root)  # fmt: skip
    good = root / "run"
    cases: list[tuple[str, list[str], Path | None]] = []

    def add(what, argv, guard=None):
        cases.append((what, argv, guard))

    # --- recipes
    def recipe(name, text):
        p = root / name
        p.write_text(text)
        return str(p)

    comp = ["compress", "--checkpoint", str(good), "--out", str(root / "c")]
    add(
        "recipe: unknown key",
        [*comp, "--recipe", recipe("r1.yaml", "name: r\nsteps:\n  - prune: {sparsty: 0.5}\n")],
    )
    add(
        "recipe: unknown step",
        [*comp, "--recipe", recipe("r2.yaml", "name: r\nsteps:\n  - distil: {}\n")],
    )
    add(
        "recipe: sparsity 1.2",
        [*comp, "--recipe", recipe("r3.yaml", "name: r\nsteps:\n  - prune: {sparsity: 1.2}\n")],
    )
    add(
        "recipe: pattern 5:4",
        [*comp, "--recipe", recipe("r4.yaml", "name: r\nsteps:\n  - prune: {pattern: '5:4'}\n")],
    )
    add(
        "recipe: rank 0",
        [*comp, "--recipe", recipe("r5.yaml", "name: r\nsteps:\n  - lowrank: {rank: 0}\n")],
    )
    add(
        "recipe: layer pattern matching nothing",
        [
            *comp,
            "--recipe",
            recipe("r6.yaml", "name: r\nsteps:\n  - quantize: {layers: 'blocks.*.fc9'}\n"),
        ],
    )
    add(
        "recipe: bad regex",
        [*comp, "--recipe", recipe("r7.yaml", "name: r\nsteps:\n  - quantize: {layers: 're:('}\n")],
    )
    add("recipe: not YAML", [*comp, "--recipe", recipe("r8.yaml", "name: [r\nsteps: {\n")])
    add(
        "recipe: python object tag",
        [
            *comp,
            "--recipe",
            recipe("r9.yaml", "name: !!python/object/apply:os.system ['echo pwned']\nsteps: []\n"),
        ],
    )
    bomb = ["a: &a [x,x,x,x,x,x,x,x,x,x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]"
        for i in range(8)
    ]
    add(
        "recipe: 500-byte YAML alias bomb",
        [*comp, "--recipe", recipe("bomb.yaml", "\n".join(bomb) + "\n")],
    )
    add("recipe: missing file", [*comp, "--recipe", str(root / "nope.yaml")])
    add(
        "recipe: quantize before prune",
        [
            *comp,
            "--recipe",
            recipe("r10.yaml", "name: r\nsteps:\n  - quantize: {}\n  - prune: {pattern: '2:4'}\n"),
        ],
    )
    add(
        "recipe: teacher is not a run",
        [
            *comp,
            "--recipe",
            recipe("r11.yaml", "name: r\nsteps:\n  - finetune: {distill: {teacher: /etc}}\n"),
        ],
    )
    # --- outputs
    add(
        "compress --out equal to --checkpoint, --force",
        [
            "compress",
            "--checkpoint",
            str(good),
            "--recipe",
            "int8-smallest",
            "--out",
            str(good),
            "--force",
        ],
        good,
    )
    add(
        "compress --out inside the checkpoint",
        [
            "compress",
            "--checkpoint",
            str(good),
            "--recipe",
            "int8-smallest",
            "--out",
            str(good / "sub"),
        ],
        good,
    )
    photos = root / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 a photo")
    add(
        "--out: a folder of other things",
        ["compress", "--checkpoint", str(good), "--recipe", "int8-smallest", "--out", str(photos)],
        photos,
    )
    add(
        "--out: a finished run without --force",
        ["train", "--data", spec, *train, "--out", str(good)],
        good,
    )
    add(
        "train --force, then bad --data: old run intact",
        ["train", "--data", "imagefolder:/nonexistent", *train, "--out", str(good), "--force"],
        good,
    )
    (root / "afile").write_text("x")
    add(
        "export --out under a file",
        [
            "export",
            "--checkpoint",
            str(good),
            "--format",
            "onnx",
            "--out",
            str(root / "afile" / "m.onnx"),
        ],
    )
    os.mkfifo(root / "pipe.onnx")
    add(
        "export --out a FIFO",
        ["export", "--checkpoint", str(good), "--format", "onnx", "--out", str(root / "pipe.onnx")],
    )
    add(
        "export --out a directory",
        ["export", "--checkpoint", str(good), "--format", "onnx", "--out", str(root)],
    )
    add(
        "export --out over the run's own weights",
        [
            "export",
            "--checkpoint",
            str(good),
            "--format",
            "packed",
            "--out",
            str(good / "model.safetensors"),
        ],
        good,
    )
    add(
        "export --out /dev/null",
        ["export", "--checkpoint", str(good), "--format", "packed", "--out", "/dev/null"],
    )

    # --- runs as inputs
    def broken_run(name, edit):
        d = root / name
        shutil.copytree(good, d)
        edit(d)
        return str(d)

    add("evaluate: missing directory", ["evaluate", "--checkpoint", str(root / "nope")])
    add("evaluate: a file, not a run", ["evaluate", "--checkpoint", str(root / "afile")])
    add(
        "evaluate: incomplete run (no metrics.json)",
        ["evaluate", "--checkpoint", broken_run("inc", lambda d: (d / "metrics.json").unlink())],
    )
    add(
        "evaluate: corrupt config.json",
        [
            "evaluate",
            "--checkpoint",
            broken_run("cj", lambda d: (d / "config.json").write_text("{oops")),
        ],
    )
    add(
        "evaluate: truncated weights",
        [
            "evaluate",
            "--checkpoint",
            broken_run(
                "tw",
                lambda d: (d / "model.safetensors").write_bytes(
                    (d / "model.safetensors").read_bytes()[:500]
                ),
            ),
        ],
    )

    def huge(d):
        c = json.loads((d / "config.json").read_text())
        c["model"].update(embed_dim=16384, depth=256)
        (d / "config.json").write_text(json.dumps(c))

    add(
        "evaluate: config.json asks for a huge model",
        ["evaluate", "--checkpoint", broken_run("huge", huge)],
    )

    def absurd(d):
        c = json.loads((d / "config.json").read_text())
        c["model"].update(embed_dim=10**9)
        (d / "config.json").write_text(json.dumps(c))

    add(
        "evaluate: config.json with absurd sizes",
        ["evaluate", "--checkpoint", broken_run("absurd", absurd)],
    )

    def nan(d):
        from safetensors.torch import load_file, save_file

        s = load_file(d / "model.safetensors")
        s["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
        save_file(s, d / "model.safetensors")

    add("evaluate: NaN in the weights", ["evaluate", "--checkpoint", broken_run("nan", nan)])
    add(
        "compress: NaN in the weights, int8",
        [
            "compress",
            "--checkpoint",
            str(root / "nan"),
            "--recipe",
            "int8-smallest",
            "--out",
            str(root / "nanq"),
        ],
    )
    add(
        "compress: an already compressed run",
        [
            "compress",
            "--checkpoint",
            str(root / "int8"),
            "--recipe",
            "int8-smallest",
            "--out",
            str(root / "q2"),
        ],
    )

    def trunc_packed(d):
        p = d / "model.packed"
        p.write_bytes(p.read_bytes()[:1000])

    shutil.copytree(root / "int8", root / "int8-trunc")
    trunc_packed(root / "int8-trunc")
    add("evaluate: packed file truncated", ["evaluate", "--checkpoint", str(root / "int8-trunc")])

    def zbomb(d):
        import torch
        from safetensors.torch import save

        hdr = zlib.compress(b"[" + b"0," * (300 * 1024 * 1024 // 2) + b"0]", 9)
        data = save({"header": torch.frombuffer(bytearray(hdr), dtype=torch.uint8),
                     "data": torch.zeros(1, dtype=torch.uint8)},
                    metadata={"vitcompress.pack": "3"})  # fmt: skip
        (d / "model.packed").write_bytes(data)

    shutil.copytree(root / "int8", root / "int8-bomb")
    zbomb(root / "int8-bomb")
    add(
        "evaluate: packed file with a zlib-bomb header",
        ["evaluate", "--checkpoint", str(root / "int8-bomb")],
    )
    # --- data
    fm = root / "fm"
    fm.mkdir()
    imgs = gzip.compress(idx((60000, 28, 28)) + bytes(100))
    (fm / "train-images-idx3-ubyte.gz").write_bytes(imgs)
    for n in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (fm / (n + ".gz")).write_bytes(gzip.compress(idx((10,)) + bytes(10)))
    add(
        "fashion-mnist: truncated IDX",
        ["train", "--data", f"fashion-mnist:{fm}", *train[:2], "--out", str(root / "t1")],
    )
    fb = root / "fmbomb"
    fb.mkdir()
    bomb_gz = gzip.compress(idx((10, 28, 28)) + bytes(7840) + bytes(50_000_000), 9)
    (fb / "train-images-idx3-ubyte.gz").write_bytes(bomb_gz)
    for n in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (fb / (n + ".gz")).write_bytes(gzip.compress(idx((10,)) + bytes(10)))
    add(
        "fashion-mnist: gzip bomb (trailing 50 MB of zeros)",
        ["train", "--data", f"fashion-mnist:{fb}", *train[:2], "--out", str(root / "t2")],
    )
    cf = root / "cifar" / "cifar-10-batches-py"
    cf.mkdir(parents=True)

    class Alloc:
        def __reduce__(self):
            return (bytes, (2_000_000_000,))

    for n in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ):
        (cf / n).write_bytes(pickle.dumps({b"data": Alloc(), b"labels": [0]}, protocol=2))
    add(
        "cifar10: pickle calling bytes(2e9)",
        ["train", "--data", f"cifar10:{cf.parent}", *train[:2], "--out", str(root / "t3")],
    )

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    ce = root / "cifar-evil" / "cifar-10-batches-py"
    ce.mkdir(parents=True)
    for n in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ):
        (ce / n).write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    add(
        "cifar10: pickle that would run code",
        ["train", "--data", f"cifar10:{ce.parent}", *train[:2], "--out", str(root / "t4")],
    )
    fifo_data = root / "fifo-images"
    shutil.copytree(data, fifo_data)
    os.mkfifo(fifo_data / "dark" / "x.png")
    add(
        "imagefolder: a FIFO named x.png",
        ["train", "--data", f"imagefolder:{fifo_data}", *train, "--out", str(root / "t5")],
    )
    add(
        "imagefolder: missing folder",
        ["train", "--data", "imagefolder:/nonexistent", *train, "--out", str(root / "t6")],
    )
    add("data: unknown spec", ["train", "--data", "mnist", *train, "--out", str(root / "t7")])
    # --- settings
    add(
        "train --epochs 0",
        ["train", "--data", spec, *train, "--epochs", "0", "--out", str(root / "t8")],
    )
    add(
        "train --img-size 0",
        ["train", "--data", spec, *train[:2], "--img-size", "0", "--out", str(root / "t9")],
    )
    add(
        "train --lr -1", ["train", "--data", spec, *train, "--lr", "-1", "--out", str(root / "t10")]
    )
    add("train --model vit-huge", ["train", "--model", "vit-huge", "--out", str(root / "t11")])
    add(
        "train --resume with nothing to resume",
        ["train", "--data", spec, *train, "--resume", "--out", str(root / "t12")],
    )
    add(
        "evaluate on data with other classes",
        ["evaluate", "--checkpoint", str(good), "--data", "fashion-mnist"],
    )
    # --- studies and results
    study = root / "s.yaml"
    study.write_text(
        "models: {v: {preset: vit-giant}}\nrecipes: [{name: a, steps: [quantize: {}]}]\n"
    )
    add(
        "sweep: unknown preset in a study",
        ["sweep", "--study", str(study), "--out", str(root / "sw")],
    )
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "results.sqlite").write_bytes(os.urandom(4096))
    add("report: garbage results.sqlite", ["report", str(garbage)], garbage)
    add("report: no results", ["report", str(root / "photos")])
    # --- imports
    evil = root / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    add(
        "import: pickle that would run code",
        ["import", str(evil), "--model", "vit-nano", "--out", str(root / "i1")],
    )
    add("import: folder without config.json", ["import", str(photos), "--out", str(root / "i2")])
    cfgdir = root / "swin"
    cfgdir.mkdir()
    (cfgdir / "config.json").write_text(
        json.dumps({"architectures": ["SwinForImageClassification"], "model_type": "swin"})
    )
    add("import: unsupported architecture", ["import", str(cfgdir), "--out", str(root / "i3")])
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent / "BAD_INPUTS.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        baseline = run(["models", "--json"], root)[2]
        for what, argv, guard in build(root):
            before_all = snapshot(root)
            rc, line, peak = run(argv, root)
            after_all = snapshot(root)
            new = sorted(set(after_all) - set(before_all))
            changed = sorted(k for k in before_all if after_all.get(k) != before_all[k])
            kept = "yes" if guard is None or all(
                after_all.get(k) == v for k, v in before_all.items()
                if k.startswith(str(guard.relative_to(root)))
            ) else "NO"  # fmt: skip
            rows.append((what, rc, line, "nothing" if not new and not changed else
                         f"{len(new)} new, {len(changed)} changed", kept, peak))  # fmt: skip
            print(rows[-1], flush=True)
        pwned = (root / "pwned").exists()
    lines = [
        "# Bad and careless inputs",
        "",
        "Written by `benchmarks/bad_inputs.py`: each case is one `vitcompress` command in a fresh "
        f"process. Peak memory is the process's maximum resident set; a bare `vitcompress models` "
        f"process peaks at {baseline:.0f} MB here. Code execution attempted by a case: "
        f"{'YES' if pwned else 'none ran'}.",
        "",
        "| input | exit | what it says | written | input intact | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for what, rc, line, written, kept, peak in rows:
        msg = line.replace("|", "\\|")
        lines.append(f"| {what} | {rc} | {msg} | {written} | {kept} | {peak:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
