#!/bin/bash
# CPU side of the GPU check: everything the lent machine needs that it cannot download (it reaches
# nothing outside), in parts of at most 60 MiB under benchmarks/out/gpu-carry/part-N, since one
# device call carries at most 64 MiB. Then, on the device machine (docs/gpu.md, "Running the check"):
#   one call per part:  mkdir -p /tmp/carry && cp -r benchmarks/out/gpu-carry/part-N/. /tmp/carry/
#                       (carry: ["benchmarks/out/gpu-carry/part-N"])
#   then:               bash benchmarks/gpu/run.sh        (timeout_s 540; it stops itself at 480 s)
# Wheels are for the GPU image's Python (PYVER, default 3.12), manylinux x86_64.
set -eu
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.32.0}
CARRY=benchmarks/out/gpu-carry
rm -rf "$CARRY" && mkdir -p "$CARRY/stage/wheels" "$CARRY/stage/bin"
pip=".venv/bin/python -m pip download --quiet --only-binary=:all: --python-version $PYVER \
     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d $CARRY/stage/wheels"
$pip --no-deps "$ORT_GPU" cuda-python cuda-bindings nvidia-ml-py py-spy
$pip numpy grpcio grpcio-health-checking grpcio-reflection "protobuf>=6.33.5" prometheus-client \
     pillow pyyaml rich uvloop
# perf_analyzer and the libraries it links that a CUDA image may lack (make tools builds it here)
make -s tools >/dev/null
cp .tools-venv/bin/perf_analyzer "$CARRY/stage/bin/"
cp "$(find .tools-venv -name 'libcudart.so.12' | head -1)" "$CARRY/stage/bin/"
cp "$(ldconfig -p | awk '/libb64.so.0d/ {print $NF; exit}')" "$CARRY/stage/bin/"
# split into parts of <= 60 MiB; a wheel larger than that is cut into pieces run.sh joins again
cd "$CARRY/stage"
for f in wheels/*.whl; do
  if [ "$(stat -c %s "$f")" -gt $((60 << 20)) ]; then split -b 60M -d "$f" "$f.piece." && rm "$f"; fi
done
part=0 used=0
for f in wheels/* bin/*; do
  size=$(stat -c %s "$f")
  if [ $((used + size)) -gt $((60 << 20)) ]; then part=$((part + 1)) used=0; fi
  mkdir -p "../part-$part/$(dirname "$f")" && mv "$f" "../part-$part/$f"
  used=$((used + size))
done
cd .. && rm -rf stage && du -sh part-* && echo "sha256:" && find . -type f -exec sha256sum {} + | sort -k2 > SHA256SUMS
