import json

import pytest
import torch

from vitcompress.bench import (
    COMPRESSED_VARIANTS,
    DEFAULT_VARIANTS,
    bench,
    bench_cli,
    format_table,
    is_compressed,
)
from vitcompress.errors import VitcompressError
from vitcompress.models import build_model, model_config
from vitcompress.runs import save_run
from vitcompress.steps.quantize import QuantizeConfig, quantize_

# Timings are not checked (shared CPUs): only that every variant runs and is reported.
FAST = dict(rounds_b1=2, rounds_b32=1, batch=4, warmup=1, threads=1, pause=0.0)


def test_bench_preset_reports_every_variant(tmp_path):
    rows = bench(model="vit-nano", img_size=16, work_dir=tmp_path, **FAST)
    assert [r["variant"] for r in rows] == list(DEFAULT_VARIANTS)
    for r in rows:
        assert r["latency_ms_b1"] > 0 and r["latency_p90_ms_b1"] >= r["latency_ms_b1"]
        assert r["throughput_b4"] > 0 and r["bytes_stored"] > 0
        assert r["speedup_b1"] > 0 and r["speedup_b4"] > 0 and r["threads"] == 1
    by = {r["variant"]: r for r in rows}
    assert by["torch-fp32"]["speedup_b1"] == 1.0
    # int8 artifacts are smaller than fp32 ones (here the 1000-class fp32 head weighs most)
    assert by["ort-int8-qdq"]["bytes_stored"] < 0.6 * by["ort-fp32"]["bytes_stored"]
    assert by["torch-sparse-csr-0.96875"]["bytes_stored"] < 0.5 * by["torch-fp32"]["bytes_stored"]
    assert "sparse" in by["torch-sparse-csr-0.9375"]["notes"]
    assert torch.get_num_threads() == 2  # restored
    table = format_table(rows)
    assert all(v in table for v in DEFAULT_VARIANTS) and "b4 img/s" in table
    assert (tmp_path / "int8-qdq.onnx").is_file()
    # fused attention: the same model, one MultiHeadAttention node per block
    from vitcompress.ort import onnx_ops

    assert by["ort-int8-qdq-mha"]["format"] == "int8 QDQ (ours), fused attention"
    blocks = model_config("vit-nano")["depth"]
    assert onnx_ops(tmp_path / "int8-qdq-mha.onnx")["MultiHeadAttention"] == blocks
    assert "MultiHeadAttention" not in onnx_ops(tmp_path / "int8-qdq.onnx")
    # shrink: narrower dense layers, a smaller file
    assert by["ort-shrink-fp32"]["format"] == "fp32, 50% of heads and MLP neurons removed"
    assert by["ort-shrink-fp32"]["bytes_stored"] < by["ort-fp32"]["bytes_stored"]


def test_bench_compressed_checkpoint_and_cli(tiny_vit_cfg, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    quantize_(model, QuantizeConfig(), [torch.randn(4, 1, 16, 16)])
    assert is_compressed(model)
    save_run(tmp_path / "run", model, {"model": tiny_vit_cfg}, {})  # stored packed, as compressed
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)
    rows = bench(checkpoint=tmp_path / "run", eval_loader=[(x[:4], y[:4]), (x[4:], y[4:])], **FAST)
    assert [r["variant"] for r in rows] == list(COMPRESSED_VARIANTS)
    assert rows[0]["top1"] == 100.0  # labelled by the model itself
    for r in rows:  # a top-1 in percent over the 6 images: a whole number of them right
        assert r["top1"] * 6 / 100 == pytest.approx(round(r["top1"] * 6 / 100)), r["variant"]
    by = {r["variant"]: r for r in rows}
    assert by["ort-model"]["format"] == "int8-qdq"
    assert by["ort-model-mha"]["format"] == "int8-qdq, fused attention"
    assert by["ort-model-mha"]["top1"] == by["ort-model"]["top1"]
    out = bench_cli(tmp_path / "run", None, 16, 1, json_out=True)
    printed = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in printed] == [r["variant"] for r in out]


