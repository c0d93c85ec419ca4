"""TensorRT engine build and run. Skipped (with the reason) where `tensorrt` is not importable or
no CUDA device is present: the project's build machines have neither, so this path is unverified
there (see the README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx_export import export_onnx, save_onnx
from export.parity import onnx_runner
from export.tensorrt_build import build_engine, plan_runner, tensorrt_missing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(tensorrt_missing() is not None, reason=str(tensorrt_missing())),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda unavailable)"),
]

SHAPE = (3, 16, 16)


def test_fp32_engine_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()
    source = save_onnx(export_onnx(model, SHAPE), tmp_path / "model.onnx")
    cache = tmp_path / "timing.cache"
    info = build_engine(source, tmp_path / "model.plan", max_batch=8, opt_batch=4, timing_cache=cache)
    assert info.batch_profile == (1, 4, 8) and info.tf32 is False
    assert info.version and info.gpu_name and info.compute_capability.count(".") == 1
    assert cache.stat().st_size > 0
    run_trt, runtime = plan_runner(tmp_path / "model.plan")
    run_ort, _ = onnx_runner(source)
    assert runtime.startswith("tensorrt")
    for batch in (1, 7, 8):
        x = np.random.default_rng(batch).standard_normal((batch, *SHAPE)).astype(np.float32)
        np.testing.assert_allclose(run_trt(x), run_ort(x), rtol=1e-3, atol=1e-4)
