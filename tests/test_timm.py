"""timm import: our presets have timm's shapes, timm-layout files load exactly, unmodelled
timm features are refused.

timm cannot be installed next to our torch, so its layout is written down by hand from its
published architectures (``timm_shapes``); the state dicts under test are our own models',
whose names are timm's, in every file form timm users have (safetensors, wrapped pickles, DDP
prefixes, hub folders).
"""

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model, create_model
from vitcompress.models.timm import load_timm, parse_architecture
from vitcompress.models.vit import vit_config

# timm name -> (embed_dim, depth, num_heads, mlp hidden, distilled), from timm's model defs
TIMM = {
    "vit_tiny_patch16_224": (192, 12, 3, 768, False),
    "vit_small_patch16_224": (384, 12, 6, 1536, False),
    "vit_base_patch16_224": (768, 12, 12, 3072, False),
    "deit_tiny_distilled_patch16_224": (192, 12, 3, 768, True),
    "deit_small_distilled_patch16_224": (384, 12, 6, 1536, True),
    "deit_base_distilled_patch16_224": (768, 12, 12, 3072, True),
}
OURS = {name: name.split("_")[0] + "-" + name.split("_")[1] for name in TIMM}  # deit-tiny, ...
NANO = dict(img_size=16, patch_size=4, in_chans=1, num_classes=3)


def timm_shapes(embed, depth, mlp, distilled, patch=16, img=224, chans=3, classes=1000) -> dict:
    """timm's state dict of a ViT / DeiT: tensor name -> shape."""
    n = (img // patch) ** 2 + 1 + distilled
    t = {"cls_token": (1, 1, embed), "pos_embed": (1, n, embed),
         "patch_embed.proj.weight": (embed, chans, patch, patch),
         "patch_embed.proj.bias": (embed,)}  # fmt: skip
    if distilled:
        t["dist_token"] = (1, 1, embed)
    for i in range(depth):
        b = f"blocks.{i}."
        t |= {b + "norm1.weight": (embed,), b + "norm1.bias": (embed,),
              b + "attn.qkv.weight": (3 * embed, embed), b + "attn.qkv.bias": (3 * embed,),
              b + "attn.proj.weight": (embed, embed), b + "attn.proj.bias": (embed,),
              b + "norm2.weight": (embed,), b + "norm2.bias": (embed,),
              b + "mlp.fc1.weight": (mlp, embed), b + "mlp.fc1.bias": (mlp,),
              b + "mlp.fc2.weight": (embed, mlp), b + "mlp.fc2.bias": (embed,)}  # fmt: skip
    t |= {"norm.weight": (embed,), "norm.bias": (embed,), "head.weight": (classes, embed),
          "head.bias": (classes,)}  # fmt: skip
    if distilled:
        t |= {"head_dist.weight": (classes, embed), "head_dist.bias": (classes,)}
    return t


@pytest.mark.parametrize("name", list(TIMM))
def test_presets_have_timms_shapes(name):
    embed, depth, heads, mlp, distilled = TIMM[name]
    with torch.device("meta"):
        model = create_model(OURS[name], img_size=224, patch_size=16, in_chans=3, num_classes=1000)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == timm_shapes(embed, depth, mlp, distilled)
    assert model.blocks[0].attn.num_heads == heads
    arch = parse_architecture(name + ".fb_in1k")
    assert (arch["embed_dim"], arch["num_heads"], arch["distilled"]) == (embed, heads, distilled)


def model_and_input(preset="vit-nano", seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model(preset, **{**NANO, **kw}).eval()
    with torch.no_grad():  # biases and norms random too, so that a mix-up shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = model.cfg
    return model, torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)


def same_logits(a, b, x) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "fmt", ["safetensors", "pth-model", "bin-state_dict-ddp", "pt-model-state_dict"]
)
def test_file_forms(fmt, tmp_path):
    model, x = model_and_input("deit-nano")
    state = model.state_dict()  # our names are timm's (test_presets_have_timms_shapes)
    path = tmp_path / f"w.{fmt.partition('-')[0]}"
    if fmt == "safetensors":
        save_file(state, path)
    elif fmt == "pth-model":
        torch.save({"model": state, "epoch": 3}, path)
    elif fmt == "bin-state_dict-ddp":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    else:
        torch.save({"model": {"state_dict": state}}, path)
    imported = load_timm(path, "deit-nano")
    assert same_logits(imported.model, model, x)
    assert imported.model_config["preset"] == "deit-nano"
    assert imported.source["prefix"] == ("module." if "ddp" in fmt else None)


