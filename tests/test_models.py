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


# ---- fields that make foreign models' maths match (defaults = the model as it always was) ----

NANO = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3)


def test_config_json_without_new_fields_builds_the_same_model():
    old = {"arch": "vit", "preset": "vit-nano", "img_size": 16, "patch_size": 4, "in_chans": 1,
           "num_classes": 3, "embed_dim": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0,
           "distilled": False, "drop_path_rate": 0.0}  # fmt: skip
    torch.manual_seed(0)
    a = build_model(old)
    torch.manual_seed(0)
    b = create_model("vit-nano", **NANO)
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    cfg = a.cfg
    assert (cfg.qkv_bias, cfg.layer_norm_eps, cfg.act, cfg.mlp_hidden, cfg.dist_head) == (
        True, 1e-6, "gelu", None, True,
    )  # fmt: skip
    assert all(m.eps == 1e-6 for m in a.modules() if isinstance(m, torch.nn.LayerNorm))
    assert (
        isinstance(a.blocks[0].mlp.act, torch.nn.GELU) and a.blocks[0].mlp.act.approximate == "none"
    )


def test_qkv_without_bias():
    torch.manual_seed(0)
    model = create_model("vit-nano", **NANO, qkv_bias=False).eval()
    names = dict(model.named_parameters())
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.attn.qkv.bias" not in names
    assert "blocks.0.attn.proj.bias" in names  # only q, k and v lose their bias
    x = torch.randn(2, 1, 16, 16)
    fused = model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_layer_norm_eps_is_used_everywhere():
    model = create_model("vit-nano", **NANO, layer_norm_eps=1e-12)
    eps = [m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(eps) == 2 * 4 + 1 and set(eps) == {1e-12}


@pytest.mark.parametrize(
    "act,ref",
    [
        ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5))),
        (
            "gelu_tanh",
            lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
        ),
        ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
        ("relu", lambda x: x.clamp_min(0)),
        ("silu", lambda x: x * torch.sigmoid(x)),
    ],
)
def test_activations(act, ref):
    model = create_model("vit-nano", **NANO, act=act)
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    got = model.blocks[0].mlp.act.double()(x)
    torch.testing.assert_close(got, ref(x), atol=1e-12, rtol=1e-12)


def test_mlp_hidden_overrides_the_ratio():
    assert int(44 * (109 / 44)) != 109  # why the field exists: no float ratio gives 109 from 44
    model = create_model("vit-nano", **NANO, embed_dim=44, num_heads=4, mlp_hidden=109)
    assert model.blocks[0].mlp.fc1.out_features == 109 == model.cfg.mlp_width
    assert create_model("vit-nano", **NANO).blocks[0].mlp.fc1.out_features == 128


def test_deit_without_distillation_head():
    torch.manual_seed(0)
    model = create_model("deit-nano", **NANO, dist_head=False)
    assert model.head_dist is None and model.dist_token is not None
    assert model.pos_embed.shape == (1, 16 + 2, 64)  # the token keeps its position
    x = torch.randn(2, 1, 16, 16)
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    torch.testing.assert_close(model(x), model.head(model.forward_features(x)[:, 0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(act="gelu_new"), r"act 'gelu_new' is not supported; use one of"),
        (dict(layer_norm_eps=0), "layer_norm_eps must be a number in"),
        (dict(mlp_hidden=0), r"mlp_hidden must be an integer in \[1, 65,536\]"),
        (dict(qkv_bias="yes"), "qkv_bias must be true or false"),
        (dict(dist_head=False), r"dist_head=False only applies to a distilled model"),
    ],
)
def test_bad_new_fields(kwargs, match):
    with pytest.raises(VitcompressError, match=match):
        model_config("vit-nano", **kwargs)


def test_qkv_without_bias_shrinks_and_restores():
    from vitcompress.steps.shrink import ShrinkConfig, restore_shrink_, shrink_, shrink_structure

    torch.manual_seed(0)
    model = create_model("vit-nano", **NANO, qkv_bias=False).eval()
    shrink_(model, ShrinkConfig(heads=0.5, mlp=0.5))
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].attn.num_heads == 1
    fresh = create_model("vit-nano", **NANO, qkv_bias=False).eval()
    restore_shrink_(fresh, shrink_structure(model))
    fresh.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize(
    "field,value",
    [("depth", 10**6), ("embed_dim", 2**20), ("img_size", 0), ("num_classes", 10**9),
     ("depth", 2.5), ("mlp_ratio", 1e9)],
)  # fmt: skip
def test_a_config_cannot_ask_for_an_absurd_model(field, value):
    """config.json is read before the weights: absurd sizes are refused, not allocated."""
    cfg = {**model_config("vit-nano"), field: value}
    with pytest.raises(VitcompressError, match=field):
        build_model(cfg)
