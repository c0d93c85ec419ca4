"""The training loop on a tiny synthetic set: learning, checkpoints, exact resume, run records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import BEST_WEIGHTS, CheckpointError, load_model, load_run, load_tensors
from training.config import OptimConfig, TrainConfig, TrainConfigError
from training.loop import Trainer

TINY_MODEL = {"arch": "resnet", "depth": 8, "width": 8, "style": "cifar", "shortcut": "A", "dropout": 0.1}
TINY_DATA = {"name": "synthetic", "image_size": 12, "num_samples": 240, "num_classes": 4, "seed": 3}


def tiny_config(epochs: int = 4, **changes) -> TrainConfig:
    fields = {
        "model": TINY_MODEL,
        "data": TINY_DATA,
        "optim": OptimConfig(lr=0.05, schedule="cosine", warmup_epochs=0.5),
        "epochs": epochs,
        "batch_size": 32,
        "threads": 1,
        "seed": 7,
    }
    fields.update(changes)
    return TrainConfig(**fields)


def train(run_dir: Path, config: TrainConfig) -> Trainer:
    trainer = Trainer(config, run_dir)
    trainer.fit(show_progress=False)
    return trainer


def test_loss_falls_and_run_record_is_complete(tmp_path: Path) -> None:
    trainer = train(tmp_path / "run", tiny_config(epochs=6))
    history = trainer.history
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert trainer.best_val_acc > 0.5  # 4 classes: chance is 0.25
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["num_classes"] == 4 and record["model"]["in_channels"] == 1
    assert record["class_names"] == list(trainer.bundle.class_names)
    assert record["input"]["height"] == 12 and len(record["input"]["mean"]) == 1
    assert record["dataset_fingerprint"] == trainer.bundle.fingerprint
    assert record["metrics"]["epochs_completed"] == 6
    assert 0 <= record["metrics"]["test_acc"] <= 1
    assert len(record["metrics"]["per_class_acc"]) == 4
    assert sum(map(sum, record["metrics"]["confusion"])) == record["metrics"]["test_samples"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    for png in ("curves.png", "confusion.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_round_trip_is_bit_identical(tmp_path: Path) -> None:
    trainer = train(tmp_path / "run", tiny_config(epochs=2))
    model, info = load_model(tmp_path / "run")
    trainer.model.eval().to(memory_format=torch.contiguous_format)  # the loaded model's layout
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    batch = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(batch), trainer.model(batch))
    assert info.model_config == trainer.model_config
    assert info.data_spec.to_dict() == trainer.bundle.spec.to_dict()
    # weights are safetensors, not pickle
    assert set(load_tensors(tmp_path / "run" / BEST_WEIGHTS)) == set(model.state_dict())


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = train(tmp_path / "straight", tiny_config(epochs=4))
    first_half = Trainer(tiny_config(epochs=4), tmp_path / "resumed")
    first_half.config = first_half.config  # same config; stop after two epochs by hand
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        for epoch in range(2):
            first_half._run_epoch(epoch, progress)
    resumed = Trainer(tiny_config(epochs=4), tmp_path / "resumed")
    resumed.restore()
    assert resumed.start_epoch == 2
    resumed.fit(show_progress=False)
    for name, tensor in straight.model.state_dict().items():
        other = resumed.model.state_dict()[name]
        if tensor.is_floating_point():
            assert torch.allclose(tensor, other, rtol=0, atol=1e-6), name
        else:
            assert torch.equal(tensor, other), name
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    train(tmp_path / "run", tiny_config(epochs=1))
    trainer = Trainer(tiny_config(epochs=1, batch_size=16), tmp_path / "run")
    with pytest.raises(TrainConfigError, match="batch_size: 32 -> 16"):
        trainer.restore()


def test_resume_without_state_is_a_clear_error(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(epochs=1), tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"train_state\.json does not exist"):
        trainer.restore()


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    train(tmp_path / "run", tiny_config(epochs=1))
    (tmp_path / "run" / BEST_WEIGHTS).write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text("{")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_run(tmp_path / "run")


def test_config_round_trip_and_validation() -> None:
    config = tiny_config()
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TrainConfigError, match="unknown training config keys: colour"):
        TrainConfig.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(TrainConfigError, match="epochs must be >= 1, got 0"):
        tiny_config(epochs=0)
    with pytest.raises(TrainConfigError, match="optimizer must be one of"):
        OptimConfig(optimizer="lion")


def test_held_out_samples_are_written_as_png(tmp_path: Path) -> None:
    from PIL import Image

    from training.samples import write_samples

    trainer = train(tmp_path / "run", tiny_config(epochs=1))
    paths = write_samples(tmp_path / "run", tmp_path / "samples", count=5)
    assert len(paths) == 5
    first_image, first_label = trainer.bundle.test[0]
    assert paths[0].name == f"test-0000-{trainer.bundle.class_names[first_label]}.png"
    with Image.open(paths[0]) as image:
        assert image.size == (12, 12)
        assert np.array_equal(np.asarray(image), first_image[0].numpy())
