"""Model zoo: plain VGG-style CNNs (2-D and 1-D), ResNet v1 and v2 (2-D and 1-D, optionally
dilated), AlexNet, GoogLeNet, DenseNet, built from one JSON-able `ModelConfig`.

Importing this package does not import torch; `build_model` and the counters do, when called.
"""

from training.models.config import ModelConfig
from training.models.errors import ModelConfigError
from training.models.flops import count_macs, count_parameters, macs_by_layer
from training.models.outputs import AUX_LOSS_WEIGHT, AuxLogits, split_logits
from training.models.presets import preset, preset_names
from training.models.registry import FamilySpec, build_model, family_names, register_family

__all__ = [
    "AUX_LOSS_WEIGHT",
    "AuxLogits",
    "FamilySpec",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "count_macs",
    "count_parameters",
    "family_names",
    "macs_by_layer",
    "preset",
    "preset_names",
    "register_family",
    "split_logits",
]
