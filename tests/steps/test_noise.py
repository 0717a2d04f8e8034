import pytest
import torch

from vitcompress.errors import VitcompressError
from vitcompress.models import build_model
from vitcompress.steps.noise import NoiseConfig, add_noise_
from vitcompress.steps.recipe import compress_, parse_recipe


def test_noise_perturbs_exactly_the_selected_weights_by_the_asked_amount(tiny_vit_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_vit_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_noise_(model, NoiseConfig(std=0.1, targets="blocks.*.mlp.fc1"))
    for k, v in model.state_dict().items():
        if k.endswith("mlp.fc1.weight"):
            delta = (v - before[k]).double()
            rel = delta.std() / before[k].double().std()
            assert 0.09 < rel < 0.11, k  # std * the weight's own std
        else:
            assert torch.equal(v, before[k]), k  # nothing else moves, biases included


def test_noise_is_a_recipe_step_like_any_other(tiny_vit_cfg):
    recipe = {"name": "probe", "steps": [{"noise": {"std": 0.05, "seed": 3}}]}
    a, b = build_model(tiny_vit_cfg), build_model(tiny_vit_cfg)
    b.load_state_dict(a.state_dict())
    compress_(a, recipe)
    compress_(b, recipe)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # seeded
    with pytest.raises(VitcompressError, match=r"step 1 \(noise\): noise.std must be a number"):
        parse_recipe({"name": "r", "steps": [{"noise": {"std": -1}}]})
    with pytest.raises(VitcompressError, match="unknown key 'sigma'"):
        parse_recipe({"name": "r", "steps": [{"noise": {"sigma": 0.1}}]})
