"""The model zoo builds the published networks: parameter counts, shapes, shortcuts, tracing."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from training.models import ModelConfig, build_model, count_parameters, preset
from training.models.layers import PadShortcut
from training.models.preact_resnet import PreActBasicBlock
from training.models.resnet import BasicBlock


def _meta_model(config: ModelConfig) -> nn.Module:
    # Parameters on the meta device take no memory or init time: counting a 60 M model is instant.
    with torch.device("meta"):
        return build_model(config)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # torchvision's published counts (1000 classes, 3 channels).
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
        # He et al. 2015, CIFAR-10 (option A; 10 classes).
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet56", 853_018),
        ("resnet110", 1_727_962),
        # torchvision's VGG figures.
        ("vgg11_bn", 132_868_840),
        ("vgg16", 138_357_544),
        ("vgg16_bn", 138_365_992),
    ],
)
def test_published_parameter_counts(name: str, expected: int) -> None:
    assert count_parameters(_meta_model(preset(name))) == expected


def test_real_build_matches_meta_count_and_torchvision_keys() -> None:
    model = build_model(preset("resnet18"))
    assert count_parameters(model) == 11_689_512
    keys = set(model.state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
        "layer4.1.bn2.bias",
        "fc.weight",
    ):
        assert key in keys
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())


def test_bottleneck_strides_on_the_3x3_conv() -> None:
    first = _meta_model(preset("resnet50")).layer2[0]
    assert first.conv1.stride == (1, 1)
    assert first.conv2.stride == (2, 2)
    assert first.downsample[0].stride == (2, 2)


@pytest.mark.parametrize(
    "config",
    [
        preset("resnet20", width=4),
        ModelConfig(arch="resnet", depth=11, width=4, block="bottleneck"),
        preset("resnet18", width=4, in_channels=1, num_classes=7),
        preset("resnet50", width=4, num_classes=5),
        preset("preact_resnet20", width=4, num_classes=3),
        ModelConfig(arch="preact_resnet", depth=11, width=4),
        preset("preact_resnet18", width=4),
        preset("preact_resnet50", width=4, in_channels=4, num_classes=2),
        preset("plain_cnn", in_channels=1),
        preset("vgg11_bn", channels=(4, 4, 8, 8, 8), hidden=(16,), num_classes=10),
    ],
    ids=lambda c: f"{c.arch}-{c.depth}-{c.style}-{c.block}",
)
@pytest.mark.parametrize("size", [8, 7, 32])
def test_forward_shapes_small_inputs(config: ModelConfig, size: int) -> None:
    model = build_model(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, config.in_channels, size, size))
    assert out.shape == (2, config.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "config",
    [
        preset("resnet20", width=4),
        preset("preact_resnet18", width=8, num_classes=10),
        preset("plain_cnn", channels=(8, 16, 16, 16, 16)),
        preset("vgg11", channels=(4, 4, 8, 8, 8), hidden=(16, 16)),
    ],
    ids=lambda c: c.arch,
)
def test_forward_shape_224(config: ModelConfig) -> None:
    with torch.no_grad():
        out = build_model(config).eval()(torch.randn(1, config.in_channels, 224, 224))
    assert out.shape == (1, config.num_classes)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_full_size_imagenet_forward_224(name: str) -> None:
    model = build_model(preset(name)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_training_step_reaches_every_parameter() -> None:
    model = build_model(preset("preact_resnet20", width=4, shortcut="C"))
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _shortcut_params(s: nn.Module | None) -> int:
    return 0 if s is None else count_parameters(s)


def test_shortcut_options_parameter_differences() -> None:
    # ResNet-20: projections 16->32 and 32->64 at the stage starts (B), one per block (C).
    a, b, c = (count_parameters(build_model(preset("resnet20", shortcut=s))) for s in "ABC")
    proj = {(16, 32): 16 * 32 + 2 * 32, (32, 64): 32 * 64 + 2 * 64}
    assert b - a == proj[16, 32] + proj[32, 64]
    same = 3 * (16 * 16 + 32) + 2 * (32 * 32 + 64) + 2 * (64 * 64 + 128)
    assert c - a == same + proj[16, 32] + proj[32, 64]


def test_option_a_pads_zero_channels_after_a_strided_identity() -> None:
    model = build_model(preset("resnet20", width=4)).eval()
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, PadShortcut)
    assert model.layer1[0].downsample is None
    x = torch.randn(2, 4, 7, 7)
    out = shortcut(x)
    assert out.shape == (2, 8, 4, 4)
    assert torch.equal(out[:, :4], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 4:], torch.zeros(2, 4, 4, 4))


def test_v1_zero_init_residual_makes_blocks_start_as_identity() -> None:
    model = build_model(preset("resnet20", width=4, zero_init_residual=True)).eval()
    block = model.layer2[0]
    assert isinstance(block, BasicBlock)
    assert torch.count_nonzero(block.bn2.weight) == 0
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(block.downsample(x)))


def test_v2_identity_path_is_untouched() -> None:
    model = build_model(preset("preact_resnet20", width=4, zero_init_residual=True)).eval()
    block = model.layer1[1]
    assert isinstance(block, PreActBasicBlock) and block.downsample is None
    x = torch.randn(2, 4, 8, 8)  # negative values too: no ReLU may touch the identity
    with torch.no_grad():
        assert torch.equal(block(x), x)
    # Projection shortcuts of v2 are a bare 1x1 conv (no BN): B at stage starts only.
    assert [type(m) for m in model.layer2[0].downsample] == [nn.Conv2d]


def test_v2_styles_and_blocks() -> None:
    cifar = build_model(preset("preact_resnet164", width=4))
    assert cifar.layer1[0].bn1 is not None  # the plain 3x3 stem leaves pre-activation to block 1
    imagenet = build_model(preset("preact_resnet50", width=4))
    assert imagenet.layer1[0].bn1 is None and imagenet.layer1[1].bn1 is not None
    assert len(cifar.layer1) == 18 and cifar.layer3[-1].conv3.out_channels == 4 * 4 * 4
    assert [len(getattr(imagenet, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_inferred_block_follows_the_papers() -> None:
    assert type(build_model(preset("resnet56", width=2)).layer1[0]).__name__ == "BasicBlock"
    assert type(build_model(preset("resnet164", width=2)).layer1[0]).__name__ == "Bottleneck"
    forced = build_model(ModelConfig(arch="resnet", depth=56, block="bottleneck", width=2))
    assert len(forced.layer1) == 6 and type(forced.layer1[0]).__name__ == "Bottleneck"


@pytest.mark.parametrize(
    "config",
    [
        preset("resnet20", width=4),
        preset("resnet50", width=4, shortcut="C"),
        preset("preact_resnet20", width=4, shortcut="A"),
        preset("preact_resnet50", width=4),
        preset("plain_cnn"),
    ],
    ids=lambda c: f"{c.arch}-{c.depth}",
)
def test_fx_symbolic_trace_matches_eager(config: ModelConfig) -> None:
    model = build_model(config).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, config.in_channels, 32, 32)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-6)


def test_same_seed_same_weights() -> None:
    config = preset("resnet20", width=4)
    torch.manual_seed(3)
    first = build_model(config).state_dict()
    torch.manual_seed(3)
    second = build_model(ModelConfig.from_dict(config.to_dict())).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