def test_bench_compares_compressed_runs_of_the_same_model(tiny_vit_cfg, tmp_path, capsys):
    from vitcompress.cli import main
    from vitcompress.models import model_config

    torch.manual_seed(0)
    dense = build_model(tiny_vit_cfg).eval()
    save_run(tmp_path / "dense", dense, {"model": tiny_vit_cfg}, {})
    q = build_model(tiny_vit_cfg).eval()
    q.load_state_dict(dense.state_dict())
    quantize_(q, QuantizeConfig(rest="int8"), [torch.randn(4, 1, 16, 16)])
    save_run(tmp_path / "int8-run", q, {"model": tiny_vit_cfg}, {})
    x = torch.randn(6, 1, 16, 16)
    with torch.no_grad():
        y = dense(x).argmax(-1)
    rows = bench(checkpoint=tmp_path / "dense", variants=["torch-fp32"],
                 compare=[tmp_path / "int8-run"], eval_loader=[(x, y)], **FAST)  # fmt: skip
    assert [r["variant"] for r in rows] == ["torch-fp32", "ort-int8-run", "ort-int8-run-mha"]
    assert rows[2]["format"].endswith("run int8-run, fused attention")
    other = rows[1]
    assert other["format"].startswith("int8-qdq") and "int8-run" in other["format"]
    assert other["speedup_b1"] > 0
    assert other["top1"] * 6 / 100 == pytest.approx(round(other["top1"] * 6 / 100))
    assert other["notes"]["packed_bytes"] < rows[0]["bytes_stored"] / 3  # int8 rest: ~4x
    # the CLI takes --compare, prints one JSON document
    code = main(["bench", "--checkpoint", str(tmp_path / "dense"), "--compare",
                 str(tmp_path / "int8-run"), "--threads", "1", "--json"])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[-1]["variant"] == "ort-int8-run-mha"
    # --variants picks what to time; a name it does not know is one line
    code = main(
        [
            "bench",
            "--checkpoint",
            str(tmp_path / "dense"),
            "--variants",
            "torch-fp32, ort-int8-qdq-mha",
            "--threads",
            "1",
            "--passes",
            "1",
            "--json",
        ]
    )
    assert code == 0  # fmt: skip
    assert [r["variant"] for r in json.loads(capsys.readouterr().out)] == [
        "torch-fp32", "ort-int8-qdq-mha"]  # fmt: skip
    assert main(["bench", "--checkpoint", str(tmp_path / "dense"), "--variants", "ort-gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown bench variant 'ort-gpu'" in err
    # a run of another input size is refused before any timing
    cfg32 = model_config("vit-nano", img_size=32, patch_size=4, in_chans=1, num_classes=4)
    save_run(tmp_path / "other", build_model(cfg32), {"model": cfg32}, {})
    with pytest.raises(VitcompressError, match="takes 1x32x32 images"):
        bench(checkpoint=tmp_path / "dense", compare=[tmp_path / "other"], **FAST)
    with pytest.raises(VitcompressError, match="not a run directory|not found|no such"):
        bench(checkpoint=tmp_path / "dense", compare=[tmp_path / "missing"], **FAST)


def test_time_rounds_runs_each_variant_in_blocks():
    from vitcompress.bench import Variant, time_rounds

    calls = []
    vs = [Variant(n, "fake", "fake", lambda x, n=n: calls.append(n), 1) for n in "abc"]
    times = time_rounds(vs, None, rounds=7, warmup=2, passes=3, pause=0.0)
    assert {k: len(t) for k, t in times.items()} == {"a": 7, "b": 7, "c": 7}
    # 3 passes; in each, a block per variant: 2 warm-up calls, then its share of 3 + 2 + 2
    blocks = [(n, 2 + share) for share in (3, 2, 2) for n in "abc"]
    assert calls == [n for n, k in blocks for _ in range(k)]
    # never more passes than timed calls
    calls.clear()
    time_rounds(vs[:1], None, rounds=1, warmup=0, passes=3, pause=0.0)
    assert calls == ["a", "a"]  # at least one warm-up call, then the one timed call


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "checkpoint"),
        (dict(model="vit-nano", checkpoint="x"), "checkpoint"),
        (dict(model="vit-nano", img_size=16, threads=0), "threads"),
        (dict(model="vit-nano", img_size=16, variants=["tensorrt"]), "unknown bench variant"),
        (dict(model="vit-nano", img_size=16, variants=["torch-fp32-mha"]), "torch-fp32-mha"),
        (dict(model="vit-huge"), "unknown model"),
    ],
)
def test_bench_bad_input(kwargs, match):
    with pytest.raises(VitcompressError, match=match):
        bench(**kwargs)
