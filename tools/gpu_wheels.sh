#!/usr/bin/env bash
# Fetch the Python packages that tools/gpu_checks.sh needs and a lent GPU machine lacks (it has torch,
# transformers, triton and no network) into .whl/, as wheels for its Python 3.12 on x86-64. Run it on a
# machine with PyPI, then send .whl with the repository; gpu_checks.sh installs them into /tmp/site.
#
#   bash tools/gpu_wheels.sh            megatron-core 0.16.1 (needs torch, numpy, packaging: all there) and
#                                       liger-kernel (needs torch, triton), 3.5 MB together
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "megatron-core==0.16.1" "liger-kernel" 2>&1 | grep -v "is ignored" || true
ls -l .whl
