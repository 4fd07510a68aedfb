import pytest
import torch

from mirrorprune.models import MODELS, create_model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_shapes(name, shape):
    if name in ("resnet18", "vgg16_bn") and shape[0] == 1:
        pytest.skip("covered by the CIFAR shape")
    model = create_model(name, 10, shape).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_parameter_counts_match_the_literature():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 0.26e6 < count(create_model("resnet20")) < 0.29e6
    assert 11.1e6 < count(create_model("resnet18")) < 11.3e6
    assert count(create_model("lenet_300_100", 10, (1, 28, 28))) == 266_610
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        create_model("resnet50")