@pytest.mark.parametrize(
    "preset,kw,given",
    [
        ("vit-nano", dict(qkv_bias=False), dict(num_heads=2)),
        ("deit-nano", dict(dist_head=False), dict(num_heads=2)),
        ("vit-nano", dict(embed_dim=44, num_heads=4, mlp_hidden=109), dict(num_heads=4)),
        (
            "vit-nano",
            dict(layer_norm_eps=1e-5, act="quick_gelu"),
            dict(num_heads=2, layer_norm_eps=1e-5, act="quick_gelu"),
        ),  # fmt: skip
    ],
)
def test_sizes_inferred_from_shapes(preset, kw, given, tmp_path):
    model, x = model_and_input(preset, **kw)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    imported = load_timm(tmp_path / "w.safetensors", **given)
    assert same_logits(imported.model, model, x)
    # the same model; the ratio is restated when an explicit MLP width carries the maths
    assert replace(imported.model.cfg, mlp_ratio=model.cfg.mlp_ratio) == model.cfg
    rebuilt = build_model(imported.model_config).eval()
    rebuilt.load_state_dict(imported.model.state_dict())
    assert same_logits(rebuilt, model, x)


def test_full_size_deit_tiny_by_timm_name(tmp_path):
    torch.manual_seed(0)
    model = create_model("deit-tiny", img_size=224, patch_size=16, in_chans=3, num_classes=10)
    save_file(model.state_dict(), tmp_path / "deit.safetensors")
    imported = load_timm(tmp_path / "deit.safetensors", "deit_tiny_distilled_patch16_224")
    assert imported.model_config["preset"] == "deit-tiny"
    assert same_logits(imported.model, model.eval(), torch.randn(1, 3, 224, 224))


def hub_folder(folder, model, config: dict, weights="model.safetensors"):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file(model.state_dict(), folder / weights)
    else:
        torch.save(model.state_dict(), folder / weights)
    return folder


def test_hub_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        {"arch": "vit", **vit_config("vit-tiny", depth=1, img_size=32, num_classes=4).to_dict()}
    ).eval()
    pretrained = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875,
                  "crop_mode": "center", "mean": [0.5] * 3, "std": [0.5] * 3,
                  "num_classes": 4}  # fmt: skip
    config = {"architecture": "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "num_classes": 4,
              "num_features": 192, "global_pool": "token",
              "model_args": {"img_size": 32, "depth": 1},
              "label_names": ["cat", "dog", "owl", "eel"],
              "pretrained_cfg": pretrained}  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    for weights in ("model.safetensors", "pytorch_model.bin"):
        imported = load_timm(hub_folder(tmp_path / weights, model, config, weights))
        assert same_logits(imported.model, model, x)
        assert imported.model.blocks[0].attn.num_heads == 3  # from the name: tiny
        assert imported.classes == ["cat", "dog", "owl", "eel"]
        assert imported.preprocess == {"source": "config.json", "mean": [0.5] * 3,
                                       "std": [0.5] * 3, "img_size": 32, "interpolation": "bicubic",
                                       "crop_pct": 0.875, "crop_mode": "center"}  # fmt: skip
        assert imported.source["architecture"] == config["architecture"]


def test_default_preprocessing_follows_timms_family(tmp_path):
    vit, _ = model_and_input("vit-nano", in_chans=3)
    deit, _ = model_and_input("deit-nano", in_chans=3)
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    save_file(deit.state_dict(), tmp_path / "deit.safetensors")
    p = load_timm(tmp_path / "vit.safetensors", "vit-nano").preprocess
    assert p["source"] == "default" and p["mean"] == [0.5] * 3 and p["interpolation"] == "bicubic"
    p = load_timm(tmp_path / "deit.safetensors", "deit-nano").preprocess
    assert p["mean"] == [0.485, 0.456, 0.406] and p["std"] == [0.229, 0.224, 0.225]


def test_pre_logits_are_dropped_as_timm_does(tmp_path):
    model, x = model_and_input()
    state = model.state_dict() | {"pre_logits.fc.weight": torch.randn(64, 64)}
    save_file(state, tmp_path / "w.safetensors")
    imported = load_timm(tmp_path / "w.safetensors", "vit-nano")
    assert imported.source["dropped"] == ["pre_logits.fc.weight"]
    assert same_logits(imported.model, model, x)


