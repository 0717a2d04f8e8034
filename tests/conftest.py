import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_vit_cfg() -> dict:
    """A ViT small enough that a forward pass costs microseconds."""
    from vitcompress.models import model_config

    return model_config("vit-nano", img_size=16, patch_size=4, in_chans=1, num_classes=4)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine, two threads on small tensors mostly wait for each other."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
