"""Forward shapes of the issue-11 families (small inputs, 224², 1-D lengths 40 and 1000), the
GoogLeNet auxiliary heads, and torch.fx traceability of every new family and option."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from training.models import AUX_LOSS_WEIGHT, AuxLogits, ModelConfig, build_model, preset, split_logits

# Reduced widths: the same topology as the published networks at a fraction of the work.
SMALL_2D = [
    preset("alexnet", width=4, num_classes=7),
    preset("googlenet", width=8, in_channels=1),
    preset("googlenet", width=8, aux_heads=True, num_classes=3),
    preset("densenet121", growth_rate=4, width=8, in_channels=4, num_classes=5),
    preset("densenet161", growth_rate=4),
    preset("preact_resnet200", width=2, num_classes=6),
    preset("resnet50", width=4, output_stride=8),
    preset("plain_cnn", in_channels=1, dilation=(1, 2, 1, 2, 1, 4)),
]
# Each family's smallest input: AlexNet's floor pools need 63 px, DenseNet's 32, GoogLeNet's 32.
MIN_SIZE = {"alexnet": 63, "densenet": 32, "googlenet": 32}


def _ids(config: ModelConfig) -> str:
    return f"{config.arch}-{config.depth}-{config.spatial_dims}d"


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("config", SMALL_2D, ids=_ids)
def test_forward_shapes_small_and_224(config: ModelConfig) -> None:
    model = build_model(config)
    for size in (MIN_SIZE.get(config.arch, 8), 224):
        out = _forward(model, torch.randn(2, config.in_channels, size, size))
        assert out.shape == (2, config.num_classes), size
        assert torch.isfinite(out).all()


def test_full_size_googlenet_forward_224() -> None:
    out = _forward(build_model(preset("googlenet")), torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


ONE_D = [
    preset("mnist1d_cnn"),
    preset("mnist1d_cnn", in_channels=3, num_classes=4),
    preset("resnet20", width=8, spatial_dims=1, in_channels=1),
    preset("resnet18", width=8, spatial_dims=1, in_channels=2, num_classes=3),
    preset("resnet50", width=4, spatial_dims=1, in_channels=1, output_stride=8),
    preset("preact_resnet20", width=8, spatial_dims=1, in_channels=1, shortcut="A"),
    ModelConfig(arch="plain_cnn", spatial_dims=1, in_channels=1, channels=(8, 16), kernel_size=5),
]


@pytest.mark.parametrize("config", ONE_D, ids=_ids)
@pytest.mark.parametrize("length", [40, 1000])
def test_one_d_forward_shapes(config: ModelConfig, length: int) -> None:
    model = build_model(config)
    assert all(not isinstance(m, nn.Conv2d | nn.BatchNorm2d) for m in model.modules())
    out = _forward(model, torch.randn(3, config.in_channels, length))
    assert out.shape == (3, config.num_classes) and torch.isfinite(out).all()


def test_mnist1d_seed_model_layers() -> None:
    model = build_model(preset("mnist1d_cnn"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (15, (3,), (2,), (0,))
    ] * 3
    assert not any(isinstance(m, nn.BatchNorm1d | nn.MaxPool1d) for m in model.modules())
    (linear,) = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert (linear.in_features, linear.out_features) == (60, 10)
    x = torch.randn(2, 1, 40)
    assert model.features(x).shape == (2, 15, 4)  # 40 -> 19 -> 9 -> 4: the pool is the identity
    assert torch.equal(model.avgpool(model.features(x)), model.features(x))


def test_googlenet_aux_heads_train_only() -> None:
    torch.manual_seed(0)
    model = build_model(preset("googlenet", width=8, aux_heads=True, num_classes=3))
    x, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    out = model.train()(x)
    assert isinstance(out, AuxLogits) and len(out.aux) == 2
    assert all(a.shape == (4, 3) for a in (out.logits, *out.aux))
    logits, aux = split_logits(out)
    loss = nn.functional.cross_entropy(logits, labels)
    loss = loss + AUX_LOSS_WEIGHT * sum(nn.functional.cross_entropy(a, labels) for a in aux)
    loss.backward()
    assert model.aux1.fc2.weight.grad is not None and model.aux1.fc2.weight.grad.abs().sum() > 0
    evaluated = model.eval()(x)
    assert isinstance(evaluated, torch.Tensor) and evaluated.shape == (4, 3)
    assert split_logits(evaluated) == (evaluated, ())
    traced = torch.fx.symbolic_trace(model)  # eval-mode trace: what export sees
    assert not any("aux" in str(node.target) for node in traced.graph.nodes)


FX_CASES = [
    (preset("alexnet", width=4), (3, 63, 63)),
    (preset("googlenet", width=8, aux_heads=True), (3, 32, 32)),
    (preset("densenet121", growth_rate=4, width=8), (3, 32, 32)),
    (preset("resnet50", width=4, output_stride=8), (3, 32, 32)),
    (preset("preact_resnet18", width=4, output_stride=16), (3, 32, 32)),
    (preset("plain_cnn", dilation=2), (3, 16, 16)),
    (preset("mnist1d_cnn"), (1, 40)),
    (preset("resnet20", width=4, spatial_dims=1, in_channels=1), (1, 40)),
    (preset("preact_resnet20", width=4, spatial_dims=1, in_channels=2), (2, 40)),
]


@pytest.mark.parametrize(("config", "shape"), FX_CASES, ids=[_ids(c) for c, _ in FX_CASES])
def test_fx_symbolic_trace_matches_eager(config: ModelConfig, shape: tuple[int, ...]) -> None:
    model = build_model(config).eval()
    for m in model.modules():  # non-trivial BN statistics, so a dropped BN would show
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)
