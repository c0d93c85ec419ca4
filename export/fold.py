"""Conv-BN folding on any eval-mode ``nn.Module`` via torch.fx, with a per-layer report.

Every BatchNorm whose input is a convolution used nowhere else is folded into that convolution:
``W' = W·γ/√(σ²+ε)`` and ``b' = (b−μ)·γ/√(σ²+ε) + β`` (computed in float64, stored in the
weight's dtype). A BatchNorm that cannot be folded (pre-activation ResNets, a BN after an add or
a pooling, a conv whose output is also used elsewhere) becomes an :class:`Affine` (``x·s + t``
per channel, ONNX ``Mul`` + ``Add``) so no ``BatchNormalization`` node reaches the exported
graph, and the report says why it was not folded, grouped by cause with an explanation per
cause (:data:`KEPT_CAUSES`: ResNet v2 pre-activation, DenseNet's BN-ReLU-conv on a
concatenation, a convolution whose output is also used elsewhere). Modules the eval-mode
forward never reaches (GoogLeNet's training-only auxiliary classifiers) are left out of the
folded module and listed as dropped, with their parameter counts.

Folding is done here, in PyTorch, rather than trusted to the ONNX exporter's own fusion pass:
that pass has shipped bugs producing wrong ResNets, and this one is checked numerically
(:func:`check_fold`) every time.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

__all__ = [
    "FOLD_TOLERANCES",
    "KEPT_CAUSES",
    "Affine",
    "DroppedModule",
    "FoldError",
    "FoldReport",
    "LayerFold",
    "check_fold",
    "fold_batchnorms",
    "max_relative_error",
    "verify_fold",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Affine(nn.Module):
    """Per-channel ``y = x * scale + shift`` over dim 1: an eval-mode BatchNorm without its stats."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale and shift each channel (dim 1) of `x`."""
        view = (-1,) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(view) + self.shift.reshape(view)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


# Why a BatchNorm stayed an affine, by cause: the explanation kiln.json carries for each group.
KEPT_CAUSES: dict[str, str] = {
    "after_add": (
        "pre-activation (ResNet v2): the BatchNorm normalises a residual sum (branch + shortcut) "
        "that no single convolution produces, and the ReLU after it is not linear, so it folds "
        "into neither neighbour"
    ),
    "after_concat": (
        "BN-ReLU-conv on a concatenation (DenseNet): the BatchNorm normalises feature maps that "
        "several earlier layers produced and later layers also read unnormalised, so no single "
        "convolution produces its input, and the ReLU after it blocks folding into the next one"
    ),
    "shared_conv_output": (
        "the convolution's output is also read elsewhere (e.g. a stem output feeding both the "
        "first pre-activation and the shortcut): folding into it would change the other path"
    ),
    "not_after_conv": (
        "its input is not a convolution's output (a pooling, linear or other op), so there is "
        "no convolution to fold it into"
    ),
    "other": "see the per-layer reason",
}
AFFINE_NOTE = (
    "a BatchNorm kept as an affine is exported as x*scale + shift per channel (ONNX Mul + Add): "
    "the eval-mode BatchNorm's own arithmetic, so it costs two elementwise ops, not accuracy"
)
DROPPED_REASON = "not reached by the eval-mode forward pass (training-only), so not in the exported graph"


def _cause(reason: str) -> str:
    """The KEPT_CAUSES key of a not-foldable reason."""
    if not reason:
        return ""
    called = re.match(r"input is call_(?:function|method) (\w+)", reason)
    if called:
        op = called.group(1)
        if op in ("add", "iadd", "add_"):
            return "after_add"
        if op in ("cat", "concat", "concatenate"):
            return "after_concat"
        return "not_after_conv"
    if "users" in reason:
        return "shared_conv_output"
    if reason.startswith("input is"):
        return "not_after_conv"
    return "other"


@dataclass(frozen=True, kw_only=True)
class LayerFold:
    """What happened to one BatchNorm."""

    bn: str  # qualified module name of the BatchNorm
    action: Literal["folded", "affine"]
    into: str | None  # the conv it was folded into (folded only)
    reason: str  # why it was kept as an affine ("" when folded)

    @property
    def cause(self) -> str:
        """The KEPT_CAUSES key of `reason` ("" when folded)."""
        return _cause(self.reason)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "bn": self.bn,
            "action": self.action,
            "into": self.into,
            "reason": self.reason,
            "cause": self.cause,
        }


