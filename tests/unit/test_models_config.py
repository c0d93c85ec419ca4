"""ModelConfig: JSON round trip, presets, the registry, and one clear error per bad value."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from training.models import (
    FamilySpec,
    ModelConfig,
    ModelConfigError,
    build_model,
    family_names,
    preset,
    preset_names,
    register_family,
    registry,
)


@pytest.mark.parametrize(
    "config",
    [
        preset("resnet56"),
        preset("resnet50", in_channels=1, num_classes=7, zero_init_residual=True, dropout=0.2),
        preset("preact_resnet164", shortcut="C", width=8),
        preset("vgg16_bn"),
        ModelConfig(arch="plain_cnn", channels=[8, 16], convs_per_stage=[1, 3], hidden=[], depth=5),
    ],
    ids=lambda c: f"{c.arch}-{c.depth}",
)
def test_json_round_trip(config: ModelConfig) -> None:
    text = json.dumps(config.to_dict())
    back = ModelConfig.from_dict(json.loads(text))
    assert back == config
    assert hash(back) == hash(config)
    assert back.to_dict() == config.to_dict()


def test_lists_become_tuples() -> None:
    config = ModelConfig(arch="plain_cnn", channels=[8, 16], hidden=[32])
    assert config.channels == (8, 16) and config.hidden == (32,)


def test_presets_cover_the_contract_and_all_validate() -> None:
    names = preset_names()
    for name in (
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet110",
        "resnet164",
        "resnet18",
        "resnet152",
        "preact_resnet18",
        "preact_resnet164",
        "plain_cnn",
        "vgg11_bn",
    ):
        assert name in names
    assert names == sorted(names)
    for name in names:
        assert isinstance(preset(name), ModelConfig)
    assert preset("resnet20").shortcut == "A"
    assert preset("resnet50", num_classes=3).num_classes == 3


def test_importing_and_validating_does_not_import_torch() -> None:
    code = (
        "import sys; from training.models import ModelConfig, preset; "
        "ModelConfig(arch='resnet', depth=20); preset('vgg16'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"arch": "resnext", "depth": 50}, "'resnext'"),
        ({"arch": "resnet", "depth": 21}, "resnet depth 21 is not of the form 6n+2 (basic) or 9n+2"),
        ({"arch": "preact_resnet", "depth": 2}, "preact_resnet depth 2 "),
        ({"arch": "resnet", "depth": 32, "block": "bottleneck"}, "depth 32 is not of the form 9n+2"),
        ({"arch": "resnet", "depth": 29, "block": "basic"}, "depth 29 is not of the form 6n+2"),
        ({"arch": "resnet", "depth": 19, "style": "imagenet"}, "depth 19 is not an imagenet-style depth"),
        ({"arch": "resnet", "depth": 18, "style": "imagenet", "block": "bottleneck"}, "'bottleneck'"),
        ({"arch": "resnet"}, "resnet needs a depth"),
        ({"arch": "resnet", "depth": 0}, "depth=0"),
        ({"arch": "resnet", "depth": 20, "shortcut": "D"}, "shortcut 'D'"),
        ({"arch": "resnet", "depth": 20, "shortcut": "a"}, "shortcut 'a'"),
        ({"arch": "resnet", "depth": 20, "style": "mnist"}, "style 'mnist'"),
        ({"arch": "resnet", "depth": 20, "block": "wide"}, "block 'wide'"),
        ({"arch": "resnet", "depth": 20, "num_classes": 0}, "num_classes=0"),
        ({"arch": "resnet", "depth": 20, "num_classes": -3}, "num_classes=-3"),
        ({"arch": "resnet", "depth": 20, "in_channels": 0}, "in_channels=0"),
        ({"arch": "resnet", "depth": 20, "width": 0}, "width=0"),
        ({"arch": "resnet", "depth": 20, "dropout": 1.0}, "dropout=1.0"),
        ({"arch": "resnet", "depth": 20, "num_classes": "10"}, "num_classes='10'"),
        ({"arch": "resnet", "depth": 20, "num_classes": True}, "num_classes=True"),
        ({"arch": "resnet", "depth": 20.0}, "depth=20.0"),
        ({"arch": "resnet", "depth": 20, "channels": (8, 16)}, "channels=[8, 16] does not apply"),
        ({"arch": "plain_cnn", "shortcut": "A"}, "shortcut='A' does not apply to arch 'plain_cnn'"),
        ({"arch": "plain_cnn", "depth": 9}, "plain_cnn depth 9 does not match"),
        ({"arch": "plain_cnn", "convs_per_stage": (1, 2)}, "convs_per_stage=[1, 2] has 2 entries"),
        ({"arch": "plain_cnn", "channels": ()}, "channels=[]"),
        ({"arch": "plain_cnn", "hidden": (64, 0)}, "hidden=[64, 0]"),
        ({"arch": "plain_cnn", "channels": (8, 1.5)}, "channels=[8, 1.5]"),
        ({"arch": "plain_cnn", "pool_size": 0}, "pool_size=0"),
    ],
)
def test_bad_config_names_the_bad_value(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig(**fields)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"arch": "resnet", "dept": 20}, "unknown model config keys: dept"),
        ({"depth": 20}, "needs an 'arch'"),
        ([1, 2], "got list"),
    ],
)
def test_bad_dicts(data: Any, needle: str) -> None:
    with pytest.raises(ModelConfigError, match=needle):
        ModelConfig.from_dict(data)


def test_bad_presets() -> None:
    with pytest.raises(ModelConfigError, match="unknown model preset 'resnet19'"):
        preset("resnet19")
    with pytest.raises(ModelConfigError, match="keys for preset 'resnet20': colour"):
        preset("resnet20", colour="red")
    with pytest.raises(ModelConfigError, match="depth 21"):
        preset("resnet20", depth=21)
    assert issubclass(ModelConfigError, ValueError)


def build(config: ModelConfig) -> nn.Module:
    """Builder of the toy family registered below (the registry imports this module by name)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(config.in_channels, config.num_classes)
    )


def test_a_new_family_plugs_into_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    seen: list[ModelConfig] = []
    register_family(FamilySpec(name="toy", module=__name__, fields=frozenset(), validate=seen.append))
    assert "toy" in family_names()
    model = build_model(ModelConfig(arch="toy", in_channels=2, num_classes=4))
    assert model(torch.zeros(1, 2, 8, 8)).shape == (1, 4) and seen
    with pytest.raises(
        ModelConfigError, match=r"width=8 does not apply to arch 'toy' \(used by: .*preact_resnet, resnet\)"
    ):
        ModelConfig(arch="toy", width=8)
    with pytest.raises(ValueError, match="already registered"):
        register_family(FamilySpec(name="toy", module=__name__, fields=frozenset(), validate=seen.append))
