"""MAC counting: exact on hand-checkable layers, the published figures on the real networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models import build_model, count_macs, count_parameters, macs_by_layer, preset


def test_exact_macs_of_conv_and_linear() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x8 out: 8*8*8 outputs x 3*9 weights each
        nn.BatchNorm2d(8),  # not counted
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 4x4 out, 2 input channels per group
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    assert macs_by_layer(model, (3, 8, 8)) == {"0": 8 * 64 * 27, "2": 8 * 16 * 2 * 9, "4": 128 * 10}
    assert count_macs(model, (3, 8, 8)) == 13824 + 2304 + 1280


def test_resnet50_is_about_4_1_gmacs() -> None:
    with torch.device("meta"):
        model = build_model(preset("resnet50"))
    assert 4.0e9 <= count_macs(model, (3, 224, 224)) <= 4.2e9


@pytest.mark.parametrize(
    ("name", "size", "low", "high"),
    [("resnet18", 224, 1.80e9, 1.83e9), ("resnet20", 32, 40.0e6, 41.0e6), ("vgg16", 224, 15.4e9, 15.5e9)],
)
def test_published_mac_figures(name: str, size: int, low: float, high: float) -> None:
    with torch.device("meta"):
        model = build_model(preset(name))
    assert low <= count_macs(model, (3, size, size)) <= high


def test_counting_keeps_mode_and_real_weights_agree_with_meta() -> None:
    model = build_model(preset("resnet20", width=4))
    macs = count_macs(model, (3, 32, 32))
    assert model.training
    with torch.device("meta"):
        assert count_macs(build_model(preset("resnet20", width=4)), (3, 32, 32)) == macs
    # Doubling the side quadruples every convolution's work; the final linear layer stays.
    fc = 64 // 4 * 10
    assert count_macs(model, (3, 64, 64)) - fc == 4 * (macs - fc)


def test_bad_input_shape_is_a_clear_error() -> None:
    model = build_model(preset("resnet20", width=4))
    with pytest.raises(ValueError, match="without the batch dimension"):
        count_macs(model, (1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"input_shape=\(3, 0, 32\)"):
        count_macs(model, (3, 0, 32))


def test_trainable_only_parameter_count() -> None:
    model = build_model(preset("resnet20", width=4))
    total = count_parameters(model)
    model.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - (64 // 4 * 10 + 10)
    assert count_parameters(model) == total
