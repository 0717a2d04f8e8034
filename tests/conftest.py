import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_vit_cfg() -> dict:
    """A ViT small enough that a forward pass costs microseconds."""
    from vitcompress.models import model_config

    return model_config("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4)
