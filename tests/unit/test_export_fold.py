"""Conv-BN folding: equivalence on the zoo's families, the per-layer report, and its failure modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from export.fold import (
    FOLD_TOLERANCES,
    Affine,
    FoldError,
    check_fold,
    fold_batchnorms,
    max_relative_error,
    verify_fold,
)
from training.models import ModelConfig, build_model, preset

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine params (fresh BNs fold to the identity),
    including a few tiny variances, the case where folding scales weights the most."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BN_TYPES):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.05)
                module.running_var[0] = 1e-3
                module.weight.copy_(torch.randn(n, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


V1_AND_VGG = {
    "vgg_bn": ModelConfig(arch="plain_cnn", channels=(8, 16), convs_per_stage=2, hidden=(16,), num_classes=5),
    "resnet_A": preset("resnet20", width=4, shortcut="A"),
    "resnet_B": preset("resnet20", width=4, shortcut="B"),
    "resnet_C": preset("resnet20", width=4, shortcut="C"),
    "resnet_bottleneck": ModelConfig(arch="resnet", depth=11, width=4, block="bottleneck"),
    "resnet18_imagenet": preset("resnet18", width=4, num_classes=7),
}
PREACT = {
    "preact_resnet20": preset("preact_resnet20", width=4, num_classes=3),
    "preact_bottleneck": ModelConfig(arch="preact_resnet", depth=11, width=4),
}


def _input_shape(config: ModelConfig) -> tuple[int, int, int]:
    return (config.in_channels, 32, 32)


@pytest.mark.parametrize("name", sorted(V1_AND_VGG))
def test_v1_and_vgg_fold_every_bn_and_match(name: str) -> None:
    config = V1_AND_VGG[name]
    model = randomise_bn(build_model(config))
    folded, report = fold_batchnorms(model)
    assert report.layers and not report.kept, [layer.reason for layer in report.kept]
    assert not any(isinstance(m, (*BN_TYPES, Affine)) for m in folded.modules())
    errors = verify_fold(model, folded, _input_shape(config))
    assert errors["float64"] <= 1e-5 and errors["float32"] <= 1e-4
    assert len(report.folded) == sum(isinstance(m, BN_TYPES) for m in model.modules())


@pytest.mark.parametrize("name", sorted(PREACT))
def test_preact_folds_what_it_can_and_reports_the_rest(name: str) -> None:
    config = PREACT[name]
    model = randomise_bn(build_model(config))
    folded, report = fold_batchnorms(model)
    assert report.folded, "BNs that directly follow a conv inside a block must fold"
    assert report.kept, "pre-activation BNs after an add cannot fold"
    for layer in report.kept:
        # after an add ("not a convolution") or after the stem conv that also feeds the shortcut
        assert layer.action == "affine"
        assert "not a convolution" in layer.reason or "output has 2 users" in layer.reason
    assert not any(isinstance(m, BN_TYPES) for m in folded.modules())
    assert sum(isinstance(m, Affine) for m in folded.modules()) == len(report.kept)
    errors = verify_fold(model, folded, _input_shape(config))
    assert errors["float64"] <= 1e-5 and errors["float32"] <= 1e-4
    assert report.to_dict()["kept_as_affine"] == len(report.kept)


class SharedConvOutput(nn.Module):
    """A conv whose output feeds a BN and a skip: folding would change the skip path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_two_users_is_kept_with_reason() -> None:
    model = randomise_bn(SharedConvOutput())
    folded, report = fold_batchnorms(model)
    assert [layer.action for layer in report.layers] == ["affine"]
    assert "2 users" in report.layers[0].reason
    assert check_fold(model, (3, 8, 8), dtype=torch.float64) < 1e-12
    assert check_fold(model, (3, 8, 8), folded=folded) < 1e-5


def test_fold_does_not_modify_the_input_model() -> None:
    model = randomise_bn(build_model(preset("resnet20", width=4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorms(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_fold_is_caught() -> None:
    model = randomise_bn(build_model(preset("resnet20", width=4)))
    folded, _ = fold_batchnorms(model)
    with torch.no_grad():
        folded.get_submodule("conv1").bias.add_(0.1)  # an off-by-a-shift fold
    assert check_fold(model, (3, 32, 32), folded=folded) > FOLD_TOLERANCES[torch.float32]
    with pytest.raises(FoldError, match="float32"):
        verify_fold(model, folded, (3, 32, 32))


def test_bn_without_running_stats_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorms(model)


def test_untraceable_model_names_itself() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="Branchy"):
        fold_batchnorms(Branchy())


def test_max_relative_error_is_row_scaled() -> None:
    ref = torch.tensor([[10.0, 0.0], [1.0, -2.0]])
    assert max_relative_error(ref, ref) == 0.0
    assert max_relative_error(ref, ref + torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == pytest.approx(0.1)
    assert max_relative_error(ref, ref + torch.tensor([[0.0, 0.0], [0.2, 0.0]])) == pytest.approx(0.1)