@dataclass(frozen=True, kw_only=True)
class DroppedModule:
    """A submodule with parameters that the eval-mode forward never calls (not exported)."""

    module: str
    parameters: int
    reason: str = DROPPED_REASON

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"module": self.module, "parameters": self.parameters, "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class FoldReport:
    """Per-layer outcome of :func:`fold_batchnorms`, in graph order, and the dropped modules."""

    layers: tuple[LayerFold, ...]
    dropped: tuple[DroppedModule, ...] = ()

    @property
    def folded(self) -> tuple[LayerFold, ...]:
        """BatchNorms folded into their convolution."""
        return tuple(layer for layer in self.layers if layer.action == "folded")

    @property
    def kept(self) -> tuple[LayerFold, ...]:
        """BatchNorms kept as a per-channel affine."""
        return tuple(layer for layer in self.layers if layer.action == "affine")

    def kept_by_cause(self) -> list[dict[str, Any]]:
        """The kept BatchNorms grouped by cause: count, explanation, the layers' names."""
        groups: dict[str, list[LayerFold]] = {}
        for layer in self.kept:
            groups.setdefault(layer.cause, []).append(layer)
        return [
            {
                "cause": cause,
                "count": len(layers),
                "why": KEPT_CAUSES[cause],
                "reasons": sorted({layer.reason for layer in layers}),
                "layers": [layer.bn for layer in layers],
            }
            for cause, layers in groups.items()
        ]

    def summary(self) -> str:
        """One line, e.g. '19 folded, 0 kept as affine' (+ the causes and dropped modules)."""
        if not self.layers:
            text = "no BatchNorm layers (nothing to fold)"
        else:
            text = f"{len(self.folded)} folded, {len(self.kept)} kept as affine"
            causes = ", ".join(f"{g['count']} {g['cause']}" for g in self.kept_by_cause())
            text += f" ({causes})" if causes else ""
        if self.dropped:
            names = ", ".join(f"{d.module} ({d.parameters:,} params)" for d in self.dropped)
            text += f"; dropped, training-only: {names}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (goes into kiln.json's extra section)."""
        return {
            "folded": len(self.folded),
            "kept_as_affine": len(self.kept),
            "summary": self.summary(),
            "kept_by_cause": self.kept_by_cause(),
            "affine_note": AFFINE_NOTE if self.kept else "",
            "dropped_modules": [d.to_dict() for d in self.dropped],
            "layers": [layer.to_dict() for layer in self.layers],
        }


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ/√(σ²+ε), β − μ·γ/√(σ²+ε)) in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean = bn.running_mean.double()
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * inv_std
    return scale, beta - mean * scale


