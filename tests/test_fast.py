import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune.fast import export_dense_fast
from mirrorprune.models import create_model


def _trained_bn(model: nn.Module, shape) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding has work."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.body(x)
        if y.mean() > 100:  # never true here, but a Python branch on a tensor
            y = -y
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "small_cnn"])
@pytest.mark.parametrize("batch", [1, 7])
def test_folded_channels_last_model_equals_the_eval_model(name, batch):
    torch.manual_seed(0)
    model = _trained_bn(create_model(name, 10, (3, 32, 32)), None)
    pruned = mp.prune(model, 0.9)
    fast, rep = export_dense_fast(pruned, report=True)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pruned.modules())
    assert rep.traced and rep.folded == n_bn and not rep.kept
    x = torch.randn(batch, 3, 32, 36)  # non-square too
    with torch.no_grad():
        ref, got = pruned(x), fast(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
               if c.weight.shape[1] > 1 and c.weight.shape[2] * c.weight.shape[3] > 1)
    # the zeros stay zeros: folding scales output channels
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, nn.Conv2d))
    assert sum(int((c.weight == 0).sum()) for c in convs) == zeros
    assert not fast.training and pruned.training is False


def test_untraceable_model_folds_sequential_pairs_and_says_so():
    model = _trained_bn(Branchy(), None)
    fast, rep = export_dense_fast(model, report=True)
    assert not rep.traced and "not traceable" in rep.how and rep.folded == 2 and not rep.kept
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert "folded 2 BatchNorm" in str(rep)


def test_batchnorm_not_after_a_conv_is_kept_and_reported():
    model = _trained_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Flatten()), None)
    fast, rep = export_dense_fast(model, report=True, channels_last=False)
    assert rep.kept == ["0"] and rep.folded == 0 and not rep.channels_last
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-6)


def test_wrapped_model_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    mp.PILoT(model)
    with pytest.raises(ValueError, match="needs a plain model"):
        export_dense_fast(model)
