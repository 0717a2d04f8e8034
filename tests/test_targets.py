import pytest
from torch import nn

from vitcompress.errors import VitcompressError
from vitcompress.models import create_model
from vitcompress.targets import name_matches, replace_module, select_modules


def _vit():
    return create_model("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4)


def test_globs_regexes_and_ignore_select_exactly():
    model = _vit()
    fc = select_modules(model, "blocks.*.mlp.fc1")
    assert [n for n, _ in fc] == [f"blocks.{i}.mlp.fc1" for i in range(4)]
    last_two = select_modules(model, r"re:blocks\.[23]\.attn\..*", ignore="*.proj")
    assert [n for n, _ in last_two] == ["blocks.2.attn.qkv", "blocks.3.attn.qkv"]
    every = select_modules(model, "*", ignore=["head", "blocks.*"])
    assert every == []  # the patch projection is a Conv2d, not a Linear
    convs = select_modules(model, "*", types=(nn.Conv2d,))
    assert [n for n, _ in convs] == ["patch_embed.proj"]
    assert name_matches("blocks.10.mlp.fc2", "blocks.1*") and not name_matches("head", "re:hea")


def test_a_pattern_that_matches_nothing_is_an_error_showing_real_names():
    with pytest.raises(VitcompressError, match=r"'encoder\.\*' matches no Linear module \(names"):
        select_modules(_vit(), ["blocks.*", "encoder.*"], what="quantize.targets")
    with pytest.raises(VitcompressError, match="bad regular expression"):
        select_modules(_vit(), "re:[")


def test_replace_module_keeps_train_or_eval_mode():
    model = _vit().eval()
    new = nn.Linear(64, 64)
    assert new.training
    replace_module(model, "blocks.0.attn.proj", new)
    assert model.blocks[0].attn.proj is new and not new.training