# ---- refusals: each a one-line VitcompressError ------------------------------------------


def refused(match: str, *args, **kwargs) -> None:
    with pytest.raises(VitcompressError, match=match) as info:
        load_timm(*args, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s | {"fc_norm.weight": torch.ones(64)}, r"fc_norm\.weight belongs to global "),
        (lambda s: s | {"reg_token": torch.ones(1, 4, 64)}, "register tokens"),
        (lambda s: s | {"blocks.0.ls1.gamma": torch.ones(64)}, "layer scale"),
        (lambda s: s | {"norm_pre.weight": torch.ones(64)}, "pre-norm"),
        (lambda s: s | {"blocks.0.attn.q_norm.weight": torch.ones(32)}, "query/key norm"),
        (lambda s: {k: v for k, v in s.items() if k != "cls_token"}, "class_token=False"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("head")}, "no classification"),
        (lambda s: s | {"pos_embed": torch.zeros(1, 16, 64)}, "no_embed_class"),
        (lambda s: s | {"foo.weight": torch.ones(3)}, r"unexpected weight foo\.weight"),
        (
            lambda s: {k: v for k, v in s.items() if k != "blocks.1.mlp.fc2.bias"},
            r"weight blocks\.1\.mlp\.fc2\.bias is missing",
        ),  # fmt: skip
        (
            lambda s: s | {"blocks.3.attn.proj.weight": torch.ones(64, 63)},
            r"blocks\.3\.attn\.proj\.weight has shape \[64, 63\]",
        ),  # fmt: skip
    ],
)
def test_refused_state_dicts(edit, match, tmp_path):
    model, _ = model_and_input()
    save_file(edit(dict(model.state_dict())), tmp_path / "w.safetensors")
    refused(match, tmp_path / "w.safetensors", "vit-nano")


def test_refused_settings(tmp_path):
    model, _ = model_and_input()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    w = tmp_path / "w.safetensors"
    refused("num_heads cannot be read from the weights", w)
    refused(r"preset vit-tiny has embed_dim 192, the weights 64 \(cls_token\)", w, "vit-tiny")
    refused(r"preset deit-nano has distilled True, the weights False", w, "deit-nano")
    refused(
        r"the caller has img_size 32, the weights 16 \(pos_embed\)", w, num_heads=2, img_size=32
    )
    refused(r"unknown ViT setting\(s\) \['heads'\]", w, heads=2)
    refused("not a plain ViT/DeiT", w, "vit_base_patch16_clip_224")
    refused(r"unknown ViT preset 'vit-gigantic'", w, "vit-gigantic")
    refused("not found", tmp_path / "nope.safetensors", "vit-nano")


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(architecture="vit_base_patch16_siglip_224.webli"), "not a plain ViT/DeiT"),
        (dict(architecture="eva02_tiny_patch14_224"), "not a plain ViT/DeiT"),
        (dict(global_pool="avg"), "global_pool 'avg' is not modelled"),
        (dict(model_args={"class_token": False}), "model_args class_token=False is not modelled"),
        (dict(model_args={"act_layer": "quick_gelu"}), "act_layer='quick_gelu' is not modelled"),
        (dict(model_args={"frobnicate": 1}), "model_args 'frobnicate' is not understood"),
        (dict(model_args={"depth": 2}), r"model_args has depth 2, the weights 4"),
    ],
)
def test_refused_hub_configs(changes, match, tmp_path):
    model, _ = model_and_input(embed_dim=192, num_heads=3)
    config = {"architecture": "vit_tiny_patch4_16", "pretrained_cfg": {}} | changes
    refused(match, hub_folder(tmp_path / "m", model, config))


def test_malicious_and_non_tensor_pickles(tmp_path, tmp_path_factory):
    marker = tmp_path_factory.mktemp("victim") / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": {"cls_token": Payload()}}, tmp_path / "evil.pth")
    refused(r"refused to unpickle posix\.system", tmp_path / "evil.pth", "vit-nano")
    assert not marker.exists()
    torch.save({"model": {"cls_token": torch.zeros(1), "epoch": 3}}, tmp_path / "odd.pth")
    refused(r"entry 'epoch' is a int, not a tensor", tmp_path / "odd.pth", "vit-nano")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    refused("is not a readable weight file", tmp_path / "junk.pth", "vit-nano")
