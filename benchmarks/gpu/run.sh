#!/bin/bash
# The GPU check on a lent machine (see gpu_check.py). The onnxruntime-gpu wheel (255 MB) arrives in
# pieces under /tmp/parts (ort.0 .. ort.4, carried one per call, see docs/gpu.md); the small
# wheels it needs beside the image's packages come from .whl/small. Writes into $OUT.
set -u
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
whl=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
cat /tmp/parts/ort.[0-9] > "$whl"
echo "onnxruntime-gpu wheel sha256 $(sha256sum "$whl" | cut -c1-64) (expected $(cat .whl/parts/ort.sha256 2>/dev/null))"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/small/*.whl "$whl" || exit 1
export PYTHONPATH=/tmp/site:$PWD
# ORT's CUDA EP loads cuBLAS/cuDNN/cuFFT/cuRAND from the image's nvidia-* pip packages.
LD_LIBRARY_PATH=$(python3 -c "
import glob, os, site
dirs = {os.path.dirname(p) for sp in site.getsitepackages() for p in glob.glob(sp + '/nvidia/**/lib*.so*', recursive=True)}
print(':'.join(sorted(dirs)))"):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
{
  echo "## Machine"; echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"
  python3 -c "import sys, torch, onnxruntime as o, grpc, google.protobuf as pb, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'onnxruntime', o.__version__, o.get_available_providers(), 'grpcio', grpc.__version__, 'protobuf', pb.__version__, 'numpy', numpy.__version__)"
  echo '```'
} 2>&1 | tee -a "$OUT/gpu-results.md"
echo "## pytest -m gpu" | tee -a "$OUT/gpu-results.md"
timeout 240 python3 -m pytest -m gpu tests/unit/test_backends_onnxruntime.py tests/integration/test_export_tensorrt.py \
    -q -rs -p no:cacheprovider 2>&1 | tail -15 | tee -a "$OUT/gpu-results.md"
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_TIMEOUT:-420}" python3 benchmarks/gpu/gpu_check.py --out "$OUT" "$@"
