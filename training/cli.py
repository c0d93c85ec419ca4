"""`kiln train`: build a TrainConfig from flags, train (or resume) a run, print the evaluation."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from training.config import OptimConfig, TrainConfig, TrainConfigError

DEFAULTS = TrainConfig(model={}, data={})
OPTIM_DEFAULTS = OptimConfig()

# flag dest -> (section, key); section None = top-level TrainConfig field
_MODEL_FLAGS = (
    "arch",
    "depth",
    "width",
    "style",
    "block",
    "shortcut",
    "dropout",
    "spatial_dims",
    "output_stride",
    "aux_heads",
)
_DATA_FLAGS = {
    "data": "name",
    "data_path": "path",
    "image_size": "image_size",
    "channels": "channels",
    "val_fraction": "val_fraction",
    "test_fraction": "test_fraction",
    "augment": "augment",
    "num_samples": "num_samples",
    "num_classes": "num_classes",
    "mnist1d_samples": "mnist1d_samples",
    "label_column": "label_column",
}
DEFAULT_PRESET = "resnet20"
DEFAULT_SIGNAL_PRESET = "mnist1d_cnn"  # the seed model of the MNIST-1D chapter
_OPTIM_FLAGS = tuple(f.name for f in dataclasses.fields(OptimConfig))
_TOP_FLAGS = (
    "epochs",
    "batch_size",
    "eval_batch_size",
    "seed",
    "device",
    "threads",
    "workers",
    "amp",
    "channels_last",
    "compile",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of `kiln train`; unset options fall back to the documented defaults."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    _add_model_options(parser)
    _add_data_options(parser)
    _add_optim_options(parser)
    _add_run_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The preset and the architecture fields that override it."""
    model = parser.add_argument_group("model (a preset, optionally overridden)")
    model.add_argument(
        "--model",
        "--preset",
        dest="model",
        default=None,
        help="preset name, e.g. resnet20, resnet50, preact_resnet18, vgg11_bn, densenet121, "
        f"mnist1d_cnn (default: {DEFAULT_PRESET}; {DEFAULT_SIGNAL_PRESET} for signal data)",
    )
    model.add_argument(
        "--arch", help="family: plain_cnn | resnet | preact_resnet | alexnet | googlenet | densenet"
    )
    model.add_argument(
        "--depth",
        type=int,
        help="resnet depth: cifar 6n+2 (basic) / 9n+2 (bottleneck), imagenet 18/34/50/101/152",
    )
    model.add_argument("--width", type=int, help="base channel width (cifar 16, imagenet 64)")
    model.add_argument("--style", choices=("cifar", "imagenet"), help="stem: 3x3 (cifar) or 7x7+maxpool")
    model.add_argument(
        "--block", choices=("basic", "bottleneck"), help="residual block (default: from depth)"
    )
    model.add_argument(
        "--shortcut",
        choices=("A", "B", "C"),
        help="A zero-pad identity, B projection on shape change, C all projections",
    )
    model.add_argument("--dropout", type=float, help="dropout before the classifier")
    model.add_argument(
        "--spatial-dims",
        type=int,
        choices=(1, 2),
        help="1: Conv1d net for signals [N,C,L] (plain_cnn, resnet, preact_resnet); 2: images",
    )
    model.add_argument(
        "--output-stride", type=int, help="resnet: dilate the last stage(s) instead of striding (16 or 8)"
    )
    model.add_argument(
        "--aux-heads",
        action=argparse.BooleanOptionalAction,
        help="googlenet: train with the two auxiliary classifiers (dropped at export)",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """Which data set, where it lives, how it is split and augmented."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        help="images: digits (bundled, default) | synthetic | cifar10 | imagefolder; "
        "signals: mnist1d (generated locally) | signals (a .npz or .csv file, see --signal-file)",
    )
    data.add_argument(
        "--data-path", help="folder for cifar10 (python batches) or imagefolder (class sub-folders)"
    )
    data.add_argument("--image-size", type=int, help="square input side (default 32)")
    data.add_argument(
        "--channels",
        type=int,
        help="images: force 1 or 3 input channels; signals CSV: channels per row (channel-major)",
    )
    data.add_argument("--val-fraction", type=float, help="validation share of the images (default 0.1)")
    data.add_argument("--test-fraction", type=float, help="test share of the images (default 0.2)")
    data.add_argument(
        "--augment",
        choices=("none", "digits", "cifar", "imagenet", "shift"),
        help="augmentation policy (default: the one suited to the dataset)",
    )
    data.add_argument("--num-samples", type=int, help="synthetic set size")
    data.add_argument("--num-classes", type=int, help="synthetic set classes")
    data.add_argument(
        "--mnist1d-samples",
        type=int,
        help="mnist1d: signals generated, 80 %% train / 20 %% test (default: the generator's 5000)",
    )
    data.add_argument(
        "--signal-file",
        type=Path,
        help="signals: a .npz (x [N,L] or [N,C,L], y [N]; optional x_test/y_test, class_names) or "
        "a .csv (a header row, one sample per row)",
    )
    data.add_argument("--label-column", help="signals CSV: the column holding the class (default: label)")


def _add_optim_options(parser: argparse.ArgumentParser) -> None:
    """Optimiser and learning-rate schedule."""
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=("sgd", "adamw"), help=f"default {OPTIM_DEFAULTS.optimizer}")
    opt.add_argument("--lr", type=float, help=f"peak learning rate (default {OPTIM_DEFAULTS.lr})")
    opt.add_argument("--momentum", type=float, help=f"SGD momentum (default {OPTIM_DEFAULTS.momentum})")
    opt.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum (default on)"
    )
    opt.add_argument(
        "--weight-decay",
        type=float,
        help=f"on conv/linear weights only (default {OPTIM_DEFAULTS.weight_decay})",
    )
    opt.add_argument("--schedule", choices=("onecycle", "cosine", "constant"), help="default onecycle")
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up length (default 1)")
    opt.add_argument("--label-smoothing", type=float, help="default 0")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Length, batch sizes, hardware and where the run goes."""
    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=int, help=f"default {DEFAULTS.epochs}")
    run.add_argument("--batch-size", type=int, help=f"default {DEFAULTS.batch_size}")
    run.add_argument("--eval-batch-size", type=int, help=f"default {DEFAULTS.eval_batch_size}")
    run.add_argument("--seed", type=int, help="default 0")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--threads", type=int, help="torch intra-op threads, 0 = all cores")
    run.add_argument("--workers", type=int, help="DataLoader workers for image folders")
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="mixed precision where the hardware has it: CUDA, or CPUs with BF16 instructions (default on)",
    )
    run.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory format (default on)"
    )
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default off)")
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go")
    run.add_argument("--name", help="run directory name (default: <model>-<data>-<timestamp>)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run exactly where it stopped")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _given(args: argparse.Namespace, names: tuple[str, ...] | dict[str, str]) -> dict[str, Any]:
    pairs = names.items() if isinstance(names, dict) else ((n, n) for n in names)
    return {key: getattr(args, dest) for dest, key in pairs if getattr(args, dest) is not None}


