#!/bin/bash
# The GPU check on a lent machine: installs what benchmarks/gpu/prepare.sh carried into /tmp/carry,
# runs the GPU tests, then benchmarks/gpu/check.py; everything lands in $OUT. Stops itself at
# CHECK_BUDGET_S (default 480 s) so a 15-minute lease keeps room for starting and copying.
set -u
OUT=${OUT:-benchmarks/out/gpu}
CARRY=${CARRY:-/tmp/carry}
BUDGET=${CHECK_BUDGET_S:-480}
start=$SECONDS
mkdir -p "$OUT"
for first in "$CARRY"/wheels/*.piece.00; do  # wheels over 60 MiB came in pieces
  [ -e "$first" ] && cat "${first%.00}".[0-9][0-9] > "${first%.piece.00}"
done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/wheels/*.whl \
  > "$OUT/pip.log" 2>&1 || { echo "pip install failed, see $OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$CARRY/bin:$PATH
export KILN_PERF_ANALYZER="$CARRY/bin/perf_analyzer"
# ORT's CUDA EP loads cuBLAS/cuDNN from the image's nvidia-* pip packages; perf_analyzer its libcudart
LD_LIBRARY_PATH=$CARRY/bin:$(python3 -c "
import glob, os, site
dirs = {os.path.dirname(p) for sp in site.getsitepackages() for p in glob.glob(sp + '/nvidia/**/lib*.so*', recursive=True)}
print(':'.join(sorted(dirs)))"):${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout 60 python3 -m pytest -m gpu tests/unit/test_backends_onnxruntime.py -q -rs -p no:cacheprovider \
  > "$OUT/pytest-gpu.txt" 2>&1
left=$((BUDGET - (SECONDS - start)))
PYTHONUNBUFFERED=1 timeout "$left" python3 benchmarks/gpu/check.py --out "$OUT" "$@" > "$OUT/check.log" 2>&1
echo "check rc=$? after $((SECONDS - start)) s; figures in $OUT/results.md"
