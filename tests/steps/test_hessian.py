"""The calibration machinery: each layer's Hessian is that of its inputs in the model as
compressed so far, block by block; any other model gets one pass."""

import copy

import pytest
import torch
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.steps.hessian import HessianSum, compress_sequentially_, hessians

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(n=3, shape=(4, 1, 16, 16)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=g), torch.zeros(shape[0])) for _ in range(n)]


def _reference_hessians(model, layers, calib):
    """What a layer sees in ``model`` as it is: one plain pass."""
    mods = {n: model.get_submodule(n) for n in layers}
    with torch.no_grad():
        return hessians(mods, lambda: [model(x) for x, _ in calib])


def _halve(model, names):
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).weight.mul_(0.5)


def test_hessian_sum_is_2xtx_over_all_tokens():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)]
    acc = HessianSum()
    for x in xs:
        acc.add(x.reshape(-1, 8))
    rows = torch.cat([x.reshape(-1, 8) for x in xs]).double()  # (25, 8)
    h = acc.hessian()
    assert h.dtype == torch.float64 and acc.count == 25
    assert torch.allclose(h, 2 * rows.T @ rows / 25, rtol=1e-12, atol=0)


def test_each_block_is_calibrated_on_the_blocks_before_it_as_compressed(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).train()  # left as it was found
    dense = copy.deepcopy(model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    calib = _calib()
    seen: dict[str, torch.Tensor] = {}

    def compress(name, module, h):
        seen[name] = h.clone()
        with torch.no_grad():
            module.weight.mul_(0.5)  # a "compression" that changes what later layers see

    compress_sequentially_(model, {n: model.get_submodule(n) for n in names}, calib, compress)
    assert model.training
    assert list(seen) == names  # blocks in order, the head last
    for k in range(tiny_vit_cfg["depth"]):
        ref_model = copy.deepcopy(dense)
        _halve(
            ref_model, [n for n in names if n.startswith(tuple(f"blocks.{j}." for j in range(k)))]
        )
        mine = [n for n in names if n.startswith(f"blocks.{k}.")]
        ref = _reference_hessians(ref_model, mine, calib)
        for n in mine:  # within a block: the block's input before the block is compressed
            assert torch.allclose(seen[n], ref[n], rtol=1e-9, atol=1e-12), n
    _halve(dense, [n for n in names if n != "head"])
    assert torch.allclose(seen["head"], _reference_hessians(dense, ["head"], calib)["head"])


class _EmbedBlocksHead(nn.Module):
    """A model with a Linear before its blocks (a token embedding)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)) for _ in range(2)]
        )
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_layers_before_the_blocks_come_first_and_the_blocks_see_them_compressed():
    torch.manual_seed(0)
    model = _EmbedBlocksHead()
    dense = copy.deepcopy(model)
    names = ["embed", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"]
    batches = [torch.randn(5, 4, 6) for _ in range(3)]
    seen = {}

    def compress(name, module, h):
        seen[name] = h
        with torch.no_grad():
            module.weight.mul_(0.5)

    layers = {n: model.get_submodule(n) for n in names}
    compress_sequentially_(model, layers, iter(batches), compress)  # a one-shot iterator will do
    assert list(seen) == names
    ref = copy.deepcopy(dense)
    _halve(ref, ["embed"])
    with torch.no_grad():
        h = hessians({"b": ref.blocks[0][0]}, lambda: [ref(x) for x in batches])["b"]
    assert torch.allclose(seen["blocks.0.0"], h, rtol=1e-9, atol=1e-12)
    _halve(ref, names[1:-1])
    with torch.no_grad():
        h = hessians({"head": ref.head}, lambda: [ref(x) for x in batches])["head"]
    assert torch.allclose(seen["head"], h, rtol=1e-9, atol=1e-12)


def test_a_model_without_blocks_gets_one_pass_over_the_dense_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    dense = copy.deepcopy(model)
    calib = [torch.randn(10, 6) for _ in range(2)]
    seen = {}

    def compress(name, module, h):
        seen[name] = h
        with torch.no_grad():
            module.weight.mul_(0.5)

    compress_sequentially_(model, {"0": model[0], "2": model[2]}, calib, compress)
    with torch.no_grad():
        ref = hessians({"0": dense[0], "2": dense[2]}, lambda: [dense(x) for x in calib])
    assert all(torch.allclose(seen[n], ref[n]) for n in ("0", "2"))


def test_max_batches_and_errors():
    model = _EmbedBlocksHead()
    calls = []

    def count(name, module, h):
        calls.append(name)

    batches = [torch.randn(2, 3, 6) for _ in range(5)]
    pulled = []

    def source():
        for b in batches:
            pulled.append(b)
            yield b

    compress_sequentially_(model, {"head": model.head}, source(), count, max_batches=2)
    assert len(pulled) == 2 and calls == ["head"]
    with pytest.raises(VitcompressError, match="calibration data yielded no batches"):
        compress_sequentially_(model, {"head": model.head}, [], count)
    with pytest.raises(VitcompressError, match="never reached layer 'unused'"):
        compress_sequentially_(model, {"unused": model.unused}, batches, count)
