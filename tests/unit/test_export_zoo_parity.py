"""Every family of the zoo, at reduced width: BN folding is equivalent and explained, and the
exported FP32 and FP16 ONNX graphs (dynamic batch) reproduce the unfolded PyTorch model.

Random weights and random inputs: the checks measure the export, not a training result. The
fold check uses `randomise_bn`'s extreme statistics (tiny variances: the hardest case for the
fold's arithmetic); the ONNX check uses statistics of the size trained networks have
(`realistic_bn`), because the extreme ones compound through ~100 layers into logits of 1e9 that
say nothing about FP16 on a real model. FP16 is judged by its logit error (`FP16_MAX_REL`)
rather than by top-1 agreement, which random logits' near-ties make a coin toss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.fold import KEPT_CAUSES, Affine, fold_batchnorms, verify_fold
from export.inputs import SignalPreprocess
from export.onnx_export import export_onnx
from export.parity import (
    DEFAULT_TOLERANCES,
    Tolerance,
    compare_outputs,
    onnx_runner,
    run_batched,
    torch_logits,
)
from export.variants import GraphOptions, build_onnx_variants
from tests.unit.test_export_fold import BN_TYPES, randomise_bn
from training.models import ModelConfig, build_model, preset

# FP16 rounds weights and activations to 11 significant bits (~5e-4 relative each time); the
# worst row error measured over these families is 2.2e-3 (pre-activation ResNet-50).
FP16_MAX_REL = 1e-2
BATCH, RUN_BATCH = 11, 4  # 11 rows in batches of 4, 4, 3: the batch dim is really dynamic


@dataclass(frozen=True)
class Case:
    """A family at reduced width, its input shape and what folding must report for it."""

    config: ModelConfig
    shape: tuple[int, ...]
    kept_causes: frozenset[str] = frozenset()  # causes of BNs kept as affine (empty: all fold)
    has_bn: bool = True
    dropped: tuple[str, ...] = ()  # modules the eval-mode graph leaves out


_VGG_CHANNELS = (4, 8, 8, 16, 16)
CASES: dict[str, Case] = {
    "alexnet": Case(preset("alexnet", width=4, num_classes=5), (3, 64, 64), has_bn=False),
    "vgg11": Case(
        preset("vgg11", channels=_VGG_CHANNELS, hidden=(32, 32), num_classes=5), (3, 32, 32), has_bn=False
    ),
    "vgg11_bn": Case(
        preset("vgg11_bn", channels=(4, 8, 8, 16, 16), hidden=(32, 32), num_classes=5), (3, 32, 32)
    ),
    "googlenet_aux": Case(
        preset("googlenet", width=8, num_classes=5, aux_heads=True), (3, 32, 32), dropped=("aux1", "aux2")
    ),
    "densenet121": Case(
        preset("densenet121", width=8, growth_rate=4, num_classes=5),
        (3, 32, 32),
        kept_causes=frozenset({"after_concat"}),
    ),
    "resnet18_v1": Case(preset("resnet18", width=4, num_classes=5), (3, 32, 32)),
    "resnet50_v2_preact": Case(
        preset("preact_resnet50", width=4, num_classes=5), (3, 32, 32), kept_causes=frozenset({"after_add"})
    ),
    "resnet18_dilated_os8": Case(preset("resnet18", width=4, output_stride=8, num_classes=5), (3, 32, 32)),
    "plain_cnn_1d_dilated": Case(
        ModelConfig(
            arch="plain_cnn",
            spatial_dims=1,
            in_channels=2,
            channels=(8, 16),
            dilation=(1, 2, 1, 2),
            hidden=(16,),
            num_classes=5,
        ),
        (2, 40),
    ),
    "resnet20_1d": Case(preset("resnet20", spatial_dims=1, width=4, in_channels=2, num_classes=5), (2, 40)),
    "mnist1d_cnn": Case(preset("mnist1d_cnn"), (1, 40), has_bn=False),
}


def _prepared(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(build_model(case.config))


def realistic_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """BN statistics and affine parameters of a trained network's size (not the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BN_TYPES):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                module.weight.copy_(0.6 + 0.8 * torch.rand(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model.eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_is_equivalent_and_explained(name: str) -> None:
    case = CASES[name]
    model = _prepared(case)
    folded, report = fold_batchnorms(model)
    errors = verify_fold(model, folded, case.shape)  # raises FoldError past tolerance
    assert errors["float64"] <= 1e-5 and errors["float32"] <= 1e-4
    bns = sum(isinstance(m, BN_TYPES) for m in model.modules() if not _in_dropped(m, model, case))
    assert len(report.layers) == bns and (bns > 0) == case.has_bn
    assert not any(isinstance(m, BN_TYPES) for m in folded.modules())
    assert sum(isinstance(m, Affine) for m in folded.modules()) == len(report.kept)
    assert {layer.cause for layer in report.kept} == case.kept_causes
    assert [d.module for d in report.dropped] == list(case.dropped)
    record = report.to_dict()
    assert record["kept_as_affine"] == len(report.kept) and record["folded"] == len(report.folded)
    for group in record["kept_by_cause"]:
        assert group["why"] == KEPT_CAUSES[group["cause"]] and group["count"] == len(group["layers"])
    if not case.has_bn:
        assert "no BatchNorm" in report.summary()


