"""Hardware cost: MACs, BOPs and stored bits, checked by hand on known layers."""

import torch
from torch import nn

from vitcompress.cli import main
from vitcompress.cost import cost_report, layer_costs, model_cost
from vitcompress.models import build_model
from vitcompress.pack import bytes_stored
from vitcompress.runs import save_run
from vitcompress.steps.prune import PruneConfig, prune_
from vitcompress.steps.quantize import QuantizeConfig, quantize_
from vitcompress.steps.shrink import ShrinkConfig, shrink_

SHAPE = (1, 16, 16)
N, D, HID = 17, 64, 128  # tokens (4x4 patches + class token), width, MLP width of vit-nano


def _by_name(model):
    return {r.name: r for r in layer_costs(model, SHAPE)}


def test_fp32_vit_macs_and_bops_by_hand(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias.normal_()  # zero biases would be stored in no bytes
    rows = _by_name(model)
    fc1 = rows["blocks.0.mlp.fc1"]
    assert fc1.macs == N * D * HID == fc1.macs_nonzero
    assert fc1.bops == N * D * HID * 32 * 32  # fp32 weights x fp32 activations
    assert fc1.weight_bits == 8 * 4 * (HID * D + HID)  # fp32 weight and bias as stored
    qk = rows["blocks.0.attn.qk_matmul"]
    assert qk.kind == "matmul" and qk.macs == 2 * N * N * (D // 2)  # 2 heads of width 32
    conv = rows["patch_embed.proj"]
    assert conv.macs == 16 * D * (1 * 4 * 4)  # 16 positions x 64 filters x 4x4x1


def test_int8_and_2of4_change_bops_and_nonzero_macs(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    prune_(model, PruneConfig(pattern="2:4", targets="blocks.*.mlp.*"))
    quantize_(model, QuantizeConfig(weights="int8", activations="int8"), [torch.randn(4, *SHAPE)])
    fc1 = _by_name(model)["blocks.0.mlp.fc1"]
    assert (fc1.weight_format, fc1.act_format) == ("int8", "int8")
    assert fc1.bops == N * D * HID * 8 * 8  # by hand: MACs x 8 x 8
    assert fc1.macs_nonzero <= fc1.macs // 2 + N * HID  # 2:4 zeros (int8 may zero a few more)
    total = model_cost(model, SHAPE, {"model": tiny_vit_cfg})
    assert total["weight_bits"] <= 8 * bytes_stored(model, {"model": tiny_vit_cfg})
    # the attention products, the patch projection and the head stay fp32 (32 x 32 bits)
    assert total["bops"] < model_cost(build_model(tiny_vit_cfg), SHAPE)["bops"] / 4


def test_shrunk_layers_really_cost_less(tiny_vit_cfg):
    dense = model_cost(build_model(tiny_vit_cfg), SHAPE)
    model = build_model(tiny_vit_cfg)
    shrink_(model, ShrinkConfig(mlp=0.5))
    shrunk = model_cost(model, SHAPE)
    mlp_macs = 4 * 2 * N * D * HID  # 4 blocks, fc1 + fc2
    assert dense["macs"] - shrunk["macs"] == mlp_macs // 2


def test_resnet_has_no_attention_and_every_conv_counts():
    from vitcompress.models import create_model

    model = create_model("resnet-micro", img_size=16, in_chans=1, num_classes=4)
    report = cost_report(model, SHAPE)
    kinds = {r["kind"] for r in report["layers"]}
    assert kinds == {"conv", "linear"}
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(r["kind"] == "conv" for r in report["layers"]) == n_convs


def test_cost_command(tiny_vit_cfg, tmp_path, capsys):
    import json

    save_run(tmp_path, build_model(tiny_vit_cfg), {"model": tiny_vit_cfg}, {})
    assert main(["cost", "--checkpoint", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"]["macs"] == sum(r["macs"] for r in out["layers"])
    assert main(["cost", "--checkpoint", str(tmp_path)]) == 0
    assert "peak activation memory" in capsys.readouterr().out
