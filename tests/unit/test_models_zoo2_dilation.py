"""Dilation: ResNet output stride (torchvision's replace_stride_with_dilation) and the plain
CNN's per-layer dilation; shapes, receptive fields and MAC counts that reflect them; 1-D MACs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.models import ModelConfig, ModelConfigError, build_model, count_macs, macs_by_layer, preset


def _stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[2:]))
        )
        for name in model.stage_names
    ]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("arch", ["resnet", "preact_resnet"])
@pytest.mark.parametrize(
    ("output_stride", "sides"),
    [(None, (56, 28, 14, 7)), (32, (56, 28, 14, 7)), (16, (56, 28, 14, 14)), (8, (56, 28, 28, 28))],
)
def test_output_stride_keeps_the_last_maps_large(
    arch: str, output_stride: int | None, sides: tuple[int, ...]
) -> None:
    config = ModelConfig(arch=arch, depth=50, style="imagenet", width=2, output_stride=output_stride)
    shapes = _stage_outputs(build_model(config), torch.randn(1, 3, 224, 224))
    assert [s[0] for s in shapes.values()] == list(sides)


def test_dilations_follow_torchvision() -> None:
    # torchvision resnet50(replace_stride_with_dilation=[False, True, True]): a dilated stage's
    # first block keeps the previous dilation; its stride and its shortcut's stride become 1.
    model = build_model(preset("resnet50", width=2, output_stride=8))
    assert model.layer2[0].conv2.stride == (2, 2)
    assert (model.layer3[0].conv2.stride, model.layer3[0].conv2.dilation) == ((1, 1), (1, 1))
    assert model.layer3[0].downsample[0].stride == (1, 1)
    assert [b.conv2.dilation for b in model.layer3[1:]] == [(2, 2)] * 5
    assert [b.conv2.dilation for b in model.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert all(b.conv2.padding == b.conv2.dilation for b in model.layer4)
    basic = build_model(preset("resnet18", width=2, output_stride=16))
    assert (basic.layer4[1].conv1.dilation, basic.layer4[1].conv2.dilation) == ((2, 2), (2, 2))


def test_cifar_and_one_d_output_strides() -> None:
    cifar = build_model(preset("resnet20", width=4, output_stride=1))  # natural stride 4
    assert list(_stage_outputs(cifar, torch.randn(1, 3, 16, 16)).values()) == [(16, 16)] * 3
    signal = build_model(preset("resnet18", width=4, spatial_dims=1, in_channels=1, output_stride=8))
    assert [s[0] for s in _stage_outputs(signal, torch.randn(1, 1, 1000)).values()] == [250, 125, 125, 125]


def test_dilated_macs_grow_with_the_map_area() -> None:
    """Each convolution's MACs scale exactly with its output area: x4 in layer3 (14² -> 28²),
    x16 in layer4 (7² -> 28²); layer4's first 1x1 reads 28² instead of 14² (x4); the rest equal."""
    with torch.device("meta"):
        plain = macs_by_layer(build_model(preset("resnet50")), (3, 224, 224))
        dilated = macs_by_layer(build_model(preset("resnet50", output_stride=8)), (3, 224, 224))
    assert plain.keys() == dilated.keys()
    for name, macs in plain.items():
        if name.startswith("layer3") and name != "layer3.0.conv1":
            ratio = 4
        elif name.startswith("layer4"):
            ratio = 4 if name == "layer4.0.conv1" else 16
        else:
            ratio = 1
        assert dilated[name] == ratio * macs, name
    assert 19.0e9 < sum(dilated.values()) < 19.2e9  # vs 4.09 G undilated


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"arch": "resnet", "depth": 50, "style": "imagenet", "output_stride": 12}, "output_stride=12"),
        ({"arch": "resnet", "depth": 50, "style": "imagenet", "output_stride": 2}, "32, 16, 8, 4"),
        ({"arch": "preact_resnet", "depth": 20, "output_stride": 8}, "expected one of 4, 2, 1"),
        ({"arch": "resnet", "depth": 20, "output_stride": 0}, "output_stride=0"),
    ],
)
def test_bad_output_stride(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**fields)  # type: ignore[arg-type]
    assert needle in str(info.value)


def _receptive_field(model: nn.Module, length: int) -> int:
    """Span of the input positions that reach the centre output position of `model.features`.

    Positive weights and inputs keep every ReLU open, so the gradient's support is exactly
    the receptive field (the span, not the count: equal dilations leave gaps, "gridding")."""
    for p in model.parameters():
        nn.init.constant_(p, 0.05)
    x = torch.ones(1, 1, length, requires_grad=True)
    out = model.features(x)
    out[0, 0, out.shape[-1] // 2].backward()
    reached = torch.nonzero(x.grad[0, 0]).flatten()
    return int(reached.max() - reached.min() + 1)


@pytest.mark.parametrize(
    ("dilation", "field"),
    [(1, 1 + 2 * 3), (2, 1 + 2 * 2 * 3), ((1, 2, 4), 1 + 2 * (1 + 2 + 4)), ((4, 1, 1), 1 + 2 * 6)],
)
def test_plain_cnn_per_layer_dilation_sets_the_receptive_field(
    dilation: int | tuple[int, ...], field: int
) -> None:
    config = ModelConfig(
        arch="plain_cnn",
        spatial_dims=1,
        in_channels=1,
        channels=(2,),
        convs_per_stage=3,
        stage_pool="none",
        batch_norm=False,
        dilation=dilation,
    )
    model = build_model(config)
    convs = [m for m in model.features if isinstance(m, nn.Conv1d)]
    expected = dilation if isinstance(dilation, tuple) else (dilation,) * 3
    assert [c.dilation[0] for c in convs] == list(expected)
    assert model.features(torch.zeros(1, 1, 64)).shape == (1, 2, 64)  # "same" padding
    assert _receptive_field(model, 64) == field


def test_valid_padding_dilation_shrinks_maps_and_macs() -> None:
    def model(dilation: int) -> nn.Module:
        return build_model(
            ModelConfig(
                arch="plain_cnn",
                in_channels=1,
                channels=(4, 4),
                convs_per_stage=1,
                padding="valid",
                stage_pool="none",
                dilation=dilation,
                hidden=(),
            )
        )

    # 3x3 valid convs on 32²: dilation 1 -> 30², 28²; dilation 3 -> 26², 20².
    assert model(1).features(torch.zeros(1, 1, 32, 32)).shape[-2:] == (28, 28)
    assert model(3).features(torch.zeros(1, 1, 32, 32)).shape[-2:] == (20, 20)
    assert macs_by_layer(model(3), (1, 32, 32)) == {
        "features.0": 4 * 26 * 26 * 9,
        "features.3": 4 * 20 * 20 * 4 * 9,
        "classifier.0": 4 * 10,
    }


def test_count_macs_in_one_d() -> None:
    seed = build_model(preset("mnist1d_cnn"))
    # lengths 19, 9, 4: 15 outputs per position x (in_channels x 3 taps); linear 60 x 10.
    expected = 19 * 15 * 3 + 9 * 15 * 45 + 4 * 15 * 45 + 60 * 10
    assert count_macs(seed, (1, 40)) == expected == 10_230
    net = build_model(preset("resnet20", width=4, spatial_dims=1, in_channels=1))
    short, long = count_macs(net, (1, 40)), count_macs(net, (1, 400))
    fc = 16 * 10
    assert long - fc == 10 * (short - fc)  # every conv's work is linear in the length
