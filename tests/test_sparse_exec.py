import pytest
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.sparse_exec import (
    SparseLinear,
    predicted_speedup,
    sparsify_for_inference,
    summary,
)
from vitcompress.steps.prune import PruneConfig, prune_

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_linear(out_f: int, in_f: int, sparsity: float, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < sparsity] = 0
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_dense(bias):
    lin = _pruned_linear(48, 32, 0.9, bias)
    sp = SparseLinear.from_linear(lin, chunk=5)  # several tiles and a short last one
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        ref, got = lin(x), sp(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(sp.dense_weight(), lin.weight.detach())
    assert sp.nnz == int(torch.count_nonzero(lin.weight))


def test_predicted_speedup_crosses_one_near_82_percent():
    assert predicted_speedup(0.5) < 1 < predicted_speedup(0.1) < predicted_speedup(0.03)


def test_sparsify_model_predicted_and_measured(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    prune_(model, PruneConfig(sparsity=0.95, targets="blocks.*.mlp.*"))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
    report = sparsify_for_inference(model, min_sparsity=0.9)  # predicted: 95 % wins
    assert set(report) == {f"blocks.{i}.mlp.fc{j}" for i in range(4) for j in (1, 2)}
    assert all(r["converted"] and r["how"] == "predicted" for r in report.values())
    assert isinstance(model.blocks[0].mlp.fc1, SparseLinear)
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)  # dense layers are not candidates
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)

    model2 = build_model(tiny_vit_cfg).eval()
    prune_(model2, PruneConfig(sparsity=0.95, targets="blocks.0.mlp.fc1"))
    report2 = sparsify_for_inference(model2, example_input=x, iters=2)
    assert report2["blocks.0.mlp.fc1"]["how"] == "measured"  # converted or not: timing decides


def test_sparsify_rejects_bad_sparsity():
    with pytest.raises(VitcompressError, match="min_sparsity"):
        sparsify_for_inference(nn.Sequential(nn.Linear(2, 2)), min_sparsity=1.5)


def test_summary_line_with_and_without_converted_layers():
    r = {"a": {"speedup": 1.5, "converted": True}, "b": {"speedup": 0.9, "converted": False},
         "c": {"speedup": 2.5, "converted": True}}  # fmt: skip
    assert summary(r) == "2/3 candidate layers sparse (median speed-up 2.00x)"
    r = {"a": {"speedup": 1.05, "converted": False}, "b": {"speedup": 0.5, "converted": False}}
    assert summary(r) == "0/2 candidate layers sparse (none beat dense; best 1.05x)"
