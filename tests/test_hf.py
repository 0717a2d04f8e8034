"""Hugging Face import: our model against transformers' own forward pass, and every refusal.

transformers is the reference implementation: each case builds a random-weight model with it,
``save_pretrained``s it to a tmp folder, imports the folder and compares logits (max |a - b|
over max |b|). transformers 5 no longer writes ``pytorch_model.bin`` (``safe_serialization``
is gone), so the pickle cases re-save what it wrote with ``torch.save``.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.models.hf import load_hf

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             image_size=16, patch_size=4, num_channels=3, num_labels=5)  # fmt: skip
REL_TOL = 1e-4

CASES = {
    "vit": ("ViT", {}),
    "vit-no-qkv-bias-gray": ("ViT", dict(qkv_bias=False, num_channels=1)),
    "vit-gelu-new": ("ViT", dict(hidden_act="gelu_new")),
    "vit-gelu-pytorch-tanh": ("ViT", dict(hidden_act="gelu_pytorch_tanh")),
    "vit-quick-gelu": ("ViT", dict(hidden_act="quick_gelu")),
    "vit-eps-0.1": ("ViT", dict(layer_norm_eps=0.1)),
    "vit-img32-patch8": ("ViT", dict(image_size=32, patch_size=8)),
    "vit-mlp-109-of-44": ("ViT", dict(hidden_size=44, intermediate_size=109)),
    "deit-with-teacher": ("DeiTWithTeacher", {}),
    "deit-without-teacher": ("DeiT", dict(image_size=24)),
}


def make_hf(kind: str, seed: int = 0, **overrides):
    """A transformers classifier with every parameter random (biases, norms and tokens too, so
    that a swapped or dropped tensor shows in the logits)."""
    cfg_cls = transformers.ViTConfig if kind == "ViT" else transformers.DeiTConfig
    model_cls = {
        "ViT": transformers.ViTForImageClassification,
        "DeiT": transformers.DeiTForImageClassification,
        "DeiTWithTeacher": transformers.DeiTForImageClassificationWithTeacher,
    }[kind]
    cfg = cfg_cls(**{**SMALL, **overrides})
    cfg.id2label = {i: f"class-{i}" for i in range(cfg.num_labels)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(
                1 + 0.2 * noise if "layernorm" in name and name.endswith("weight") else 0.2 * noise
            )
    return model


def rel_diff(ours: torch.nn.Module, hf: torch.nn.Module, seed: int = 1) -> float:
    cfg = hf.config
    x = torch.randn(4, cfg.num_channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    with torch.no_grad():
        a, b = ours(x), hf(pixel_values=x).logits
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = make_hf(kind, **overrides)
    hf.save_pretrained(tmp_path)
    imported = load_hf(tmp_path)
    assert rel_diff(imported.model, hf) <= REL_TOL
    assert imported.classes == [f"class-{i}" for i in range(5)]
    assert imported.source["layout"] == "hub" and imported.source["kind"] == "hf"
    # the config rebuilds the same model: what a run directory stores is enough to load it
    rebuilt = build_model(imported.model_config).eval()
    rebuilt.load_state_dict(imported.model.state_dict())
    assert rel_diff(rebuilt, hf) <= REL_TOL


def test_what_the_config_turns_into(tmp_path):
    make_hf("ViT", hidden_size=44, intermediate_size=109, layer_norm_eps=0.1,
            hidden_act="gelu_new", qkv_bias=False).save_pretrained(tmp_path)  # fmt: skip
    cfg = load_hf(tmp_path).model_config
    assert cfg["layer_norm_eps"] == 0.1 and cfg["act"] == "gelu_tanh" and not cfg["qkv_bias"]
    assert cfg["mlp_hidden"] == 109 and cfg["embed_dim"] == 44 and cfg["preset"] is None
    make_hf("DeiT").save_pretrained(tmp_path / "deit")
    cfg = load_hf(tmp_path / "deit").model_config
    assert cfg["distilled"] and not cfg["dist_head"] and cfg["mlp_hidden"] is None


def test_transformers5_layout(tmp_path):
    for kind in ("ViT", "DeiTWithTeacher"):
        hf = make_hf(kind)
        hf.save_pretrained(tmp_path / kind, save_original_format=False)
        keys = load_file(tmp_path / kind / "model.safetensors")
        assert any(".layers.0.attention.q_proj.weight" in k for k in keys)  # really the new names
        imported = load_hf(tmp_path / kind)
        assert imported.source["layout"] == "transformers5"
        assert rel_diff(imported.model, hf) <= REL_TOL


def test_pytorch_model_bin(tmp_path):
    hf = make_hf("DeiTWithTeacher", num_channels=1)
    hf.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    os.remove(tmp_path / "model.safetensors")
    imported = load_hf(tmp_path)
    assert imported.source["files"] == ["pytorch_model.bin"]
    assert rel_diff(imported.model, hf) <= REL_TOL


def test_sharded_safetensors_and_bin(tmp_path):
    hf = make_hf("ViT")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    imported = load_hf(tmp_path)
    assert imported.source["files"] == ["model.safetensors.index.json", *shards]
    assert rel_diff(imported.model, hf) <= REL_TOL
    # the same shards as pickles, with their index
    bins = {s: s.replace(".safetensors", ".bin") for s in shards}
    for s, b in bins.items():
        torch.save(load_file(tmp_path / s), tmp_path / b)
        os.remove(tmp_path / s)
    os.remove(tmp_path / "model.safetensors.index.json")
    index["weight_map"] = {k: bins[v] for k, v in index["weight_map"].items()}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert rel_diff(load_hf(tmp_path).model, hf) <= REL_TOL


def test_pooler_and_mask_token_are_dropped(tmp_path):
    hf = make_hf("ViT")
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["vit.pooler.dense.weight"] = torch.randn(32, 32)
    state["vit.pooler.dense.bias"] = torch.randn(32)
    state["vit.embeddings.mask_token"] = torch.randn(1, 1, 32)
    save_file(state, tmp_path / "model.safetensors")
    imported = load_hf(tmp_path)
    assert imported.source["dropped"] == [
        "vit.embeddings.mask_token", "vit.pooler.dense.bias", "vit.pooler.dense.weight",
    ]  # fmt: skip
    assert rel_diff(imported.model, hf) <= REL_TOL


def test_preprocessor_config(tmp_path):
    make_hf("ViT").save_pretrained(tmp_path)
    assert load_hf(tmp_path).preprocess == {
        "source": "default", "mean": [0.5] * 3, "std": [0.5] * 3, "img_size": 16,
        "interpolation": "bilinear", "crop_pct": 1.0,
    }  # fmt: skip
    proc = transformers.ViTImageProcessor(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        size={"height": 20, "width": 20}, resample=3,
    )  # fmt: skip
    proc.save_pretrained(tmp_path)
    p = load_hf(tmp_path).preprocess
    assert p["source"] == "preprocessor_config.json" and p["interpolation"] == "bicubic"
    assert p["img_size"] == 20 and p["crop_pct"] == 1.0
    assert p["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # DeiT's processor: resize 256, centre crop 224, and a rescale factor that is not 1/255
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 256, "width": 256}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 127.5, "do_normalize": True,
        "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0],
    }))  # fmt: skip
    p = load_hf(tmp_path).preprocess
    assert p["img_size"] == 224 and p["crop_pct"] == pytest.approx(224 / 256)
    # x255 / 127.5 - 1 == (x01 - 0.5) / 0.5
    assert p["mean"] == pytest.approx([0.5] * 3) and p["std"] == pytest.approx([0.5] * 3)


# ---- refusals: each a one-line VitcompressError ------------------------------------------


def refused(path, match: str) -> str:
    with pytest.raises(VitcompressError, match=match) as info:
        load_hf(path)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def saved(tmp_path):
    make_hf("ViT").save_pretrained(tmp_path)
    return tmp_path


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(architectures=["BertForMaskedLM"], model_type="bert"), r"'BertForMaskedLM'\] is not"),
        (dict(architectures=["SwinForImageClassification"]), "SwinForImageClassification"),
        (dict(architectures=["ViTForMaskedImageModeling"]), "ViTForMaskedImageModeling"),
        (dict(model_type="vit_msn"), "model_type 'vit_msn'"),
        (dict(image_size=[16, 32]), r"image_size \[16, 32\] is not square"),
        (dict(patch_size=[4, 8]), r"patch_size \[4, 8\] is not square"),
        (dict(hidden_act="xielu"), "hidden_act 'xielu' is not supported"),
        (dict(head_dim=16), "head_dim 16 x num_attention_heads 4 must equal hidden_size 32"),
        (dict(image_size=18), "img_size 18 is not a multiple of patch_size 4"),
        (dict(num_attention_heads=3), "hidden_size 32 is not divisible by num_attention_heads 3"),
        (dict(num_channels="3"), "num_channels must be an integer >= 1, got '3'"),
        (dict(layer_norm_eps="1e-12"), "layer_norm_eps must be a number"),
    ],
)
def test_config_refusals(saved, changes, match):
    edit_config(saved, **changes)
    refused(saved, match)


def test_missing_weight(saved):
    state = load_file(saved / "model.safetensors")
    del state["vit.encoder.layer.1.attention.attention.key.bias"]
    save_file(state, saved / "model.safetensors")
    refused(saved, r"weight vit\.encoder\.layer\.1\.attention\.attention\.key\.bias is missing")


def test_shape_mismatch(saved):
    edit_config(saved, intermediate_size=48)
    refused(saved, r"vit\.encoder\.layer\.0\.intermediate\.dense\.weight has shape \[64, 32\], "
                   r"config\.json implies \[48, 32\]")  # fmt: skip


def test_extra_weight(saved):
    edit_config(saved, num_hidden_layers=1)
    refused(saved, r"unexpected weight vit\.encoder\.layer\.1\.")


def test_malicious_pickle_is_refused_and_not_run(saved, tmp_path_factory):
    marker = tmp_path_factory.mktemp("victim") / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    os.remove(saved / "model.safetensors")
    torch.save({"vit.embeddings.cls_token": Payload()}, saved / "pytorch_model.bin")
    refused(saved, r"refused to unpickle posix\.system; only tensors are loaded")
    assert not marker.exists()


def test_missing_folder_config_and_corrupt_files(tmp_path, saved):
    refused(tmp_path / "nope", "is not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"config\.json not found")
    (saved / "config.json").write_text('{"architectures": ["ViTForImageClassification"')
    refused(saved, r"config\.json is not valid JSON")
    (saved / "config.json").write_text("[1, 2]")
    refused(saved, "must hold a JSON object")


def test_corrupt_or_absent_weights(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 64)
    refused(saved, "is not a readable safetensors file")
    os.remove(saved / "model.safetensors")
    refused(saved, "has no weights")
