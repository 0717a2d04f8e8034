"""Transfer surgery: each operation checked against what it promises (an identity, a smooth
field, the gray image seen in colour, heads and configs that rebuild the model)."""

import math

import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model, model_config
from vitcompress.models.transfer import (
    adapt_input_conv,
    adapt_model,
    resample_pos_embed,
    reset_head,
)


def make(preset="vit-nano", seed=0, **kw):
    cfg = model_config(
        preset, **{**dict(img_size=16, patch_size=4, in_chans=3, num_classes=5), **kw}
    )
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # random biases too, so that a lost bias shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, cfg


def smooth(rows: int, cols: int) -> torch.Tensor:
    """(1, rows*cols, 3): smooth functions of the position of each patch centre in [0, 1]^2."""
    y = (torch.arange(rows) + 0.5) / rows
    x = (torch.arange(cols) + 0.5) / cols
    Y, X = torch.meshgrid(y, x, indexing="ij")
    f = [torch.sin(math.pi * Y) * torch.cos(math.pi * X), Y * X, torch.cos(2 * X + Y)]
    return torch.stack(f, -1).reshape(1, rows * cols, 3)


@pytest.mark.parametrize("prefix", [1, 2])
def test_resample_to_the_same_grid_is_the_identity(prefix):
    pe = torch.randn(1, prefix + 49, 8)
    assert torch.equal(resample_pos_embed(pe, 7, prefix), pe)
    assert torch.equal(resample_pos_embed(pe, (7, 7), prefix, old_grid=(7, 7)), pe)


@pytest.mark.parametrize("old,new,tol", [(16, 24, 0.025), (24, 16, 0.01), (16, (12, 20), 0.025)])
def test_resampled_smooth_field_matches_the_field_on_the_new_grid(old, new, tol):
    prefix = torch.randn(1, 2, 3)
    out = resample_pos_embed(torch.cat([prefix, smooth(old, old)], 1), new, num_prefix_tokens=2)
    rows, cols = (new, new) if isinstance(new, int) else new
    assert torch.equal(out[:, :2], prefix)  # class and distillation positions kept as they are
    assert (out[:, 2:] - smooth(rows, cols)).abs().max() < tol  # the field spans [-1, 1]


def test_resample_refuses_a_wrong_grid():
    with pytest.raises(VitcompressError, match="not a 4x5 grid"):
        resample_pos_embed(torch.zeros(1, 1 + 16, 8), 6, old_grid=(4, 5))


def test_gray_input_gives_the_rgb_embedding_of_the_gray_image():
    model, cfg = make()
    gray, gcfg = adapt_model(model, cfg, in_chans=1)
    img = torch.randn(2, 1, 16, 16)
    ref = model.patch_embed(img.expand(-1, 3, -1, -1))  # R = G = B
    torch.testing.assert_close(gray.patch_embed(img), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gray(img), model(img.expand(-1, 3, -1, -1)), atol=1e-6, rtol=1e-6)
    assert gcfg["in_chans"] == 1 and gray.cfg.in_chans == 1
    assert model.patch_embed.proj.weight.shape[1] == 3  # the original is untouched


def test_more_channels_repeat_and_rescale():
    w = torch.randn(8, 3, 4, 4)
    w4 = adapt_input_conv(w, 4)
    assert w4.shape == (8, 4, 4, 4)
    torch.testing.assert_close(w4[:, :3], w * 3 / 4)
    torch.testing.assert_close(w4[:, 3], w[:, 0] * 3 / 4)
    model, cfg = make(in_chans=1)
    rgb, _ = adapt_model(model, cfg, in_chans=3)
    img = torch.randn(2, 1, 16, 16)  # a gray image as RGB gives the gray model's output
    torch.testing.assert_close(rgb(img.expand(-1, 3, -1, -1)), model(img), atol=1e-6, rtol=1e-6)
    assert torch.equal(adapt_input_conv(w, 3), w)


def test_new_heads():
    model, cfg = make()
    for init in ("zeros", "trunc_normal"):
        new = reset_head(model, 7, init)
        assert new.head.weight.shape == (7, 64) and new.head.bias.abs().sum() == 0
        assert new(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert reset_head(model, 7)(torch.randn(2, 3, 16, 16)).abs().max() == 0  # zeros: uniform
    assert model.head.weight.shape == (5, 64)  # the original is untouched
    with pytest.raises(VitcompressError, match="head init must be one of"):
        reset_head(model, 7, "xavier")


def test_a_deit_gets_two_new_heads():
    model, cfg = make("deit-nano")
    new = reset_head(model, 9, "trunc_normal")
    assert new.head.weight.shape == new.head_dist.weight.shape == (9, 64)
    assert not torch.equal(new.head.weight, new.head_dist.weight)
    model1, _ = make("deit-nano", dist_head=False)
    new1 = reset_head(model1, 9)
    assert new1.head.weight.shape == (9, 64) and new1.head_dist is None


def test_adapt_model_to_a_new_task():
    model, cfg = make("deit-nano")
    new, ncfg = adapt_model(model, cfg, img_size=24, in_chans=1, num_classes=10)
    assert ncfg == {**cfg, "img_size": 24, "in_chans": 1, "num_classes": 10}
    assert new.pos_embed.shape == (1, 2 + 36, 64)
    assert new.cfg.to_dict() == {k: v for k, v in ncfg.items() if k not in ("arch", "preset")}
    assert new(torch.randn(2, 1, 24, 24)).shape == (2, 10)
    # the config rebuilds the model: a run directory of it loads strictly
    rebuilt = build_model(ncfg).eval()
    rebuilt.load_state_dict(new.state_dict())
    x = torch.randn(2, 1, 24, 24)
    assert torch.equal(rebuilt(x), new(x))
    assert model.pos_embed.shape == (1, 2 + 16, 64) and model.cfg.img_size == 16  # untouched


def test_adapt_model_with_nothing_to_change_keeps_the_model():
    model, cfg = make()
    same, scfg = adapt_model(model, cfg, num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    assert scfg == cfg and torch.equal(same(x), model(x)) and same is not model


def test_adapt_model_refusals():
    model, cfg = make()
    with pytest.raises(VitcompressError, match="img_size 18 is not a multiple of patch_size 4"):
        adapt_model(model, cfg, img_size=18)
    with pytest.raises(VitcompressError, match="config has embed_dim 32, the model 64"):
        adapt_model(model, {**cfg, "embed_dim": 32}, img_size=24)