def _fused_conv(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of `conv` with `bn` folded into its weight and (new or updated) bias."""
    scale, shift = _bn_scale_shift(bn)
    fused = copy.deepcopy(conv)
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    view = (-1,) + (1,) * (weight.dim() - 1)
    fused.weight = nn.Parameter((weight * scale.reshape(view)).to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=False)
    return fused


def _affine_from_bn(bn: nn.modules.batchnorm._BatchNorm) -> Affine:
    scale, shift = _bn_scale_shift(bn)
    dtype = bn.running_mean.dtype if bn.running_mean is not None else torch.float32
    return Affine(scale.to(dtype), shift.to(dtype))


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _unreached_modules(source: nn.Module, gm: fx.GraphModule) -> tuple[DroppedModule, ...]:
    """The outermost submodules with parameters that no node of the traced graph uses."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    covered = set()  # used names and all their ancestors
    for name in used:
        parts = name.split(".")
        covered.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    def reached(name: str) -> bool:
        parts = name.split(".")
        return name in covered or any(".".join(parts[:i]) in used for i in range(1, len(parts)))

    dropped = []
    for name, module in source.named_modules():
        parent = name.rpartition(".")[0]
        if not name or reached(name) or (parent and not reached(parent)):
            continue  # the root, a used module, or inside an already reported one
        count = sum(p.numel() for p in module.parameters())
        if count:
            dropped.append(DroppedModule(module=name, parameters=count))
    return tuple(dropped)


def _why_not_foldable(gm: fx.GraphModule, node: fx.Node, bn: nn.Module, call_sites: dict[str, int]) -> str:
    """'' when `node` (a BN call) can be folded into its input conv, else the reason."""
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics (track_running_stats=False)"
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return "input is not a graph value"
    if src.op != "call_module":
        return f"input is {src.op} {getattr(src.target, '__name__', src.target)}, not a convolution"
    conv = gm.get_submodule(str(src.target))
    if not isinstance(conv, _CONV_TYPES):
        return f"input is {type(conv).__name__} '{src.target}', not a convolution"
    if len(src.users) != 1:
        return f"conv '{src.target}' output has {len(src.users)} users"
    if call_sites[str(src.target)] != 1:
        return f"conv '{src.target}' module is called {call_sites[str(src.target)]} times"
    if call_sites[str(node.target)] != 1:
        return f"BatchNorm module is called {call_sites[str(node.target)]} times"
    if conv.out_channels != bn.num_features:
        return f"conv has {conv.out_channels} outputs but BatchNorm has {bn.num_features} features"
    return ""


def fold_batchnorms(model: nn.Module) -> tuple[fx.GraphModule, FoldReport]:
    """Fold conv→BN pairs of an eval-mode copy of `model`; other BNs become :class:`Affine`.

    The input model is not modified. Returns the traced, rewritten module (eval mode, no grads)
    and the per-layer report. Raises ``ValueError`` naming the model if it cannot be traced.
    """
    source = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(source)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx: {exc}") from exc
    dropped = _unreached_modules(source, gm)
    call_sites: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_sites[str(node.target)] = call_sites.get(str(node.target), 0) + 1
    layers: list[LayerFold] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(str(node.target))
        if not isinstance(bn, _BN_TYPES):
            continue
        reason = _why_not_foldable(gm, node, bn, call_sites)
        if reason:
            if bn.running_mean is None:
                raise ValueError(f"cannot export BatchNorm '{node.target}': {reason}")
            _set_module(gm, str(node.target), _affine_from_bn(bn))
            layers.append(LayerFold(bn=str(node.target), action="affine", into=None, reason=reason))
            continue
        conv_node = node.args[0]
        conv = gm.get_submodule(str(conv_node.target))
        _set_module(gm, str(conv_node.target), _fused_conv(conv, bn))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
        layers.append(LayerFold(bn=str(node.target), action="folded", into=str(conv_node.target), reason=""))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval().requires_grad_(False)
    return gm, FoldReport(layers=tuple(layers), dropped=dropped)


def max_relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max over rows of max|ref − cand| / max|ref| (a scale-aware error; 0 for identical rows).

    Element-wise relative error explodes for logits near zero, so each row is measured against
    its own largest magnitude.
    """
    ref = reference.detach().reshape(reference.shape[0], -1).double()
    diff = (candidate.detach().reshape(candidate.shape[0], -1).double() - ref).abs().amax(dim=1)
    scale = ref.abs().amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return float((diff / scale).max())


FOLD_TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-5, torch.float32: 1e-4}


class FoldError(ValueError):
    """The folded model does not match the original within tolerance."""


@torch.no_grad()
def check_fold(
    original: nn.Module,
    input_shape: tuple[int, ...],
    *,
    folded: nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
    batch: int = 4,
    seed: int = 0,
) -> float:
    """Max relative error between `original` and its folded form on a random batch in `dtype`.

    `input_shape` excludes the batch dim. With `folded` None, a copy of `original` converted to
    `dtype` is folded (so a float64 check measures the folding math, not float32 rounding of
    the folded weights); otherwise `folded` itself is converted and compared. Inputs are copied.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_shape), generator=generator, dtype=torch.float64).to(dtype)
    reference = copy.deepcopy(original).eval().to(dtype)
    candidate = fold_batchnorms(reference)[0] if folded is None else copy.deepcopy(folded).to(dtype)
    return max_relative_error(reference(x), candidate.eval()(x))


def verify_fold(
    original: nn.Module, folded: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0
) -> dict[str, float]:
    """Run both fold checks (float64 math, float32 artefact); FoldError past FOLD_TOLERANCES.

    Returns {"float64": err, "float32": err} for the manifest.
    """
    errors = {
        "float64": check_fold(original, input_shape, dtype=torch.float64, seed=seed),
        "float32": check_fold(original, input_shape, folded=folded, dtype=torch.float32, seed=seed),
    }
    for name, tol in (
        ("float64", FOLD_TOLERANCES[torch.float64]),
        ("float32", FOLD_TOLERANCES[torch.float32]),
    ):
        if not errors[name] <= tol:  # also catches NaN
            raise FoldError(
                f"folded model differs from the original in {name}: max rel err {errors[name]:.3g} > {tol:g}"
            )
    return errors