def _in_dropped(module: torch.nn.Module, model: torch.nn.Module, case: Case) -> bool:
    return any(module in model.get_submodule(name).modules() for name in case.dropped)


def test_densenet_keeps_exactly_the_bn_relu_conv_on_concatenations() -> None:
    """norm1 of every dense layer, each transition's norm and norm5 read a concatenation; norm0
    and every norm2 directly follow their convolution and fold."""
    _, report = fold_batchnorms(_prepared(CASES["densenet121"]))
    kept = {layer.bn.rsplit(".", 1)[-1] for layer in report.kept}
    folded = {layer.bn.rsplit(".", 1)[-1] for layer in report.folded}
    assert kept == {"norm1", "norm", "norm5"} and folded == {"norm0", "norm2"}
    assert len(report.kept) == 58 + 3 + 1  # 6+12+24+16 dense layers, 3 transitions, norm5


def _signal_pre(case: Case) -> SignalPreprocess:
    channels, length = case.shape
    return SignalPreprocess(
        mean=tuple(0.5 * (c + 1) for c in range(channels)),
        std=tuple(2.0 + c for c in range(channels)),
        channels=channels,
        length=length,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_fp32_and_fp16_match_pytorch(name: str, tmp_path: Path) -> None:
    """Through the real variant builder: FP32 passes the production gate, FP16 stays close.
    1-D models take the raw signal, normalised in the graph, as a signal export does."""
    case = CASES[name]
    torch.manual_seed(0)
    model = realistic_bn(build_model(case.config))
    core = export_onnx(fold_batchnorms(model)[0], case.shape)
    assert not any("aux" in init.name for init in core.graph.initializer)
    signal = len(case.shape) == 2
    pre = _signal_pre(case) if signal else None
    candidates = build_onnx_variants(core, ("fp32", "fp16"), tmp_path, options=GraphOptions(preprocess=pre))
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((BATCH, *case.shape)).astype(np.float32)
    if pre is not None:
        raw = raw * np.float32(3.0) + np.float32(1.0)  # raw scale differs from the normalised one
    reference = torch_logits(model, pre(raw) if pre is not None else raw)
    labels = reference.argmax(axis=1)
    tolerances = {"fp32": DEFAULT_TOLERANCES["fp32"], "fp16": Tolerance(max_rel_err=FP16_MAX_REL)}
    for cand in candidates:
        graph = onnx.load(str(cand.path))
        dim0 = graph.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), "batch must be dynamic"
        run, runtime = onnx_runner(cand.path)
        outputs = run_batched(run, raw, RUN_BATCH)
        result = compare_outputs(
            reference,
            outputs,
            labels,
            tolerances[cand.precision],
            artefact=f"{name}/{cand.filename}",
            precision=cand.precision,
            runtime=runtime,
        )
        assert result.passed, (result.artefact, result.failures, result.max_rel_err)
