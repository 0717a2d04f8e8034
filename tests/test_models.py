import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.measure import flops_per_image, params_total
from vitcompress.models import PRESETS, build_model, create_model, model_config

STUDY = dict(img_size=224, patch_size=16, in_chans=3, num_classes=45)


@pytest.mark.parametrize(
    "name,millions",
    [
        ("vit-tiny", 5.5),
        ("vit-small", 21.7),
        ("vit-base", 85.8),
        ("deit-tiny", 5.5),
        ("deit-small", 21.7),
        ("deit-base", 85.8),
    ],
)
def test_study_parameter_counts_within_one_percent(name, millions):
    with torch.device("meta"):
        model = create_model(name, **STUDY)
    n = params_total(model)
    assert abs(n / 1e6 - millions) / millions < 0.01, n


def test_timm_layout_names():
    model = create_model("deit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=3)
    names = dict(model.named_parameters())
    for key in [
        "cls_token",
        "dist_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "norm.weight",
        "head.weight",
        "head_dist.weight",
    ]:
        assert key in names, key
    # one position per patch plus the class and distillation tokens
    assert names["pos_embed"].shape == (1, 16 + 2, 64)


def test_vit_shapes_and_tokens(tiny_vit_cfg):
    model = build_model(tiny_vit_cfg)
    x = torch.randn(3, 1, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 16, 64)  # class token + 4x4 patches
    assert model(x).shape == (3, 4)


def test_deit_returns_both_heads_in_training_and_their_mean_in_eval():
    torch.manual_seed(0)
    model = create_model("deit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=5)
    x = torch.randn(2, 1, 16, 16)
    model.train()
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (2, 5)
    assert not torch.allclose(cls_logits, dist_logits)
    model.eval()
    feats = model.forward_features(x)
    expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(model(x), expected)


def test_unfused_attention_equals_fused(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg).eval()
    x = torch.randn(2, 1, 16, 16)
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_resnet_presets_shapes():
    for name, small in [("resnet-micro", 28), ("resnet18", 64)]:
        model = create_model(name, img_size=small, in_chans=1, num_classes=7).eval()
        assert model(torch.randn(2, 1, small, small)).shape == (2, 7)
    with torch.device("meta"):
        r50 = create_model("resnet50", img_size=224, in_chans=3, num_classes=1000)
    assert params_total(r50) == 25_557_032  # torchvision's resnet50


def test_flops_of_vit_tiny_match_timm():
    with torch.device("meta"):
        model = create_model("vit-tiny", img_size=224, patch_size=16, in_chans=3, num_classes=1000)
    gmacs = flops_per_image(model, (3, 224, 224)) / 2e9
    assert abs(gmacs - 1.26) < 0.02  # timm lists vit_tiny_patch16_224 at 1.26 GMACs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=30, patch_size=4), "multiple of patch_size"),
        (dict(num_classes=0), "num_classes"),
        (dict(channels=1), r"unknown ViT setting\(s\) \['channels'\]"),
    ],
)
def test_bad_model_configs(kwargs, match):
    with pytest.raises(VitcompressError, match=match):
        model_config("vit-nano", **kwargs)


def test_unknown_resnet_setting():
    with pytest.raises(VitcompressError, match=r"unknown ResNet setting\(s\) \['depth'\]"):
        model_config("resnet-micro", depth=4)


def test_unknown_preset():
    with pytest.raises(VitcompressError, match="unknown model"):
        model_config("vit-gigantic")
    assert "vit-micro" in PRESETS and "resnet50" in PRESETS