def build_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Flags over a base config (a resumed run's) or over the defaults and the chosen preset."""
    if base is None:
        data = _data_dict(args, {"name": "digits"})
        optim = _given(args, _OPTIM_FLAGS)
        return TrainConfig(
            model=_model_dict(_preset_name(args, data), args),
            data=data,
            optim=OptimConfig(**optim),
            **_given(args, _TOP_FLAGS),
        )
    merged = base.to_dict()
    if args.model is not None:
        merged["model"] = _model_dict(args.model, args)
    else:
        merged["model"] = {**merged["model"], **_given(args, _MODEL_FLAGS)}
    merged["data"] = _data_dict(args, merged["data"])
    merged["optim"] = {**merged["optim"], **_given(args, _OPTIM_FLAGS)}
    merged.update(_given(args, _TOP_FLAGS))
    return TrainConfig.from_dict(merged)


# flag -> (argparse dest, the one dataset it applies to)
_DATASET_ONLY_FLAGS = {
    "--mnist1d-samples": ("mnist1d_samples", "mnist1d"),
    "--signal-file": ("signal_file", "signals"),
    "--label-column": ("label_column", "signals"),
}


def _data_dict(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """The data section: flags over `base`; a flag given for another kind of set is an error
    (it would be silently ignored otherwise)."""
    from training.data.spec import SIGNAL_DATASETS

    data = {**base, **_given(args, _DATA_FLAGS)}
    name = data.get("name")
    if args.signal_file is not None:
        if args.data_path is not None:
            raise TrainConfigError("give the signal file once: --signal-file or --data-path, not both")
        data["path"] = str(args.signal_file)
    for flag, (dest, owner) in _DATASET_ONLY_FLAGS.items():
        if getattr(args, dest) is not None and name != owner:
            raise TrainConfigError(f"{flag} only applies to --data {owner}, not --data {name}")
    if name in SIGNAL_DATASETS and args.image_size is not None:
        raise TrainConfigError(f"--image-size does not apply to signal data (--data {name})")
    if name == "signals" and not data.get("path"):
        raise TrainConfigError("--data signals needs --signal-file PATH (a .npz or .csv file)")
    return data


def _preset_name(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """The preset asked for, else the default for the kind of data (1-D nets for signals)."""
    from training.data.spec import SIGNAL_DATASETS

    if args.model is not None:
        return str(args.model)
    return DEFAULT_SIGNAL_PRESET if data.get("name") in SIGNAL_DATASETS else DEFAULT_PRESET


def _model_dict(preset_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The preset's config with flag overrides, minus what the loop takes from the data."""
    from training.models import preset

    model = preset(preset_name, **_given(args, _MODEL_FLAGS)).to_dict()
    for derived in ("num_classes", "in_channels"):
        model.pop(derived, None)
    return model


def _default_run_name(config: TrainConfig, preset_name: str | None) -> str:
    from training.provenance import utc_now

    stamp = utc_now().replace(":", "").replace("-", "").replace("+0000", "")
    return f"{preset_name or config.model.get('arch', 'model')}-{config.data.get('name', 'data')}-{stamp}"


def _print_summary(console: Console, result: Any, class_names: tuple[str, ...]) -> None:
    table = Table(title=f"evaluation of {result.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("test accuracy", f"{100 * result.test.accuracy:.2f} % ({result.test.samples} samples)")
    table.add_row("test loss", f"{result.test.loss:.4f}")
    table.add_row("best val accuracy", f"{100 * result.best_val_acc:.2f} % (epoch {result.best_epoch})")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    for name, acc in zip(class_names, result.test.per_class_accuracy, strict=True):
        table.add_row(f"  class {name}", f"{100 * acc:.2f} %")
    console.print(table)


def run(args: argparse.Namespace) -> int:
    """Entry point of `kiln train`; returns 0, or 2 with one clear line for a bad argument."""
    from training.checkpoint import CheckpointError
    from training.data import DataError
    from training.models import ModelConfigError

    console = Console()
    try:
        if args.resume is not None:
            from training.train_state import load_train_state

            run_dir = args.resume
            saved = TrainConfig.from_dict(load_train_state(run_dir).config)
            config = build_config(args, base=saved)
        else:
            config = build_config(args)
            preset_name = _preset_name(args, config.data)
            run_dir = args.runs_dir / (args.name or _default_run_name(config, preset_name))
            if (run_dir / "train_state.json").exists():
                raise TrainConfigError(
                    f"{run_dir} already holds a run; pass --resume {run_dir} or another --name"
                )
        from training.loop import Trainer

        trainer = Trainer(config, run_dir, console=console)
        if args.resume is not None:
            trainer.restore()
        result = trainer.fit(show_progress=not args.no_progress)
    except (TrainConfigError, ModelConfigError, DataError, CheckpointError) as exc:
        print(f"kiln train: error: {exc}", file=sys.stderr)
        return 2
    _print_summary(console, result, trainer.bundle.class_names)
    console.print(f"run written to {run_dir} (run.json, checkpoint.safetensors, curves.png, confusion.png)")
    return 0
