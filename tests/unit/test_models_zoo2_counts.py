"""Classic ImageNet families (issue 11): published parameter and MAC counts, torchvision names,
configuration errors. Big networks are built on the meta device (no memory, no init time)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from training.models import ModelConfig, ModelConfigError, build_model, count_macs, count_parameters, preset


def _meta_model(config: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(config)


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        # torchvision's published figures (1000 classes, 3 input channels).
        ("alexnet", {}, 61_100_840),
        ("vgg11", {}, 132_863_336),
        ("vgg11_bn", {}, 132_868_840),
        ("vgg13", {}, 133_047_848),
        ("vgg13_bn", {}, 133_053_736),
        ("vgg16", {}, 138_357_544),
        ("vgg16_bn", {}, 138_365_992),
        ("vgg19", {}, 143_667_240),
        ("vgg19_bn", {}, 143_678_248),
        ("googlenet", {}, 6_624_904),  # without the auxiliary heads, as torchvision counts
        ("googlenet", {"aux_heads": True}, 13_004_888),  # torchvision with aux_logits=True
        ("densenet121", {}, 7_978_856),
        ("densenet161", {}, 28_681_000),
        ("densenet169", {}, 14_149_480),
        ("densenet201", {}, 20_013_928),
        # ResNet-200 v1 (timm's resnet200 figure) and v2: derivation in docs/model_zoo.md.
        ("resnet200", {}, 64_673_832),
        ("preact_resnet200", {}, 64_666_152),
        # The MNIST-1D seed model: (1*3 + 1)*15 + 2*(15*3 + 1)*15 + (60 + 1)*10.
        ("mnist1d_cnn", {}, 2_050),
    ],
)
def test_published_parameter_counts(name: str, overrides: dict[str, Any], expected: int) -> None:
    assert count_parameters(_meta_model(preset(name, **overrides))) == expected


def test_preact_resnet200_is_the_v2_form_with_3_24_36_3_bottlenecks() -> None:
    model = _meta_model(preset("preact_resnet200"))
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 24, 36, 3]
    assert type(model.layer3[0]).__name__ == "PreActBottleneck"
    assert model.bn_final.num_features == 2048


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [  # torchvision's GFLOPS column (= GMACs) at 224x224.
        ("alexnet", 0.70e9, 0.72e9),
        ("googlenet", 1.49e9, 1.51e9),
        ("densenet121", 2.82e9, 2.84e9),
        ("densenet201", 4.28e9, 4.30e9),
    ],
)
def test_published_mac_figures(name: str, low: float, high: float) -> None:
    assert low <= count_macs(_meta_model(preset(name)), (3, 224, 224)) <= high


@pytest.mark.parametrize("name", ["alexnet", "vgg16_bn", "googlenet", "densenet121", "preact_resnet200"])
def test_full_size_224_forward_shape_on_meta(name: str) -> None:
    model = _meta_model(preset(name, in_channels=4, num_classes=17)).eval()
    with torch.no_grad():
        assert model(torch.empty(2, 4, 224, 224, device="meta")).shape == (2, 17)


def test_classes_and_channels_change_only_the_ends() -> None:
    base = count_parameters(_meta_model(preset("densenet121")))
    other = count_parameters(_meta_model(preset("densenet121", in_channels=1, num_classes=10)))
    assert base - other == 2 * 64 * 7 * 7 + 990 * (1024 + 1)


def test_torchvision_state_dict_names() -> None:
    keys = {
        "alexnet": {"features.0.weight", "features.10.bias", "classifier.1.weight", "classifier.6.bias"},
        "googlenet": {
            "conv1.conv.weight",
            "conv1.bn.running_var",
            "inception4e.branch4.1.conv.weight",
            "fc.bias",
        },
        "densenet121": {
            "features.conv0.weight",
            "features.denseblock1.denselayer1.norm1.weight",
            "features.denseblock4.denselayer16.conv2.weight",
            "features.transition3.conv.weight",
            "features.norm5.running_mean",
            "classifier.weight",
        },
    }
    for name, expected in keys.items():
        assert expected <= set(_meta_model(preset(name)).state_dict()), name
    aux = set(_meta_model(preset("googlenet", aux_heads=True)).state_dict())
    assert {"aux1.conv.conv.weight", "aux1.fc1.weight", "aux2.fc2.bias"} <= aux


def test_googlenet_follows_torchvision_not_the_paper() -> None:
    model = _meta_model(preset("googlenet"))
    block = model.inception3a
    assert block.branch3[1].conv.kernel_size == (3, 3)  # the "5x5" branch, as torchvision
    assert block.branch1.bn.eps == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"arch": "alexnet", "depth": 7}, "alexnet has depth 8, not depth=7"),
        ({"arch": "googlenet", "depth": 21}, "googlenet has depth 22"),
        ({"arch": "densenet"}, "densenet needs a depth of 121, 161, 169, 201, got depth=None"),
        ({"arch": "densenet", "depth": 100}, "got depth=100"),
        ({"arch": "densenet", "depth": 121, "growth_rate": 0}, "growth_rate=0"),
        ({"arch": "alexnet", "aux_heads": True}, "aux_heads=True does not apply to arch 'alexnet'"),
        ({"arch": "googlenet", "growth_rate": 12}, "growth_rate=12 does not apply to arch 'googlenet'"),
        ({"arch": "densenet", "depth": 121, "spatial_dims": 1}, "spatial_dims=1 does not apply"),
        ({"arch": "resnet", "depth": 20, "kernel_size": 5}, "kernel_size=5 does not apply to arch 'resnet'"),
        ({"arch": "plain_cnn", "spatial_dims": 3}, "spatial_dims=3 must be 1 (signals) or 2 (images)"),
        ({"arch": "plain_cnn", "padding": "full"}, "unknown padding 'full'"),
        ({"arch": "plain_cnn", "stage_pool": "avg"}, "unknown stage_pool 'avg'"),
        ({"arch": "plain_cnn", "kernel_size": 4}, "kernel_size=4 must be odd for padding 'same'"),
        ({"arch": "plain_cnn", "conv_stride": 0}, "conv_stride=0"),
        ({"arch": "plain_cnn", "dilation": (1, 2)}, "dilation=[1, 2] has 2 entries but the network has 6"),
        ({"arch": "plain_cnn", "dilation": 0}, "dilation=0"),
        ({"arch": "plain_cnn", "output_stride": 8}, "output_stride=8 does not apply to arch 'plain_cnn'"),
    ],
)
def test_bad_config_names_the_bad_value(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**fields)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        preset("alexnet", width=8, num_classes=5),
        preset("googlenet", aux_heads=True, width=16),
        preset("densenet169", growth_rate=8),
        preset("mnist1d_cnn"),
        preset("resnet50", output_stride=8, spatial_dims=1),
        ModelConfig(arch="plain_cnn", spatial_dims=1, dilation=[1, 2, 4, 1, 2, 4], padding="valid"),
    ],
    ids=lambda c: c.arch,
)
def test_new_fields_round_trip_through_json(config: ModelConfig) -> None:
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
